"""Configuration records for the block manager.

Plain frozen dataclasses, validated on construction so that a bad value fails where it was
written, with the value, the limit and the fix in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcache.errors import ConfigError

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class TenantQuota:
    """Limits on the blocks one tenant owns (in use or cached).

    ``floor_blocks``: while the tenant owns this many blocks or fewer, no allocation evicts its
    cached blocks (its own allocations take them only when nothing else can be evicted), so
    another tenant's flood cannot flush its working set. ``cap_blocks``: the tenant never owns
    more; past it, its own least recently used cached blocks are evicted first, and if that is
    not enough the allocation fails with ``QuotaError``.
    """

    floor_blocks: int = 0
    cap_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.floor_blocks < 0:
            raise ConfigError(f"floor_blocks={self.floor_blocks} must be >= 0")
        if self.cap_blocks is not None and self.cap_blocks < max(1, self.floor_blocks):
            raise ConfigError(
                f"cap_blocks={self.cap_blocks} must be >= 1 and >= floor_blocks={self.floor_blocks}"
            )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """What a block manager needs to know, all of it explicit.

    - ``num_blocks``: size of the pool; block ids are ``0..num_blocks-1``.
    - ``block_size``: tokens per block; only full blocks are ever shared.
    - ``vocab_size``: if set, token ids must be below it.
    - ``model_id`` / ``adapter_id``: enter the root of every hash chain, so blocks of different
      models or adapters never match.
    - ``deployment_key``: optional secret mixed into every root with keyed BLAKE2b, so that
      nobody without it can compute a block key.
    - ``k_anonymity``: a block in a shared (group) scope is a hit for a tenant only once ``k``
      distinct tenants have written it (or the tenant wrote it itself). ``1`` = plain sharing.
    - ``quotas``: per-tenant floors and caps; ``default_quota`` applies to tenants not listed.
    - ``cap_hit_to_prompt_minus_one``: never report the whole prompt as cached, so a model always
      computes at least the last position (and gets logits for it).
    - ``max_events``: ``BlockStored``/``BlockRemoved`` events kept until ``drain_events``; past it
      the oldest are dropped and counted (``CacheStats.events_dropped``). ``0`` turns events off.
    """

    num_blocks: int
    block_size: int = DEFAULT_BLOCK_SIZE
    vocab_size: int | None = None
    model_id: str = "default"
    adapter_id: str | None = None
    deployment_key: bytes | None = None
    k_anonymity: int = 1
    quotas: dict[str, TenantQuota] = field(default_factory=dict)
    default_quota: TenantQuota = field(default_factory=TenantQuota)
    cap_hit_to_prompt_minus_one: bool = True
    max_events: int = 65_536

    def __post_init__(self) -> None:
        if not isinstance(self.num_blocks, int) or self.num_blocks <= 0:
            raise ConfigError(f"num_blocks={self.num_blocks!r} must be a positive integer")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ConfigError(f"block_size={self.block_size!r} must be a positive integer")
        if self.vocab_size is not None and (
            not isinstance(self.vocab_size, int) or not 0 < self.vocab_size <= 2**32
        ):
            raise ConfigError(f"vocab_size={self.vocab_size!r} must be an integer in 1..2**32")
        if not isinstance(self.k_anonymity, int) or self.k_anonymity < 1:
            raise ConfigError(f"k_anonymity={self.k_anonymity!r} must be an integer >= 1")
        if not isinstance(self.max_events, int) or self.max_events < 0:
            raise ConfigError(f"max_events={self.max_events!r} must be an integer >= 0 (0 = no events)")
        if not self.model_id:
            raise ConfigError("model_id must be a non-empty string")
        if self.deployment_key is not None and len(self.deployment_key) > 64:
            raise ConfigError(
                f"deployment_key is {len(self.deployment_key)} bytes; BLAKE2b keys are at most 64"
            )
        floors = sum(q.floor_blocks for q in self.quotas.values())
        if floors > self.num_blocks:
            raise ConfigError(
                f"quota floors add up to {floors} blocks, more than num_blocks={self.num_blocks}"
            )

    def quota_for(self, tenant: str) -> TenantQuota:
        return self.quotas.get(tenant, self.default_quota)
