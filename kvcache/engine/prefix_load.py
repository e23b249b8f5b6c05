"""Loading a prompt's prefix from the spill tiers at admission: the one implementation, which the
engine runs for every request it admits (``Engine._load_prefix``) and ``kvcache tiers`` runs to
measure the tiers.

After the pool's hit (``Allocation.num_cached_tokens``), the blocks a spill hierarchy holds next
are restored into the request's own freshly allocated blocks, in one unpack. The rules:

- gated: a request of a share group under k-anonymity never loads (``scheduler.tiers_gated``): a tier cannot
  tell how many tenants wrote a block, so a load could reveal what one tenant sent;
- the last prompt token is always computed, since the model must produce its logits: the block
  holding it is never loaded (``scheduler.loadable_blocks``), whether a tier holds it or not;
- a prefetch job of the request is settled (stopped, and its hits counted in the prefetcher's
  stats) under the tier lock the load runs in (``settle``: ``prefetch.Prefetcher.settle``).

Not here: which blocks the request gets (``BlockManager.allocate``), timings and device syncs
(the engine), moving blocks ahead of admission (``prefetch``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvcache.cache.config import CacheConfig
from kvcache.cache.manager import Allocation, Prompt
from kvcache.engine.prefetch import Settled
from kvcache.engine.scheduler import loadable_blocks, tiers_gated
from kvcache.tiers import Hierarchy

Settle = Callable[[Sequence[bytes]], contextlib.AbstractContextManager[Settled]]


@dataclass(frozen=True, slots=True)
class PrefixLoad:
    """What one admission loaded: blocks ``first_block`` .. ``first_block + num_blocks`` of the
    prompt came from the tiers (``first_block``: the pool's hit, in blocks). ``restored``: the
    tiers held the first block wanted, so a restore ran (its time counts even when it brought
    nothing back)."""

    first_block: int
    num_blocks: int = 0
    restored: bool = False


def _no_prefetch(keys: Sequence[bytes]) -> contextlib.AbstractContextManager[Settled]:
    return contextlib.nullcontext(Settled())


def load_prefix(
    tiers: Hierarchy,
    pool: torch.Tensor,
    config: CacheConfig,
    prompt: Prompt,
    alloc: Allocation,
    settle: Settle = _no_prefetch,
) -> PrefixLoad:
    """Restore the leading blocks ``tiers`` hold after ``alloc``'s hit into ``alloc``'s blocks of
    ``pool`` ``[L, 2, num_blocks, block_size, kv_heads, head_dim]`` (the manager's ``config``:
    block size and k-anonymity); see the module docstring for the rules."""
    bs = config.block_size
    span = loadable_blocks(prompt, alloc.num_cached_tokens, bs)
    if tiers_gated(config, prompt):
        return PrefixLoad(span.start)
    keys = prompt.keys[span.start : span.stop]
    with settle(keys) as settled:
        if not keys or not tiers.lookup_prefix(keys[:1]):
            return PrefixLoad(span.start)
        ids = alloc.block_ids[span.start : span.stop]
        settled.num_loaded = tiers.restore(pool, ids, keys, context_tokens=span.start * bs)
    return PrefixLoad(span.start, settled.num_loaded, True)
