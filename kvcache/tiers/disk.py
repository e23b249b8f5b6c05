"""G3: local disk, one file per block under a directory of the user's choice.

    <root>/<layout digest hex>/<block key hex>.kvb        (``codec`` header + raw tensor bytes)

- Writes are atomic: a temporary file in the same directory, then ``os.replace``; a reader sees
  a whole old file, a whole new file, or none. ``fsync=True`` adds durability against power loss.
- Every read checks the header (magic, version, layout, key, size) and the payload's xxh3_64
  checksum. A corrupt, truncated or foreign file is a counted miss: it is removed, a warning is
  logged, and the caller recomputes. It is never served.
- Reads go straight into the destination tensor (one ``preadv`` into the header buffer and the
  tensor's own bytes), and the checksum runs over that memory: no intermediate copy.
- Persistent: a new process (or another process sharing the directory) finds what earlier ones
  stored, by scanning the directory at start and by checking the file system on an index miss.

Not here: eviction policy beyond LRU within ``capacity_blocks`` (the hierarchy decides what to
demote into this tier), and any in-memory cache of file contents (the OS page cache is that).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import torch

from kvcache.errors import CorruptBlockError, TierError
from kvcache.tiers import codec
from kvcache.tiers.base import LayoutFingerprint, Tier, TierKey

log = logging.getLogger(__name__)

SUFFIX = ".kvb"
_Index = tuple[bytes, bytes]  # (layout digest, block key)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DiskTier(Tier):
    name = "G3"

    def __init__(self, root: str | os.PathLike[str], capacity_blocks: int, fsync: bool = False) -> None:
        super().__init__(capacity_blocks)
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TierError(
                f"G3 directory {self.root} cannot be created: {exc}; pick a writable path"
            ) from exc
        self.fsync = fsync
        self.lru: OrderedDict[_Index, None] = OrderedDict()
        self.layouts: dict[bytes, LayoutFingerprint] = {}
        self._tmp_counter = 0
        self._dirs: dict[bytes, str] = {}
        self._made: set[bytes] = set()  # layout folders known to exist
        self._header = bytearray(codec.HEADER_BYTES)
        self._scan()

    # ---- paths and index -----------------------------------------------------------------------

    def path(self, key: TierKey) -> Path:
        return Path(self._file(key.layout.digest, key.key))

    def _file(self, digest: bytes, key: bytes) -> str:
        folder = self._dirs.get(digest)
        if folder is None:
            folder = self._dirs[digest] = os.path.join(self.root, digest.hex())
        return os.path.join(folder, key.hex() + SUFFIX)

    def _scan(self) -> None:
        """Index the files earlier processes left, oldest first; drop their dead temp files."""
        found: list[tuple[float, _Index]] = []
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            try:
                digest = bytes.fromhex(sub.name)
            except ValueError:
                continue
            for entry in os.scandir(sub):
                name = entry.name
                if name.startswith("."):
                    pid = name.rsplit(".", 3)[-3] if name.count(".") >= 3 else ""
                    if name.endswith(".tmp") and pid.isdigit() and not _pid_alive(int(pid)):
                        os.unlink(entry.path)
                    continue
                if not name.endswith(SUFFIX):
                    continue
                try:
                    key = bytes.fromhex(name[: -len(SUFFIX)])
                except ValueError:
                    continue
                found.append((entry.stat().st_mtime, (digest, key)))
        for _, index in sorted(found):
            self.lru[index] = None
        while len(self.lru) > self.capacity_blocks:
            self._drop(next(iter(self.lru)), evicted=True)

    def _adopt(self, key: TierKey) -> bool:
        """Index a file another process stored since we scanned."""
        if not os.path.isfile(self._file(key.layout.digest, key.key)):
            return False
        self._make_room()
        self.lru[(key.layout.digest, key.key)] = None
        return True

    # ---- verbs ---------------------------------------------------------------------------------

    def contains(self, key: TierKey) -> bool:
        index = (key.layout.digest, key.key)
        return index in self.lru or self._adopt(key)

    def __len__(self) -> int:
        return len(self.lru)

    def load(self, key: TierKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        index = (key.layout.digest, key.key)
        block = None
        started = time.perf_counter()
        if index in self.lru or self._adopt(key):
            block = self._read(key, out)
        s = self._stats
        s.stall_ms += (time.perf_counter() - started) * 1e3
        if block is None:
            s.misses += 1
            return None
        self.lru.move_to_end(index)
        s.hits += 1
        s.blocks_out += 1
        s.bytes_out += key.layout.block_nbytes
        return block

    def _read(self, key: TierKey, out: torch.Tensor | None) -> torch.Tensor | None:
        """The verified block of an indexed key; a bad file is dropped, counted and reported."""
        layout = key.layout
        self.layouts[layout.digest] = layout
        if out is None:
            out = torch.empty(layout.block_shape, dtype=layout.torch_dtype)
        else:
            layout.check_block(out)
        payload = codec.tensor_bytes(out)
        index = (layout.digest, key.key)
        path = self._file(*index)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # removed by another process since we indexed it
            del self.lru[index]
            return None
        try:
            size = os.fstat(fd).st_size
            expected = codec.HEADER_BYTES + layout.block_nbytes
            if size != expected:
                raise CorruptBlockError(f"file is {size} bytes, expected {expected} (truncated or foreign)")
            got = os.preadv(fd, [self._header, payload], 0)
            if got != expected:
                raise CorruptBlockError(f"read {got} of {expected} bytes")
            codec.verify_payload(codec.decode_header(self._header, key), payload)
        except CorruptBlockError as exc:
            log.warning("G3: dropped corrupt block file %s: %s", path, exc)
            self._stats.corrupt += 1
            self._drop(index, evicted=False)
            return None
        finally:
            os.close(fd)
        return out

    def store(self, key: TierKey, block: torch.Tensor) -> None:
        layout = key.layout
        layout.check_block(block)
        self.layouts[layout.digest] = layout
        index = (layout.digest, key.key)
        if index in self.lru:  # same key and layout = same bytes: refresh, do not rewrite
            self.lru.move_to_end(index)
            return
        self._make_room()
        payload = codec.tensor_bytes(block.cpu().contiguous())
        header = codec.encode_header(key, payload)
        path = self._file(*index)
        if layout.digest not in self._made:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._made.add(layout.digest)
        self._tmp_counter += 1
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.{self._tmp_counter}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, [memoryview(header), payload])
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        self.lru[index] = None
        s = self._stats
        s.blocks_in += 1
        s.bytes_in += layout.block_nbytes

    def remove(self, key: TierKey) -> bool:
        index = (key.layout.digest, key.key)
        if index not in self.lru:
            return False
        self._drop(index, evicted=False)
        return True

    # ---- capacity ------------------------------------------------------------------------------

    def _make_room(self) -> None:
        while len(self.lru) >= self.capacity_blocks:
            index = next(iter(self.lru))
            layout = self.layouts.get(index[0])
            if self.on_evict is not None and layout is not None:
                key = TierKey(index[1], layout)
                block = self._read(key, None)
                if block is not None:
                    self.on_evict(key, block)
                if index not in self.lru:  # the read found it corrupt and already dropped it
                    continue
            self._drop(index, evicted=True)

    def _drop(self, index: _Index, evicted: bool) -> None:
        self.lru.pop(index, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(*index))
        if evicted:
            self._stats.evictions += 1


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    """Write every buffer in order: one ``writev`` call, more only after a short write."""
    views = [b.cast("B") for b in buffers]
    while views:
        written = os.writev(fd, views)
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views:
            views[0] = views[0][written:]
