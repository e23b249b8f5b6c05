"""G3.5: an emulation of ICMS, the pod-shared KV tier on BlueField-4 attached flash.

Every worker of a pod has its own ``IcmsTier`` over one shared backend (``backends``), so a
block one worker evicts is a hit for another. What it emulates:

- capacity: the backend's ``capacity_blocks`` (LRU beyond it);
- a link per group of GPUs: reads cost ``base_latency + n * per_block + bytes / bandwidth``
  (``IcmsLink``), accounted as stall time and, with ``emulate_latency``, actually waited;
- write-behind: stores are buffered and written in one batch every ``write_behind_blocks`` (or on
  ``flush``), off the request's path; a worker reads its own buffered blocks at once;
- prestaging: ``prestage(keys)`` fetches blocks when the router has placed a request, so the later
  ``load`` finds them staged and waits for nothing;
- no durability: a lost or damaged value, or an unreachable backend, is a counted miss (the
  block is recomputed), with a warning; never a failed request.
- authentication: with a tier secret (``seal``) every value carries a keyed BLAKE3 MAC over its
  key, layout and payload, checked on every load, so whoever can write the backend (Redis) can
  delete blocks but not plant them. Without one, a backend other processes share is announced at
  start as unauthenticated (a warning), and values carry only a checksum.

Defaults, from public figures (NVIDIA, BlueField-4 announcement, GTC 2025 and the Inference
Context Memory Storage platform, CES 2026): 800 Gb/s of network per BlueField-4, shared by about
4 GPUs, so 200 Gb/s = 25 GB/s per GPU; latency is not published, and analysts estimate
100-500 us per access for Ethernet-attached flash, so the base latency is 300 us and each block
adds 5 us of request overhead (NVMe-oF command cost).

Not here: what to offload or prefetch (the hierarchy and policy decide).
"""

from __future__ import annotations

import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from kvcache.cache.lru import LRU
from kvcache.errors import CorruptBlockError, TierError
from kvcache.tiers import codec
from kvcache.tiers.backends import Backend, BackendUnavailable
from kvcache.tiers.base import Tier, TierKey, TierStats, TransferModel
from kvcache.tiers.seal import SECRET_ENV, SECRET_FILE_ENV, Seal

log = logging.getLogger(__name__)
T = TypeVar("T")

LINK_GBITS = 800.0  # BlueField-4 network bandwidth per link
GPUS_PER_LINK = 4
BASE_LATENCY_US = 300.0  # middle of the 100-500 us estimates
PER_BLOCK_LATENCY_US = 5.0
_WRITER = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class IcmsLink:
    link_gbits: float = LINK_GBITS
    gpus_per_link: int = GPUS_PER_LINK
    base_latency_us: float = BASE_LATENCY_US
    per_block_latency_us: float = PER_BLOCK_LATENCY_US

    def __post_init__(self) -> None:
        if self.link_gbits <= 0 or self.gpus_per_link <= 0:
            raise TierError(
                f"link_gbits={self.link_gbits} and gpus_per_link={self.gpus_per_link} must be > 0"
            )

    @property
    def transfer(self) -> TransferModel:
        """One GPU's share of the link."""
        return TransferModel(
            bandwidth_bytes_per_s=self.link_gbits * 1e9 / 8 / self.gpus_per_link,
            base_latency_ms=self.base_latency_us / 1e3,
            per_block_ms=self.per_block_latency_us / 1e3,
        )


def _name(key: TierKey) -> bytes:
    return key.layout.digest + key.key


