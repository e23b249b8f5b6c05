"""Tier bandwidth against the machine's own limits, side by side in one run.

- G2 (host slab) store/load of one block vs a plain ``copy_`` of the same bytes between two
  preallocated tensors.
- G3 (disk) store/load of one block vs a plain file write (unlink, create, write, close) and a
  plain read (open, ``preadv`` into a preallocated buffer, close) of the same bytes, page cache
  warm. G3 does more by design: a header, temp file + rename, and an xxh3_64 checksum over
  every byte it reads.
- G1<->G2 on a GPU (skipped without CUDA): ``HostTier.store``/``load`` of 64 device blocks vs one
  large pinned host<->device copy of the same bytes, the best ``torch`` achieves.

``g3-load`` also shows the floor of any verified read (plain read, then the checksum) and G3 with
a tier secret (every block checked by a keyed BLAKE3 MAC instead of the checksum).
- ICMS decode: a value fetched from the pod tier's backend, verified and copied into the block
  tensor (checksum, keyed BLAKE3), vs a plain copy of its payload.
- MACs over one block's bytes, the choice behind ``kvcache.tiers.seal``: xxh3_64 (the checksum;
  the baseline), keyed BLAKE3 (one thread, as the tiers run it, and on all cores), keyed BLAKE2b,
  HMAC-SHA256.
- A verified copy, the ways to hide the MAC behind the copy: a plain copy of one block (the
  baseline) vs keyed BLAKE3 then the copy (as the tiers run it), BLAKE3 on all cores then the copy,
  BLAKE3 on a second thread while the copy runs, and copy + BLAKE3 fused in 256 KiB chunks (each
  chunk hashed while still in cache).
Blocks of 1 MiB and 16 MiB (bf16 KV blocks of 8B-class shapes). Run: ``make bench`` or
``pytest benches/bench_tiers.py --benchmark-only``; the summary prints GB/s and ratios.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest
import torch

from kvcache.cache import hashing
from kvcache.tiers import DiskTier, HostTier, LayoutFingerprint, TierKey, codec
from kvcache.tiers.seal import Seal

LAYOUTS = {
    "1MiB": LayoutFingerprint("bench", "bfloat16", num_layers=8, kv_heads=4, head_dim=128, block_size=64),
    "16MiB": LayoutFingerprint("bench", "bfloat16", num_layers=32, kv_heads=8, head_dim=128, block_size=128),
}
ROUNDS = 40
SECRET = b"benchmark secret, 32 bytes long."


def _block(layout: LayoutFingerprint, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(layout.block_shape, generator=gen).to(layout.torch_dtype).to(device)


def _key(i: int, layout: LayoutFingerprint) -> TierKey:
    return TierKey(i.to_bytes(16, "little"), layout)


def _run(benchmark, fn, nbytes: int) -> None:  # type: ignore[no-untyped-def]
    benchmark.extra_info["bytes"] = nbytes
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=3)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Copies are memory-bound: one thread, so a busy shared machine cannot stall a second one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> LayoutFingerprint:
    return LAYOUTS[request.param]


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Under the same file system the G3 tier would use by default (the working directory's /tmp).
    path = tmp_path_factory.mktemp("g3")
    yield path


# ---- G2: host memory ---------------------------------------------------------------------------


def test_g2_store_baseline_copy(benchmark, layout: LayoutFingerprint) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"g2-store-{layout.block_nbytes >> 20}MiB"
    src, dst = _block(layout), torch.empty(layout.block_shape, dtype=layout.torch_dtype)
    _run(benchmark, lambda: dst.copy_(src), layout.block_nbytes)


def test_g2_store_ours(benchmark, layout: LayoutFingerprint) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"g2-store-{layout.block_nbytes >> 20}MiB"
    tier, src = HostTier(layout, 4), _block(layout)
    _run(benchmark, lambda: tier.store(_key(1, layout), src), layout.block_nbytes)


def test_g2_load_baseline_copy(benchmark, layout: LayoutFingerprint) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"g2-load-{layout.block_nbytes >> 20}MiB"
    src, dst = _block(layout), torch.empty(layout.block_shape, dtype=layout.torch_dtype)
    _run(benchmark, lambda: dst.copy_(src), layout.block_nbytes)


def test_g2_load_ours(benchmark, layout: LayoutFingerprint) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"g2-load-{layout.block_nbytes >> 20}MiB"
    tier, out = HostTier(layout, 4), torch.empty(layout.block_shape, dtype=layout.torch_dtype)
    tier.store(_key(1, layout), _block(layout))
    _run(benchmark, lambda: tier.load(_key(1, layout), out), layout.block_nbytes)


# ---- G3: local disk ----------------------------------------------------------------------------


def test_g3_store_baseline_write(benchmark, layout: LayoutFingerprint, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"g3-store-{layout.block_nbytes >> 20}MiB"
    data = _block(layout).view(-1).view(torch.uint8).numpy()
    path = workdir / "plain.bin"

    def write() -> None:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, memoryview(data))
        os.close(fd)

    _run(benchmark, write, layout.block_nbytes)


def test_g3_store_ours(benchmark, layout: LayoutFingerprint, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"g3-store-{layout.block_nbytes >> 20}MiB"
    tier, src, key = DiskTier(workdir, 8), _block(layout), _key(1, layout)

    def store() -> None:
        tier.remove(key)  # a fresh write each round, as the baseline does
        tier.store(key, src)

    _run(benchmark, store, layout.block_nbytes)


def test_g3_load_baseline_read(benchmark, layout: LayoutFingerprint, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"g3-load-{layout.block_nbytes >> 20}MiB"
    path = workdir / "plain.bin"
    path.write_bytes(_block(layout).view(-1).view(torch.uint8).numpy().tobytes())
    buf = memoryview(bytearray(layout.block_nbytes))

    def read() -> None:
        fd = os.open(path, os.O_RDONLY)
        os.preadv(fd, [buf], 0)
        os.close(fd)

    _run(benchmark, read, layout.block_nbytes)


def test_g3_load_read_plus_checksum(benchmark, layout: LayoutFingerprint, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    """The floor of any verified read: the plain read, then xxh3_64 over the bytes read."""
    benchmark.group = f"g3-load-{layout.block_nbytes >> 20}MiB"
    path = workdir / "plain.bin"
    path.write_bytes(_block(layout).view(-1).view(torch.uint8).numpy().tobytes())
    buf = memoryview(bytearray(layout.block_nbytes))

    def read() -> None:
        fd = os.open(path, os.O_RDONLY)
        os.preadv(fd, [buf], 0)
        os.close(fd)
        hashing.checksum(buf)

    _run(benchmark, read, layout.block_nbytes)


@pytest.mark.parametrize("sealed", ["checksum", "keyed"])
def test_g3_load_ours(benchmark, layout: LayoutFingerprint, workdir: Path, sealed: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"g3-load-{layout.block_nbytes >> 20}MiB"
    seal = Seal.keyed(SECRET) if sealed == "keyed" else Seal.checksum()
    tier, key = DiskTier(workdir, 8, seal=seal), _key(1, layout)
    tier.store(key, _block(layout))
    out = torch.empty(layout.block_shape, dtype=layout.torch_dtype)

    def load() -> None:
        assert tier.load(key, out) is out

    _run(benchmark, load, layout.block_nbytes)


# ---- ICMS: verifying a fetched value ------------------------------------------------------------


def test_icms_decode_baseline_copy(benchmark, layout: LayoutFingerprint) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"icms-decode-{layout.block_nbytes >> 20}MiB"
    value = codec.encode(_key(1, layout), _block(layout))
    out = torch.empty(layout.block_shape, dtype=layout.torch_dtype)

    def copy() -> None:
        codec.tensor_bytes(out)[:] = memoryview(value)[codec.HEADER_BYTES :]

    _run(benchmark, copy, layout.block_nbytes)


@pytest.mark.parametrize("sealed", ["checksum", "keyed"])
def test_icms_decode_ours(benchmark, layout: LayoutFingerprint, sealed: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"icms-decode-{layout.block_nbytes >> 20}MiB"
    seal = Seal.keyed(SECRET) if sealed == "keyed" else Seal.checksum()
    value = codec.encode(_key(1, layout), _block(layout), seal)
    out = torch.empty(layout.block_shape, dtype=layout.torch_dtype)
    _run(benchmark, lambda: codec.decode(value, _key(1, layout), out, seal), layout.block_nbytes)


# ---- MACs over one block -----------------------------------------------------------------------

MACS = {
    "keyed_blake3": lambda data: blake3.blake3(data, key=SECRET).digest(),
    "keyed_blake3_all_cores": lambda data: blake3.blake3(
        data, key=SECRET, max_threads=blake3.blake3.AUTO
    ).digest(),
    "keyed_blake2b": lambda data: hashlib.blake2b(data, key=SECRET).digest(),
    "hmac_sha256": lambda data: hmac.digest(SECRET, data, "sha256"),
}


def test_mac_baseline_xxh3_checksum(benchmark, layout: LayoutFingerprint) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"mac-{layout.block_nbytes >> 20}MiB"
    data = codec.tensor_bytes(_block(layout))
    _run(benchmark, lambda: hashing.checksum(data), layout.block_nbytes)


@pytest.mark.parametrize("mac", list(MACS))
def test_mac(benchmark, layout: LayoutFingerprint, mac: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"mac-{layout.block_nbytes >> 20}MiB"
    data, fn = codec.tensor_bytes(_block(layout)), MACS[mac]
    _run(benchmark, lambda: fn(data), layout.block_nbytes)


# ---- hiding the MAC behind the copy ------------------------------------------------------------

_CHUNK = 256 << 10


def _mac_then_copy(src: memoryview, dst: memoryview, threads: int = 1) -> None:
    blake3.blake3(src, key=SECRET, max_threads=threads).digest()
    dst[:] = src


def _mac_beside_copy(pool: ThreadPoolExecutor, src: memoryview, dst: memoryview) -> None:
    pending = pool.submit(lambda: blake3.blake3(src, key=SECRET).digest())  # releases the GIL
    dst[:] = src
    pending.result()


def _mac_fused_copy(src: memoryview, dst: memoryview) -> None:
    mac = blake3.blake3(key=SECRET)
    for at in range(0, src.nbytes, _CHUNK):
        dst[at : at + _CHUNK] = src[at : at + _CHUNK]
        mac.update(dst[at : at + _CHUNK])
    mac.digest()


VERIFIED_COPIES = ["mac_then_copy", "mac_all_cores_then_copy", "mac_beside_copy", "mac_fused_copy"]


def test_verified_copy_baseline_copy(benchmark, layout: LayoutFingerprint) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"verified-copy-{layout.block_nbytes >> 20}MiB"
    src, dst = codec.tensor_bytes(_block(layout)), codec.tensor_bytes(_block(layout))

    def copy() -> None:
        dst[:] = src

    _run(benchmark, copy, layout.block_nbytes)


@pytest.mark.parametrize("how", VERIFIED_COPIES)
def test_verified_copy(benchmark, layout: LayoutFingerprint, how: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"verified-copy-{layout.block_nbytes >> 20}MiB"
    src, dst = codec.tensor_bytes(_block(layout)), codec.tensor_bytes(_block(layout))
    with ThreadPoolExecutor(1) as pool:
        fns = {
            "mac_then_copy": lambda: _mac_then_copy(src, dst),
            "mac_all_cores_then_copy": lambda: _mac_then_copy(src, dst, blake3.blake3.AUTO),
            "mac_beside_copy": lambda: _mac_beside_copy(pool, src, dst),
            "mac_fused_copy": lambda: _mac_fused_copy(src, dst),
        }
        _run(benchmark, fns[how], layout.block_nbytes)


# ---- G1 <-> G2 on a GPU ------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="G1<->G2 needs a CUDA device")
NUM_GPU_BLOCKS = 64


def _sync(fn):  # type: ignore[no-untyped-def]
    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


@needs_cuda
@pytest.mark.parametrize("direction", ["d2h", "h2d"])
def test_g1_g2_baseline_one_pinned_copy(benchmark, layout: LayoutFingerprint, direction: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"g1-g2-{direction}-{layout.block_nbytes >> 20}MiB-x{NUM_GPU_BLOCKS}"
    shape = (NUM_GPU_BLOCKS, *layout.block_shape)
    dev = torch.empty(shape, dtype=layout.torch_dtype, device="cuda")
    host = torch.empty(shape, dtype=layout.torch_dtype, pin_memory=True)
    src, dst = (dev, host) if direction == "d2h" else (host, dev)
    _run(benchmark, _sync(lambda: dst.copy_(src, non_blocking=True)), NUM_GPU_BLOCKS * layout.block_nbytes)


@needs_cuda
@pytest.mark.parametrize("direction", ["d2h", "h2d"])
def test_g1_g2_ours(benchmark, layout: LayoutFingerprint, direction: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"g1-g2-{direction}-{layout.block_nbytes >> 20}MiB-x{NUM_GPU_BLOCKS}"
    tier = HostTier(layout, NUM_GPU_BLOCKS)
    dev = torch.empty((NUM_GPU_BLOCKS, *layout.block_shape), dtype=layout.torch_dtype, device="cuda")
    keys = [_key(i, layout) for i in range(NUM_GPU_BLOCKS)]
    for k, b in zip(keys, dev, strict=True):
        tier.store(k, b)

    def store() -> None:
        for k, b in zip(keys, dev, strict=True):
            tier.store(k, b)

    def load() -> None:
        for k, b in zip(keys, dev, strict=True):
            tier.load(k, b)

    fn = store if direction == "d2h" else load
    _run(benchmark, _sync(fn), NUM_GPU_BLOCKS * layout.block_nbytes)
