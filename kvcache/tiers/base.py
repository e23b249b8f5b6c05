"""The tier interface: keys that name a block's layout, per-tier counters, and the ``Tier`` base.

A tier holds whole KV blocks, each one tensor ``[num_layers, 2, block_size, kv_heads, head_dim]``
(index 0 of dim 1 = K, 1 = V), under a ``TierKey``: the 16-byte block key of the hash chain plus
the ``LayoutFingerprint`` of the model that computed it. Every tier checks the fingerprint on
store and on load, so a tier can never hand back bytes of another model, dtype or shape.

Each tier implements five single-block verbs (``contains``, ``load``, ``store``, ``remove``,
``__len__``) and exposes ``capacity_blocks`` and ``stats``; the batched forms
(``lookup_prefix``, ``load_many``, ``store_many``, ``remove_many``) default to loops and a tier
overrides them where it can batch (one Redis pipeline, one pool gather).

Not here: moving blocks between tiers (``hierarchy``) and deciding whether to (``policy``).
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvcache.cache import hashing
from kvcache.errors import TierError

# dtype name <-> one-byte code, for the stored header. Names are torch's attribute names.
DTYPE_CODES: dict[str, int] = {
    "float32": 1,
    "float16": 2,
    "bfloat16": 3,
    "float64": 4,
    "int8": 5,
    "uint8": 6,
    "float8_e4m3fn": 7,
    "float8_e5m2": 8,
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_CODES:
        raise TierError(f"dtype {dtype} cannot be stored in a tier; supported: {sorted(DTYPE_CODES)}")
    return name


@dataclass(frozen=True, slots=True)
class LayoutFingerprint:
    """Everything that changes a block's bytes besides its tokens.

    ``weights`` names the exact weights (``hf.weights_digest``, computed once when the model is
    loaded): two checkpoints of one ``model_id`` and shape never share a tier entry. An engine
    always sets it; it is empty only for tiers used on their own (tests, benchmarks)."""

    model_id: str
    dtype: str  # torch attribute name: "bfloat16", "float32", ...
    num_layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    weights: bytes = b""
    # Derived once (every store and load needs them): not part of equality or hashing.
    torch_dtype: torch.dtype = field(init=False, repr=False, compare=False)
    block_shape: tuple[int, int, int, int, int] = field(init=False, repr=False, compare=False)
    block_nbytes: int = field(init=False, repr=False, compare=False)
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CODES:
            raise TierError(f"dtype={self.dtype!r} is not storable; use one of {sorted(DTYPE_CODES)}")
        for name in ("num_layers", "kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise TierError(f"{name}={value!r} must be a positive integer")
        if not self.model_id:
            raise TierError("model_id must be a non-empty string")
        if not isinstance(self.weights, bytes) or len(self.weights) > 64:
            raise TierError(f"weights={self.weights!r} must be a digest of at most 64 bytes")
        dtype = getattr(torch, self.dtype)
        # ``block_shape``: [num_layers, 2, block_size, kv_heads, head_dim], one block, contiguous.
        shape = (self.num_layers, 2, self.block_size, self.kv_heads, self.head_dim)
        numel = shape[0] * shape[1] * shape[2] * shape[3] * shape[4]
        setattr_ = object.__setattr__
        setattr_(self, "torch_dtype", dtype)
        setattr_(self, "block_shape", shape)
        setattr_(self, "block_nbytes", numel * dtype.itemsize)
        # ``digest``: 16 bytes naming this layout, in every stored block's header and file path.
        setattr_(self, "digest", hashing.link(b"kvcache-tier-layout", self.encode()))

    @classmethod
    def of_pool(cls, model_id: str, pool: torch.Tensor, weights: bytes = b"") -> LayoutFingerprint:
        """The fingerprint of a paged pool ``[L, 2, num_blocks, block_size, kv_heads, head_dim]``
        holding KV of the weights named ``weights``."""
        if pool.dim() != 6 or pool.shape[1] != 2:
            raise TierError(
                f"pool shape {tuple(pool.shape)} is not [L, 2, num_blocks, bs, kv_heads, head_dim]"
            )
        num_layers, _, _, block_size, kv_heads, head_dim = pool.shape
        return cls(model_id, dtype_name(pool.dtype), num_layers, kv_heads, head_dim, block_size, weights)

    def encode(self) -> bytes:
        """Canonical bytes: length-prefixed model id, the numbers as little-endian uint32, then the
        length-prefixed weights digest."""
        model = self.model_id.encode("utf-8")
        dims = (DTYPE_CODES[self.dtype], self.num_layers, self.kv_heads, self.head_dim, self.block_size)
        weights = struct.pack("<I", len(self.weights)) + self.weights
        return struct.pack("<I", len(model)) + model + struct.pack("<5I", *dims) + weights

    def check_block(self, block: torch.Tensor) -> None:
        """Raise ``TierError`` unless ``block`` is one block of this layout."""
        if tuple(block.shape) != self.block_shape or block.dtype != self.torch_dtype:
            raise TierError(
                f"block of shape {tuple(block.shape)} {block.dtype} does not match layout "
                f"{list(self.block_shape)} {self.dtype} of model {self.model_id!r}"
            )


@dataclass(frozen=True, slots=True)
class TierKey:
    """A block key (16 bytes, ``hashing.KEY_BYTES``) with the layout its bytes were computed in."""

    key: bytes
    layout: LayoutFingerprint

    def __post_init__(self) -> None:
        if len(self.key) != hashing.KEY_BYTES:
            raise TierError(
                f"block key of {len(self.key)} bytes; tiers take the block manager's "
                f"{hashing.KEY_BYTES}-byte keys"
            )


@dataclass(slots=True)
class TierStats:
    """Counters of one tier. ``*_in`` = stored into the tier, ``*_out`` = loaded from it."""

    hits: int = 0
    misses: int = 0
    blocks_in: int = 0
    blocks_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    evictions: int = 0
    corrupt: int = 0  # blocks found damaged on read: counted as misses, removed, never served
    errors: int = 0  # backend failures (Redis unreachable): counted as misses
    dropped_stores: int = 0  # stores that failed (disk full, file size limit): the block is not kept
    cross_worker_hits: int = 0  # shared tier: hits on blocks another worker stored
    prestaged_loads: int = 0
    sync_loads: int = 0
    stall_ms: float = 0.0  # time loads waited on this tier: measured host time (G1-G3), modelled (ICMS)
    occupancy_blocks: int = 0
    capacity_blocks: int = 0

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}


EvictFn = Callable[[TierKey, torch.Tensor], None]


class Tier(ABC):
    """One level of the spill hierarchy, holding whole blocks of any number of layouts.

    ``shared``: every worker of a pod reads the tier (ICMS). The hierarchy writes every offloaded
    block behind to it, and a prefetch on routing stages its blocks (``prestage``) instead of
    copying them up; a private tier (G2, G3) is a link in the demotion chain instead."""

    name: str = "tier"
    shared: bool = False

    def __init__(self, capacity_blocks: int) -> None:
        if not isinstance(capacity_blocks, int) or capacity_blocks <= 0:
            raise TierError(f"{self.name}: capacity_blocks={capacity_blocks!r} must be a positive integer")
        self.capacity_blocks = capacity_blocks
        self._stats = TierStats(capacity_blocks=capacity_blocks)
        # Called with a block's key and bytes before capacity pressure drops it, so the
        # hierarchy can demote it to the next tier. Set by the hierarchy; must not raise.
        self.on_evict: EvictFn | None = None

    # ---- single-block verbs ------------------------------------------------------------------

    @abstractmethod
    def contains(self, key: TierKey) -> bool:
        """Whether the tier holds ``key`` now (no counters change)."""

    @abstractmethod
    def load(self, key: TierKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The block stored under ``key`` (written into ``out`` when given), or None on a miss.

        A damaged or unreachable block is a miss, counted in ``stats``; never an exception."""

    @abstractmethod
    def store(self, key: TierKey, block: torch.Tensor) -> None:
        """Keep a copy of ``block`` under ``key``, evicting the least recently used when full.

        A copy the medium cannot take (disk full) is a counted drop (``dropped_stores``), never an
        exception: a tier is a cache, and the block is recomputed when next needed."""

    @abstractmethod
    def remove(self, key: TierKey) -> bool:
        """Drop ``key``; returns whether it was held."""

    @abstractmethod
    def __len__(self) -> int:
        """Blocks held now."""

    # ---- batched forms: loops unless a tier can do better --------------------------------------

    def contains_many(self, keys: Sequence[TierKey]) -> list[bool]:
        return [self.contains(key) for key in keys]

    def lookup_prefix(self, keys: Sequence[TierKey]) -> int:
        """How many leading ``keys`` the tier holds."""
        n = 0
        for key in keys:
            if not self.contains(key):
                break
            n += 1
        return n

    def load_many(
        self, keys: Sequence[TierKey], outs: Sequence[torch.Tensor | None] | None = None
    ) -> list[torch.Tensor | None]:
        """Blocks of ``keys`` (None for each miss), written into ``outs[i]`` where given."""
        if outs is None:
            return [self.load(key) for key in keys]
        return [self.load(key, out) for key, out in zip(keys, outs, strict=True)]

    def store_many(self, keys: Sequence[TierKey], blocks: Sequence[torch.Tensor]) -> None:
        if len(keys) != len(blocks):
            raise TierError(f"{len(keys)} keys for {len(blocks)} blocks; pass one key per block")
        for key, block in zip(keys, blocks, strict=True):
            self.store(key, block)

    def remove_many(self, keys: Sequence[TierKey]) -> int:
        return sum(self.remove(key) for key in keys)

    # ---- shared tiers ---------------------------------------------------------------------------

    def prestage(self, keys: Sequence[TierKey]) -> int:
        """Fetch ``keys`` ahead of need (a routed request); returns how many are now staged. A
        private tier stages nothing."""
        return 0

    def flush(self) -> int:
        """Finish buffered writes; returns how many blocks were written. Nothing by default."""
        return 0

    @property
    def stats(self) -> TierStats:
        """A snapshot of the counters, with occupancy filled in."""
        s = self._stats
        snapshot = TierStats(**{name: getattr(s, name) for name in TierStats.__slots__})
        snapshot.occupancy_blocks = len(self)
        snapshot.capacity_blocks = self.capacity_blocks
        return snapshot


@dataclass(frozen=True, slots=True)
class TransferModel:
    """Time to move blocks between a tier and the device: a fixed latency per read, a cost per
    block (request overhead), and bytes over a bandwidth.

        transfer_ms(n, nbytes) = base_latency_ms + n * per_block_ms + nbytes / bandwidth   (n > 0)
    """

    bandwidth_bytes_per_s: float
    base_latency_ms: float = 0.0
    per_block_ms: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s > 0:
            raise TierError(f"bandwidth_bytes_per_s={self.bandwidth_bytes_per_s} must be > 0")
        if self.base_latency_ms < 0 or self.per_block_ms < 0:
            raise TierError(
                f"latencies must be >= 0: base {self.base_latency_ms} ms, per block {self.per_block_ms} ms"
            )

    def transfer_ms(self, num_blocks: int, nbytes: int) -> float:
        if num_blocks <= 0:
            return 0.0
        return (
            self.base_latency_ms + num_blocks * self.per_block_ms + nbytes / self.bandwidth_bytes_per_s * 1e3
        )
