"""Simulated spill tiers for the router's trace replay: the engine's spill hierarchy
(``tiers.Hierarchy``, its placement rules and its cost rule) run over tiers that hold block keys
instead of bytes, each read priced by its ``TransferModel``.

Every worker has its own ``Hierarchy`` over its G2 (host memory) and G3 (local disk) and a client
of the pod's one ICMS tier, as ``kvcache serve``'s workers do, so the rules are the hierarchy's
own, not a restatement of them:

- offload on eviction: blocks leaving a worker's device pool go to its first tier; a full
  private tier demotes its least recently used block to the next one, the last drops it; every
  evicted block is also written behind to ICMS, so another worker can load it instead of
  recomputing (at once: the replay has no write-behind timer);
- load at admission (``fetch``): the leading keys some tier holds, fastest first, trimmed by the
  cost rule against the prefill they save after the device's hit (``TierPolicy.prefill``); a
  block loaded from a slower tier is promoted into the first one;
- prefetch when a request is placed (``prestage``, when ``prestaging``, the default): the engine's
  prefetch, ``Hierarchy.promote``, copies the request's leading blocks held by lower tiers (ICMS
  included) into the first tier, off the request's path. The copies are in flight until ``now``
  plus their tier's transfer time (one batch per tier); a fetch that uses one pays what is left of
  that plus a first-tier load. As in the engine, nothing is prefetched without a first tier above
  the others. The engine caps its prefetch at a budget of blocks; the replay does not.

Only reads are charged: offload writes are write-behind, off the request's path, and do not
compete with reads for bandwidth here. A read costs one batch per tier, so each tier's base
latency is paid once per fetch.

Default speeds, per GPU: G2 pinned host memory over PCIe Gen5 x16, 50 GB/s (48-55 GB/s
measured on H100, FACTS.md), 10 us per batch; G3 one PCIe Gen4 NVMe drive, 7 GB/s sequential
read, 100 us latency, 10 us per block; ICMS ``IcmsLink`` (BlueField-4 figures, see ``icms``).
KV size per token defaults to an 8B Llama-3-shaped model in bf16 (32 layers x 8 KV heads x 128
x 2 x 2 bytes = 128 KiB), the model the router's default latency model stands for.

Not here: the rules (``tiers.hierarchy``, ``tiers.policy``); tiers that hold bytes (``tiers``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcache.cache.lru import LRU
from kvcache.costs import LatencyModel
from kvcache.errors import ConfigError
from kvcache.tiers import Hierarchy, IcmsLink, LayoutFingerprint, Tier, TierKey, TierPolicy, TransferModel

KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2
G2_TRANSFER = TransferModel(bandwidth_bytes_per_s=50e9, base_latency_ms=0.01)
G3_TRANSFER = TransferModel(bandwidth_bytes_per_s=7e9, base_latency_ms=0.1, per_block_ms=0.01)
ICMS_TRANSFER = IcmsLink().transfer
TIER_NAMES = ("g2", "g3", "icms")


@dataclass(frozen=True, slots=True)
class TierSizes:
    """Blocks per worker for G2 and G3, blocks in all for the shared ICMS tier (0 = absent)."""

    g2: int = 0
    g3: int = 0
    icms: int = 0

    @classmethod
    def parse(cls, spec: str, device_blocks: int) -> TierSizes:
        """``"g2=SIZE,g3=SIZE,icms=SIZE"``; SIZE is a block count or a multiple of the per-worker
        device capacity (``4x``). Any subset of the three names."""
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep or name not in TIER_NAMES or name in sizes:
                raise ConfigError(
                    f"--tiers item {part!r} must be NAME=SIZE with NAME one of {', '.join(TIER_NAMES)}, "
                    "each at most once (e.g. g2=4x,g3=16x,icms=20000)"
                )
            try:
                blocks = round(float(value[:-1]) * device_blocks) if value.endswith("x") else int(value)
            except ValueError:
                raise ConfigError(
                    f"--tiers size {value!r} must be a block count or a multiple like 4x"
                ) from None
            if blocks < 0:
                raise ConfigError(f"--tiers {name}={value} must be >= 0")
            sizes[name] = blocks
        if not sizes:
            raise ConfigError("--tiers is empty; give at least one of g2=, g3=, icms=")
        return cls(**sizes)


@dataclass(slots=True)
class SimTierStats:
    """One simulated tier's counters, summed over the workers. ``blocks_hit`` and
    ``transfer_ms`` count loads on a request's path; a prestaged block counts as a hit of the
    tier it was staged from."""

    blocks_hit: int = 0
    cross_worker_hits: int = 0
    prestaged: int = 0  # blocks served from a copy moved ahead of need
    blocks_in: int = 0
    evictions: int = 0
    transfer_ms: float = 0.0


class KeyTier(Tier):
    """A tier that holds block keys, not bytes: the replay's stand-in for a G2, a G3, or one
    worker's client of the shared ICMS tier (``pod``: the key -> writer table all clients share).

    Blocks it is handed are placeholders and are not kept; a load hands back the caller's
    ``out`` (or a placeholder). Each key a load serves is logged in ``served`` (with whether
    another worker wrote it) for the simulator to price; the simulator clears the log."""

    def __init__(
        self,
        name: str,
        capacity_blocks: int,
        layout: LayoutFingerprint,
        stats: SimTierStats,
        pod: LRU[bytes, int] | None = None,
        worker_id: int = 0,
    ) -> None:
        super().__init__(capacity_blocks)
        self.name = name
        self.shared = pod is not None
        self.layout = layout
        self.sim_stats = stats
        self.worker_id = worker_id
        self.keys: LRU[bytes, int] = pod if pod is not None else LRU(capacity_blocks)
        self.served: list[tuple[bytes, bool]] = []
        self._placeholder = torch.zeros(layout.block_shape, dtype=layout.torch_dtype)

    def contains(self, key: TierKey) -> bool:
        return key.key in self.keys

    def load(self, key: TierKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        writer = self.keys.get(key.key)
        if writer is None:
            self._stats.misses += 1
            return None
        self.keys.touch(key.key)
        self._stats.hits += 1
        self.served.append((key.key, writer != self.worker_id))
        return self._placeholder if out is None else out

    def store(self, key: TierKey, block: torch.Tensor) -> None:
        keys = self.keys
        if key.key in keys:
            if not self.shared:  # the same bytes: only the recency changes
                keys.touch(key.key)
                return
        else:
            self.sim_stats.blocks_in += 1
        for old, _ in keys.put(key.key, self.worker_id):
            self.sim_stats.evictions += 1
            if self.on_evict is not None:
                self.on_evict(TierKey(old, self.layout), self._placeholder)

    def remove(self, key: TierKey) -> bool:
        return self.keys.pop(key.key) is not None

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class SimTiers:
    """Lower tiers of ``num_workers`` workers and the pod they share."""

    num_workers: int
    sizes: TierSizes
    block_tokens: int
    kv_bytes_per_token: int = KV_BYTES_PER_TOKEN
    transfer: dict[str, TransferModel] = field(
        default_factory=lambda: {"g2": G2_TRANSFER, "g3": G3_TRANSFER, "icms": ICMS_TRANSFER}
    )
    prefill: LatencyModel | None = None
    prestaging: bool = True
    stats: dict[str, SimTierStats] = field(default_factory=lambda: {n: SimTierStats() for n in TIER_NAMES})
    fetches: int = 0

    def __post_init__(self) -> None:
        sizes = self.sizes
        # Keys only: one byte per token of a one-layer, one-head layout stands for each block.
        layout = LayoutFingerprint("simulated", "uint8", 1, 1, 1, self.block_tokens)
        self._pod: LRU[bytes, int] | None = LRU(sizes.icms) if sizes.icms else None
        self._tiers: list[list[KeyTier]] = []
        self._hierarchies: list[Hierarchy] = []
        for worker in range(self.num_workers):
            tiers = [
                KeyTier(name, size, layout, self.stats[name])
                for name, size in (("g2", sizes.g2), ("g3", sizes.g3))
                if size
            ]
            if self._pod is not None:
                tiers.append(KeyTier("icms", sizes.icms, layout, self.stats["icms"], self._pod, worker))
            self._tiers.append(tiers)
            self._hierarchies.append(
                Hierarchy(
                    layout,
                    tiers,
                    TierPolicy(prefill=self.prefill),
                    transfer=[self.transfer[t.name] for t in tiers],
                    block_nbytes=self.block_nbytes,
                )
            )
        self._block = torch.zeros((1, *layout.block_shape), dtype=layout.torch_dtype)
        # Per worker: key -> (when its prefetched copy is in the first tier, the tier it came
        # from, whether another worker wrote it). Entries leave when a fetch uses them.
        self._staged: list[dict[bytes, tuple[float, str, bool]]] = [{} for _ in range(self.num_workers)]

    @property
    def block_nbytes(self) -> int:
        return self.block_tokens * self.kv_bytes_per_token

    @property
    def blocks_declined(self) -> int:
        """Blocks a tier held that the cost rule left to recompute."""
        return sum(h.stats().blocks_declined for h in self._hierarchies)

    def _batch_ms(self, name: str, num_blocks: int) -> float:
        return self.transfer[name].transfer_ms(num_blocks, num_blocks * self.block_nbytes)

    def on_evict(self, worker_id: int, keys: list[bytes], now_ms: float) -> None:
        if keys:
            self._hierarchies[worker_id].store(keys, self._block.expand(len(keys), *self._block.shape[1:]))

    def _take_served(self, tiers: list[KeyTier]) -> list[list[tuple[bytes, bool]]]:
        served = [t.served for t in tiers]
        for t in tiers:
            t.served = []
        return served

    def prestage(self, worker_id: int, keys: list[bytes], now_ms: float) -> None:
        tiers = self._tiers[worker_id]
        if not self.prestaging or len(tiers) < 2 or tiers[0].shared:
            return
        self._take_served(tiers)
        self._hierarchies[worker_id].promote(keys)
        staged = self._staged[worker_id]
        for tier, served in zip(tiers, self._take_served(tiers), strict=True):
            if served:
                ready = now_ms + self._batch_ms(tier.name, len(served))
                for key, cross in served:
                    staged[key] = (ready, tier.name, cross)

    def fetch(
        self, worker_id: int, keys: list[bytes], now_ms: float, context_tokens: int = 0
    ) -> tuple[int, float]:
        self.fetches += 1
        tiers = self._tiers[worker_id]
        self._take_served(tiers)
        num_loaded = len(self._hierarchies[worker_id].load(keys, context_tokens))
        staged = self._staged[worker_id]
        stats = self.stats
        total_ms, staging_left_ms, num_staged = 0.0, 0.0, 0
        for position, (tier, served) in enumerate(zip(tiers, self._take_served(tiers), strict=True)):
            num_read = 0
            for key, cross in served:
                copy = staged.pop(key, None) if position == 0 else None
                if copy is not None:  # moved ahead of need: a hit of the tier it came from
                    ready, tier_name, cross = copy
                    staging_left_ms = max(staging_left_ms, ready - now_ms)
                    num_staged += 1
                    stats[tier_name].prestaged += 1
                else:
                    tier_name = tier.name
                    num_read += 1
                stats[tier_name].blocks_hit += 1
                stats[tier_name].cross_worker_hits += cross
            if num_read:
                ms = self._batch_ms(tier.name, num_read)
                stats[tier.name].transfer_ms += ms
                total_ms += ms
        if num_staged:
            total_ms += staging_left_ms + self._batch_ms(tiers[0].name, num_staged)
        return num_loaded, total_ms

    def occupancy(self) -> dict[str, int]:
        per_worker = [t for tiers in self._tiers for t in tiers if not t.shared]
        return {
            "g2": sum(len(t) for t in per_worker if t.name == "g2"),
            "g3": sum(len(t) for t in per_worker if t.name == "g3"),
            "icms": len(self._pod) if self._pod is not None else 0,
        }
