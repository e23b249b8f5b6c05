"""Simulated spill tiers for the router's trace replay: which block keys each tier holds, and how
long loading them takes. No bytes move; sizes are in blocks, times come from ``TransferModel``s.

Implements the replay's ``SpillHook`` (``kvcache.lab.sim_worker``):

- ``on_evict(worker, keys, now)``: blocks leaving a worker's device pool go to its G2 (host
  memory); G2's least recently used overflow goes to its G3 (local disk); G3's overflow is
  dropped. Every evicted block is also written behind to the pod-shared ICMS tier, so another
  worker can load it instead of recomputing.
- ``fetch(worker, keys, now)``: the leading keys found in this worker's G2 or G3 or in ICMS
  (fastest first), trimmed by the cost rule when a latency model (``prefill``) is given, and the milliseconds
  to load them: one batch per tier, so each tier's base latency is paid once.
- ``prestage(worker, keys, now)`` (when ``prestaging``, the default): the router just placed a
  request on the worker; the leading keys held in G3 or ICMS start moving into the worker's
  staging buffer in host memory, one batch per tier, finishing at ``now`` + their transfer
  time. A later ``fetch`` of a staged key costs a G2 load, plus whatever of the staging is still
  in flight; a request that waited in the queue longer than that loads at host-memory speed.

Only reads are charged: offload writes are write-behind, off the request's path, and do not
compete with reads for bandwidth here. Tiers are inclusive: a loaded block stays where it was
(and is refreshed in LRU order), so a later eviction from the device does not have to write it
again.

Default speeds, per GPU: G2 pinned host memory over PCIe Gen5 x16, 50 GB/s (48-55 GB/s
measured on H100, FACTS.md), 10 us per batch; G3 one PCIe Gen4 NVMe drive, 7 GB/s sequential
read, 100 us latency, 10 us per block; ICMS ``IcmsLink`` (BlueField-4 figures, see ``icms``).
KV size per token defaults to an 8B Llama-3-shaped model in bf16 (32 layers x 8 KV heads x 128
x 2 x 2 bytes = 128 KiB), the model the router's default latency model stands for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcache.cache.lru import LRU
from kvcache.costs import LatencyModel
from kvcache.errors import ConfigError
from kvcache.tiers.base import TransferModel
from kvcache.tiers.icms import IcmsLink
from kvcache.tiers.policy import best_load_prefix

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
    blocks_hit: int = 0
    cross_worker_hits: int = 0
    prestaged: int = 0  # blocks served from the staging buffer (moved ahead of need)
    blocks_in: int = 0
    evictions: int = 0
    transfer_ms: float = 0.0


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
    blocks_declined: int = 0
    fetches: int = 0

    def __post_init__(self) -> None:
        sizes = self.sizes
        self._g2: list[LRU[bytes, None]] = [LRU(sizes.g2 or None) for _ in range(self.num_workers)]
        self._g3: list[LRU[bytes, None]] = [LRU(sizes.g3 or None) for _ in range(self.num_workers)]
        self._icms: LRU[bytes, int] = LRU(sizes.icms or None)  # key -> worker that wrote it
        # Per worker: key -> when its prestaged copy is in host memory. Entries leave when fetched.
        self._staged: list[dict[bytes, float]] = [{} for _ in range(self.num_workers)]

    @property
    def block_nbytes(self) -> int:
        return self.block_tokens * self.kv_bytes_per_token

    def _put(self, name: str, tier: LRU[bytes, None], key: bytes) -> bytes | None:
        """Insert ``key``; returns the key pushed out, if any."""
        if tier.touch(key):
            return None
        self.stats[name].blocks_in += 1
        for old, _ in tier.put(key, None):
            self.stats[name].evictions += 1
            return old
        return None

    def on_evict(self, worker_id: int, keys: list[bytes], now_ms: float) -> None:
        sizes = self.sizes
        for key in keys:
            down: bytes | None = key
            if sizes.g2:
                down = self._put("g2", self._g2[worker_id], key)
            if down is not None and sizes.g3:
                self._put("g3", self._g3[worker_id], down)
            if sizes.icms:
                icms = self._icms
                writer = icms.get(key)
                if writer is None:
                    self.stats["icms"].blocks_in += 1
                    writer = worker_id
                self.stats["icms"].evictions += len(icms.put(key, writer))

    def _holder(self, worker_id: int, key: bytes) -> str | None:
        if key in self._g2[worker_id]:
            return "g2"
        if key in self._g3[worker_id]:
            return "g3"
        return "icms" if key in self._icms else None

    def prestage(self, worker_id: int, keys: list[bytes], now_ms: float) -> None:
        if not self.prestaging:
            return
        staged = self._staged[worker_id]
        batch: dict[str, list[bytes]] = {"g3": [], "icms": []}
        for key in keys:
            name = self._holder(worker_id, key)
            if name is None:
                break
            if name in batch and key not in staged:
                batch[name].append(key)
        for name, group in batch.items():
            if group:
                ready = now_ms + self.transfer[name].transfer_ms(len(group), len(group) * self.block_nbytes)
                staged.update(dict.fromkeys(group, ready))

    def fetch(self, worker_id: int, keys: list[bytes], now_ms: float) -> tuple[int, float]:
        self.fetches += 1
        g2, g3, icms = self._g2[worker_id], self._g3[worker_id], self._icms
        where: list[str] = []
        for key in keys:
            if key in g2:
                where.append("g2")
            elif key in g3:
                where.append("g3")
            elif key in icms:
                where.append("icms")
            else:
                break
        staged = self._staged[worker_id]
        is_staged = [name != "g2" and key in staged for key, name in zip(keys, where, strict=False)]
        if where and self.prefill is not None:
            # A staged block loads at host-memory speed once its staging is done.
            sources = [self.transfer["g2" if st else name] for name, st in zip(where, is_staged, strict=True)]
            n, _ = best_load_prefix(sources, self.block_nbytes, self.block_tokens, 0, self.prefill)
            self.blocks_declined += len(where) - n
            where = where[:n]
        counts = dict.fromkeys(TIER_NAMES, 0)
        num_staged, staging_left_ms = 0, 0.0
        for key, name, st in zip(keys, where, is_staged, strict=False):
            if st:
                num_staged += 1
                self.stats[name].prestaged += 1
                staging_left_ms = max(staging_left_ms, staged.pop(key) - now_ms)
            else:
                counts[name] += 1
            if name == "g2":
                g2.touch(key)
            elif name == "g3":
                g3.touch(key)
            else:
                icms.touch(key)
                self.stats["icms"].cross_worker_hits += icms.get(key) != worker_id
        total_ms = 0.0
        for name, n in counts.items():
            if n:
                ms = self.transfer[name].transfer_ms(n, n * self.block_nbytes)
                self.stats[name].blocks_hit += n
                self.stats[name].transfer_ms += ms
                total_ms += ms
        if num_staged:
            # Staged blocks count as hits of the tier they came from; they cost what is left of
            # their staging plus one host-memory load.
            for name, st in zip(where, is_staged, strict=False):
                if st:
                    self.stats[name].blocks_hit += 1
            ms = max(0.0, staging_left_ms) + self.transfer["g2"].transfer_ms(
                num_staged, num_staged * self.block_nbytes
            )
            total_ms += ms
        return len(where), total_ms

    def occupancy(self) -> dict[str, int]:
        return {
            "g2": sum(len(t) for t in self._g2),
            "g3": sum(len(t) for t in self._g3),
            "icms": len(self._icms),
        }
