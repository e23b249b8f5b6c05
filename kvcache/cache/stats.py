"""Hit/miss accounting, token-weighted the way vLLM counts ``prefix_cache_queries/hits``.

A query is every prompt token of an allocated request; a hit is every one of those tokens whose
KV was reused from the cache. ``lookup`` (a probe) counts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TenantStats:
    requests: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def record(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.requests += 1
        self.query_tokens += num_tokens
        self.hit_tokens += num_hit_tokens


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of a manager's counters; ``tenants`` maps tenant -> its own counters."""

    num_blocks: int
    used_blocks: int
    cached_free_blocks: int
    free_blocks: int
    evictions: int
    requests: int
    query_tokens: int
    hit_tokens: int
    tenants: dict[str, TenantStats] = field(default_factory=dict)
    owned_blocks: dict[str, int] = field(default_factory=dict)
    events_dropped: int = 0  # events lost because nobody drained them (``max_events``)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
