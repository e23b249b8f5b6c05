"""When to move blocks between tiers: a cost rule, and the switches of the hierarchy's behaviour.

The cost rule is a pure function. Loading a block from a tier costs its transfer time (latency,
per-block overhead, bytes over bandwidth, ``base.TransferModel``); recomputing it costs prefill
time, which grows with the context already in front of it (attention over cached tokens):

    recompute_ms(n tokens after c cached) = n * ms_per_token + ms_per_token_per_ctx_token * (n*c + n*(n-1)/2)

``best_load_prefix`` walks the leading blocks a lower tier holds, each with the tier it would come
from, and returns how many of them to load so that the time saved is largest (0 when recomputing
everything is at least as fast). Loading is all-or-prefix because a block's KV is only usable
when every block before it is present.

Not here: moving bytes (the tiers and the hierarchy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvcache.errors import TierError
from kvcache.router.latency import LatencyModel
from kvcache.tiers.base import TransferModel


@dataclass(frozen=True, slots=True)
class PrefillCost:
    """How long the model takes to compute KV, the same terms as the router's latency model."""

    ms_per_token: float
    ms_per_token_per_ctx_token: float = 0.0

    def __post_init__(self) -> None:
        if self.ms_per_token < 0 or self.ms_per_token_per_ctx_token < 0:
            raise TierError(f"prefill costs must be >= 0, got {self}")

    @classmethod
    def from_latency(cls, latency: LatencyModel) -> PrefillCost:
        """The per-token terms of the router's latency model (what ``kvcache calibrate`` fits from
        the engine's real steps), so tiers and router price recomputation alike."""
        return cls(latency.prefill_ms_per_token, latency.prefill_ms_per_token_per_ctx_token)

    def recompute_ms(self, num_tokens: int, context_tokens: int) -> float:
        n, c = num_tokens, context_tokens
        return n * self.ms_per_token + self.ms_per_token_per_ctx_token * (n * c + n * (n - 1) / 2)


@dataclass(frozen=True, slots=True)
class TierPolicy:
    """What the hierarchy does on its own: write evicted device blocks down (offload), copy a hit
    from a slow tier into the fastest one (promote), stage blocks when a request is routed
    (prefetch), and apply the cost rule on loads (``prefill`` None = always load)."""

    offload_on_evict: bool = True
    promote_on_hit: bool = True
    prefetch_on_route: bool = True
    prefill: PrefillCost | None = None


def best_load_prefix(
    sources: Sequence[TransferModel],
    block_nbytes: int,
    block_tokens: int,
    context_tokens: int,
    prefill: PrefillCost,
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
        saved = prefill.recompute_ms((i + 1) * block_tokens, context_tokens) - load_ms
        if saved > best_saved:
            best_n, best_saved = i + 1, saved
    return best_n, best_saved