class IcmsTier(Tier):
    name = "ICMS"
    shared = True

    def __init__(
        self,
        backend: Backend,
        worker_id: int = 0,
        link: IcmsLink | None = None,
        write_behind_blocks: int = 32,
        staging_blocks: int = 1024,
        emulate_latency: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.perf_counter,
        retry_after_s: float = 1.0,
        seal: Seal | None = None,
    ) -> None:
        super().__init__(backend.capacity_blocks)
        if write_behind_blocks < 1 or staging_blocks < 0:
            raise TierError(f"write_behind_blocks={write_behind_blocks} must be >= 1, staging_blocks >= 0")
        self.backend = backend
        self.worker_id = worker_id
        self.link = link or IcmsLink()
        self.transfer = self.link.transfer
        self.write_behind_blocks = write_behind_blocks
        self.staging_blocks = staging_blocks
        self.emulate_latency = emulate_latency
        self._sleep, self._clock = sleep, clock
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        # ``None``: the deployment secret when one is provisioned, else a checksum, which on a
        # backend other processes can write is announced as unauthenticated.
        self.seal = seal or Seal.from_environment() or codec.CHECKSUM_SEAL
        if backend.shared and not self.seal.authenticated:
            log.warning(
                "ICMS: blocks in the shared backend are checksummed, not authenticated: anyone who "
                "can write it can plant KV that this worker will serve. Provision a tier secret "
                "(%s or %s, docs/tiers.md) on every worker.",
                SECRET_FILE_ENV,
                SECRET_ENV,
            )
        self.pending: OrderedDict[bytes, bytes] = OrderedDict()  # written behind, not yet flushed
        self.staged: LRU[bytes, bytes] = LRU(self.staging_blocks or None)  # prestaged, consumed by load

    # ---- backend access: every failure is a counted miss ------------------------------------

    def _backend(self, fn: Callable[[], T], default: T, count: bool = True) -> T:
        """``fn()``, or ``default`` when the backend is down (counted, unless only observing)."""
        if self._clock() < self._down_until:
            self._stats.errors += count
            return default
        try:
            return fn()
        except BackendUnavailable as exc:
            self._stats.errors += count
            self._down_until = self._clock() + self.retry_after_s
            log.warning("ICMS backend unavailable, serving misses for %.1fs: %s", self.retry_after_s, exc)
            return default

    def _wait(self, modelled_ms: float, started: float) -> None:
        self._stats.stall_ms += modelled_ms
        if self.emulate_latency:
            left = modelled_ms / 1e3 - (self._clock() - started)
            if left > 0:
                self._sleep(left)

    # ---- verbs ------------------------------------------------------------------------------

    def contains(self, key: TierKey) -> bool:
        name = _name(key)
        if name in self.pending or name in self.staged:
            return True
        return self._backend(lambda: self.backend.contains_many([name]), [False])[0]

    def contains_many(self, keys: Sequence[TierKey]) -> list[bool]:
        names = [_name(k) for k in keys]
        local = [n in self.pending or n in self.staged for n in names]
        remote = [n for n, here in zip(names, local, strict=True) if not here]
        found = iter(self._backend(lambda: self.backend.contains_many(remote), [False] * len(remote)))
        return [here or next(found) for here in local]

    def lookup_prefix(self, keys: Sequence[TierKey]) -> int:
        held = self.contains_many(keys)
        return held.index(False) if False in held else len(held)

    def load(self, key: TierKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.load_many([key], [out])[0]

    def load_many(
        self, keys: Sequence[TierKey], outs: Sequence[torch.Tensor | None] | None = None
    ) -> list[torch.Tensor | None]:
        """Blocks of ``keys``; the ones neither buffered nor staged come in one backend read."""
        started = self._clock()
        names = [_name(k) for k in keys]
        values: list[bytes | None] = []
        prestaged = [False] * len(keys)
        remote: list[int] = []
        for i, name in enumerate(names):
            value = self.pending.get(name)
            if value is None and name in self.staged:
                value = self.staged.pop(name)
                prestaged[i] = True
            if value is None:
                remote.append(i)
            values.append(value)
        if remote:
            none: list[bytes | None] = [None] * len(remote)
            got = self._backend(lambda: self.backend.get_many([names[i] for i in remote]), none)
            for i, value in zip(remote, got, strict=True):
                values[i] = value
            fetched = sum(values[i] is not None for i in remote)
            if fetched:
                self._stats.sync_loads += fetched
                self._wait(self.transfer.transfer_ms(fetched, fetched * keys[0].layout.block_nbytes), started)
        outs = outs if outs is not None else [None] * len(keys)
        return [
            self._decode(key, value, out, was_staged)
            for key, value, out, was_staged in zip(keys, values, outs, prestaged, strict=True)
        ]

    def _decode(
        self, key: TierKey, value: bytes | None, out: torch.Tensor | None, prestaged: bool
    ) -> torch.Tensor | None:
        s = self._stats
        if value is None:
            s.misses += 1
            return None
        try:
            if len(value) < _WRITER.size:
                raise CorruptBlockError(f"value of {len(value)} bytes has no writer id")
            (writer,) = _WRITER.unpack_from(value)
            block = codec.decode(memoryview(value)[_WRITER.size :], key, out, self.seal)
        except CorruptBlockError as exc:
            log.warning("ICMS: dropped corrupt block %s: %s", key.key.hex(), exc)
            s.corrupt += 1
            s.misses += 1
            self._backend(lambda: self.backend.delete(_name(key)), False)
            return None
        s.hits += 1
        s.blocks_out += 1
        s.bytes_out += key.layout.block_nbytes
        s.prestaged_loads += prestaged
        s.cross_worker_hits += writer != self.worker_id
        return block

    def store(self, key: TierKey, block: torch.Tensor) -> None:
        value = _WRITER.pack(self.worker_id) + codec.encode(key, block.cpu(), self.seal)
        self.pending[_name(key)] = value
        self._stats.blocks_in += 1
        self._stats.bytes_in += key.layout.block_nbytes
        if len(self.pending) >= self.write_behind_blocks:
            self.flush()

    def flush(self) -> int:
        """Write the buffered blocks in one batch; returns how many. Lost if the backend is down."""
        items = list(self.pending.items())
        self.pending.clear()
        self._backend(lambda: self.backend.put_many(items), None)
        return len(items)

    def prestage(self, keys: Sequence[TierKey]) -> int:
        """Fetch ``keys`` ahead of need (a routed request); returns how many are now staged."""
        names = [n for n in (_name(k) for k in keys) if n not in self.staged and n not in self.pending]
        names = names[: self.staging_blocks]
        none: list[bytes | None] = [None] * len(names)
        got = self._backend(lambda: self.backend.get_many(names), none)
        fetched = [(name, value) for name, value in zip(names, got, strict=True) if value is not None]
        self.staged.extend(fetched)
        return len(fetched)

    def remove(self, key: TierKey) -> bool:
        name = _name(key)
        here = self.pending.pop(name, None) is not None
        here |= self.staged.pop(name) is not None
        return self._backend(lambda: self.backend.delete(name), False) or here

    def __len__(self) -> int:
        return self._backend(self.backend.count, 0, count=False) + len(self.pending)

    @property
    def stats(self) -> TierStats:
        snapshot = super().stats
        snapshot.evictions = self._backend(lambda: self.backend.evictions, 0, count=False)
        return snapshot
