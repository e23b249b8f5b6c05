"""G3 against a hostile or full file system: planted non-files and failed writes are counted misses
and drops, never an exception, a hang or wrong bytes."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch
from tiers_helpers import LAYOUT, block, key, same_bits

from kvcache.tiers import DiskTier, Hierarchy, HostTier


def _load_in_thread(tier: DiskTier, fifo: Path) -> list[object]:
    """``tier.load(key(1))`` on a daemon thread; a read stuck on the FIFO is released by opening its
    write end, so a regression fails the test instead of hanging the suite."""
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(tier.load(key(1))), daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(timeout=20)
        pytest.fail("DiskTier.load blocked on a FIFO")
    return result


def test_a_directory_planted_under_a_block_name_is_a_miss(tmp_path: Path) -> None:
    planted = Path(DiskTier(tmp_path, 8).path(key(1)))
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.mkdir()  # before the tier starts: the scan must not index it
    tier = DiskTier(tmp_path, 8)
    assert len(tier) == 0 and not tier.contains(key(1))
    assert tier.load(key(1)) is None
    s = tier.stats
    assert (s.hits, s.misses, s.corrupt) == (0, 1, 0)
    assert planted.is_dir()  # left alone: the tier removes only what it wrote
    tier.store(key(2), block(2))  # the tier keeps working around it
    assert same_bits(tier.load(key(2)), block(2))


def test_a_fifo_in_place_of_an_indexed_block_file_is_a_counted_miss(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 8)
    tier.store(key(1), block(1))
    path = tier.path(key(1))
    path.unlink()
    os.mkfifo(path)
    assert tier.contains(key(1))  # still indexed: only the read finds out
    assert _load_in_thread(tier, path) == [None]
    s = tier.stats
    assert (s.hits, s.misses, s.corrupt) == (0, 1, 1)
    assert not path.exists() and not tier.contains(key(1))
    tier.store(key(1), block(1))  # recomputed and stored again
    assert same_bits(tier.load(key(1)), block(1))


def test_a_fifo_present_at_start_is_never_indexed(tmp_path: Path) -> None:
    path = Path(DiskTier(tmp_path, 8).path(key(1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    tier = DiskTier(tmp_path, 8)
    assert len(tier) == 0
    assert _load_in_thread(tier, path) == [None]
    assert tier.stats.misses == 1


def test_a_symlink_to_a_valid_block_elsewhere_is_not_followed(tmp_path: Path) -> None:
    """Someone who can write the folder links a block name to a file outside it: refused, even
    though the target is a well-formed block of that very key."""
    elsewhere = DiskTier(tmp_path / "elsewhere", 8)
    elsewhere.store(key(1), block(1))
    tier = DiskTier(tmp_path / "g3", 8)
    tier.store(key(1), block(0))
    indexed = tier.path(key(1))
    indexed.unlink()
    indexed.symlink_to(elsewhere.path(key(1)))  # in place of an indexed file: the read refuses it
    assert tier.load(key(1)) is None
    assert (tier.stats.hits, tier.stats.misses, tier.stats.corrupt) == (0, 1, 1)
    assert not indexed.is_symlink() and elsewhere.path(key(1)).exists()
    unindexed = tier.path(key(2))
    unindexed.symlink_to(elsewhere.path(key(1)))  # a new name: never indexed at all
    assert not tier.contains(key(2)) and tier.load(key(2)) is None
    assert DiskTier(tmp_path / "g3", 8).load(key(2)) is None  # nor by a scan at start
    assert (tier.stats.hits, tier.stats.misses) == (0, 2)


def _disk_full(monkeypatch: pytest.MonkeyPatch, code: int) -> list[int]:
    """Make every G3 write fail with ``code`` until the returned list is cleared."""
    failing = [code]
    real = os.writev

    def writev(fd: int, buffers: list[memoryview]) -> int:
        if failing:
            raise OSError(failing[0], os.strerror(failing[0]))
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
    return failing


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO])
def test_a_failed_write_is_a_counted_drop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    tier = DiskTier(tmp_path, 8)
    tier.store(key(1), block(1))
    failing = _disk_full(monkeypatch, code)
    tier.store(key(2), block(2))  # returns: the block is not kept
    s = tier.stats
    assert (s.dropped_stores, s.blocks_in, len(tier)) == (1, 1, 1)
    assert not tier.contains(key(2)) and tier.load(key(2)) is None
    assert sorted(p.name for p in tier.path(key(1)).parent.iterdir()) == [tier.path(key(1)).name]
    failing.clear()  # space again: stores work
    tier.store(key(2), block(2))
    assert same_bits(tier.load(key(2)), block(2)) and same_bits(tier.load(key(1)), block(1))


def test_disk_full_during_a_demotion_under_load_loses_only_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """G2 of 2 blocks over a full G3: a load's promotion evicts G2's oldest block into G3 (the path
    that used to raise out of ``load``); the load still returns its blocks."""
    g2, g3 = HostTier(LAYOUT, 2), DiskTier(tmp_path, 8)
    h = Hierarchy(LAYOUT, [g2, g3])
    keys = [key(i).key for i in range(3)]
    h.store(keys, torch.stack([block(i) for i in range(3)]))  # key 0 demoted to G3 while it has room
    assert g3.contains(key(0))
    _disk_full(monkeypatch, errno.EFBIG)
    packed = h.load(keys)  # key 0 promoted from G3 to G2, which evicts key 1 into the full G3
    assert packed.shape[0] == 3
    assert all(same_bits(packed[i], block(i)) for i in range(3))
    stats = h.stats()
    assert stats.tiers["G3"].dropped_stores == 1 and stats.blocks_promoted == 1
    assert h.lookup_prefix(keys) == 1 and g2.contains(key(0)) and g2.contains(key(2))


def _plant_folder_link(tier: DiskTier, elsewhere: Path) -> Path:
    """Make ``<root>/<layout digest>`` a symlink to ``elsewhere`` (what a user sharing the folder can do)."""
    folder = tier.path(key(1)).parent
    if folder.exists():
        for leftover in folder.iterdir():
            leftover.rename(elsewhere / leftover.name)
        folder.rmdir()
    folder.symlink_to(elsewhere, target_is_directory=True)
    return folder


def test_a_symlinked_layout_folder_is_never_written_through(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "g3", tmp_path / "elsewhere"
    root.mkdir(mode=0o700)
    elsewhere.mkdir()
    tier = DiskTier(root, 8)
    _plant_folder_link(tier, elsewhere)
    tier.store(key(1), block(1))
    assert list(elsewhere.iterdir()) == []  # no block file and no temporary file outside the root
    s = tier.stats
    assert (s.dropped_stores, s.blocks_in, len(tier)) == (1, 0, 0)
    assert not tier.contains(key(1)) and tier.load(key(1)) is None


def test_a_layout_folder_swapped_for_a_link_is_never_read_or_unlinked_through(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "g3", tmp_path / "elsewhere"
    root.mkdir(mode=0o700)
    elsewhere.mkdir()
    tier = DiskTier(root, 8)
    tier.store(key(1), block(1))
    tier.store(key(2), block(2))
    victim = elsewhere / tier.path(key(1)).name
    _plant_folder_link(tier, elsewhere)  # the block files now sit outside the root, under their names
    assert victim.is_file()
    assert tier.remove(key(2))  # forgotten by the tier, but the file outside the root stays
    assert (elsewhere / tier.path(key(2)).name).is_file()
    assert tier.load(key(1)) is None  # a counted miss, never read through the link
    s = tier.stats
    assert (s.hits, s.misses, s.corrupt) == (0, 1, 1)
    assert victim.is_file() and not tier.contains(key(1))
    fresh = DiskTier(root, 8)  # a new process's scan does not follow it either
    assert len(fresh) == 0 and victim.is_file()
