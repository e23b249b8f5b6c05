"""G3 on disk: round trips, persistence across processes, and damage that ends in a counted miss."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch
from tiers_helpers import LAYOUT, LAYOUT_F32, block, key, same_bits

from kvcache.child import python_argv
from kvcache.redis_server import start_redis
from kvcache.tiers import DiskTier, IcmsTier, LayoutFingerprint, RedisBackend, TierKey, codec


def test_round_trip_files_and_atomic_names(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 8)
    for layout in (LAYOUT, LAYOUT_F32):
        tier.store(key(1, layout), block(1, layout))
        out = torch.empty(layout.block_shape, dtype=layout.torch_dtype)
        assert tier.load(key(1, layout), out) is out and same_bits(out, block(1, layout))
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted(f"{lay.digest.hex()}/{key(1).key.hex()}.kvb" for lay in (LAYOUT, LAYOUT_F32))
    assert tier.path(key(1)).stat().st_size == codec.HEADER_BYTES + LAYOUT.block_nbytes
    s = tier.stats
    assert (s.hits, s.misses, s.blocks_in, s.bytes_out, s.occupancy_blocks) == (2, 0, 2, 512 + 1024, 2)


def test_lru_capacity_and_demotion(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 2)
    demoted: list[int] = []

    def on_evict(k: TierKey, b: torch.Tensor) -> None:
        i = int.from_bytes(k.key, "little")
        assert same_bits(b, block(i))
        demoted.append(i)

    tier.on_evict = on_evict
    for i in range(2):
        tier.store(key(i), block(i))
    assert tier.load(key(0)) is not None
    tier.store(key(2), block(2))
    assert demoted == [1] and not tier.path(key(1)).exists() and len(tier) == 2
    assert tier.stats.evictions == 1


WRITER = """
import sys, torch
sys.path.insert(0, {tests!r})
from tiers_helpers import key, block
from kvcache.tiers import DiskTier, IcmsTier, RedisBackend
tier = DiskTier({root!r}, 16)
pod = IcmsTier(RedisBackend({url!r}, 100), worker_id=7)
for i in range(3):
    tier.store(key(i), block(i))
    pod.store(key(10 + i), block(10 + i))
pod.flush()
"""


def test_a_new_process_finds_what_another_stored(tmp_path: Path) -> None:
    """On local disk (G3) and in the Redis-backed shared tier alike."""
    root = tmp_path / "g3"
    reader = DiskTier(root, 16)  # running before the writer: learns of its files on lookup
    with start_redis() as server:
        code = WRITER.format(tests=str(Path(__file__).parent), root=str(root), url=server.url)
        subprocess.run([*python_argv(), "-c", code], check=True, timeout=120)
        pod = IcmsTier(RedisBackend(server.url, 100), worker_id=0)
        got = pod.load_many([key(10), key(11), key(12)])
        assert all(same_bits(b, block(10 + i)) for i, b in enumerate(got) if b is not None)
        assert pod.stats.hits == pod.stats.cross_worker_hits == 3
    assert reader.lookup_prefix([key(0), key(1), key(2), key(3)]) == 3
    fresh = DiskTier(root, 16)  # started after: finds them by scanning
    assert len(fresh) == 3
    assert all(same_bits(fresh.load(key(i)), block(i)) for i in range(3))


def _corrupt_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[codec.HEADER_BYTES + 77] ^= 1
    path.write_bytes(bytes(data))


def _corrupt_truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(codec.HEADER_BYTES + 100)


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[70] ^= 0xFF  # payload checksum field: the header checksum catches it
    path.write_bytes(bytes(data))


def _corrupt_swap(path: Path) -> None:
    """Another key's valid file under this key's name."""
    other = path.with_name(key(2).key.hex() + ".kvb")
    os.replace(other, path)


@pytest.mark.parametrize("damage", [_corrupt_flip, _corrupt_truncate, _corrupt_header, _corrupt_swap])
def test_damaged_file_is_a_counted_miss_removed_and_reported(
    tmp_path: Path,
    damage,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    tier = DiskTier(tmp_path, 8)
    tier.store(key(1), block(1))
    tier.store(key(2), block(2))
    damage(tier.path(key(1)))
    out = torch.zeros(LAYOUT.block_shape, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="kvcache.tiers.disk"):
        assert tier.load(key(1), out) is None
    assert "dropped corrupt block file" in caplog.text
    assert not tier.path(key(1)).exists() and not tier.contains(key(1))
    s = tier.stats
    assert (s.corrupt, s.misses, s.hits) == (1, 1, 0)
    tier.store(key(1), block(1))  # recomputed and stored again: served correctly
    assert same_bits(tier.load(key(1)), block(1))


def test_a_file_of_another_layout_under_this_layout_is_a_miss(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 8)
    same_shape = LayoutFingerprint("other-model", "bfloat16", 2, 2, 8, 4)
    tier.store(TierKey(key(1).key, same_shape), block(1))
    src = tier.path(TierKey(key(1).key, same_shape))
    dst = tier.path(key(1))
    dst.parent.mkdir()
    os.replace(src, dst)
    fresh = DiskTier(tmp_path, 8)
    assert fresh.load(key(1)) is None and fresh.stats.corrupt == 1


def test_dead_temp_files_are_cleaned_at_start(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 8)
    tier.store(key(1), block(1))
    stale = tier.path(key(1)).parent / f".x.kvb.{2**22 + 12345}.1.tmp"
    stale.write_bytes(b"partial")
    DiskTier(tmp_path, 8)
    assert not stale.exists() and tier.path(key(1)).exists()
