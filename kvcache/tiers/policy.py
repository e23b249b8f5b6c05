"""When to move blocks between tiers: a cost rule, and the switches of the hierarchy's behaviour.

The cost rule is a pure function. Loading a block from a tier costs its transfer time (latency,
per-block overhead, bytes over bandwidth, ``base.TransferModel``); recomputing it costs prefill
time, priced by the project's one step-cost model (``costs.LatencyModel``, the model
``kvcache calibrate`` fits from the engine's steps), which grows with the context already in front
of it (attention over cached tokens):

    recompute_ms(n tokens after c cached) = LatencyModel.compute_ms(n, c)
        = n * prefill_ms_per_token + n * (c + n/2) * prefill_ms_per_token_per_ctx_token

``best_load_prefix`` walks the leading blocks a lower tier holds, each with the tier it would come
from, and returns how many of them to load so that the time saved is largest (0 when recomputing
everything is at least as fast). Loading is all-or-prefix because a block's KV is only usable
when every block before it is present.

Not here: moving bytes (the tiers and the hierarchy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvcache.costs import LatencyModel
from kvcache.tiers.base import TransferModel


@dataclass(frozen=True, slots=True)
class TierPolicy:
    """What the hierarchy does on its own: write evicted device blocks down (offload), copy a hit
    from a slow tier into the fastest one (promote), stage blocks when a request is routed
    (prefetch), and apply the cost rule on loads, pricing recomputation with ``prefill`` (None =
    always load)."""

    offload_on_evict: bool = True
    promote_on_hit: bool = True
    prefetch_on_route: bool = True
    prefill: LatencyModel | None = None


def best_load_prefix(
    sources: Sequence[TransferModel],
    block_nbytes: int,
    block_tokens: int,
    context_tokens: int,
    prefill: LatencyModel,
) -> tuple[int, float]:
    """How many leading blocks to load, and the milliseconds that saves over recomputing them.

    ``sources[i]`` is the transfer model of the tier block ``i`` would be loaded from; blocks are
    loaded in one batch per tier, so each tier's base latency is paid once. ``context_tokens``:
    tokens already on the device in front of block 0.
    """
    best_n, best_saved = 0, 0.0
    per_tier: dict[TransferModel, int] = {}
    for i, model in enumerate(sources):
        per_tier[model] = per_tier.get(model, 0) + 1
        load_ms = sum(m.transfer_ms(n, n * block_nbytes) for m, n in per_tier.items())
        saved = prefill.compute_ms((i + 1) * block_tokens, context_tokens) - load_ms
        if saved > best_saved:
            best_n, best_saved = i + 1, saved
    return best_n, best_saved
