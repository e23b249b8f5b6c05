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

import logging
import os
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
        self._header = bytearray(codec.HEADER_BYTES)
        self._scan()

    # ---- paths and index -----------------------------------------------------------------------

    def path(self, key: TierKey) -> Path:
        return self.root / key.layout.digest.hex() / (key.key.hex() + SUFFIX)

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
        if not self.path(key).is_file():
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
        if index in self.lru or self._adopt(key):
            block = self._read(key, out)
        s = self._stats
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
        path = self.path(key)
        index = (layout.digest, key.key)
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
        payload = codec.tensor_bytes(block.contiguous() if block.device.type == "cpu" else block.cpu())
        header = codec.encode_header(key, payload)
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        self._tmp_counter += 1
        tmp = path.parent / f".{path.name}.{os.getpid()}.{self._tmp_counter}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, [memoryview(header), payload])
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
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
        digest, key = index
        (self.root / digest.hex() / (key.hex() + SUFFIX)).unlink(missing_ok=True)
        if evicted:
            self._stats.evictions += 1


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    for buf in buffers:
        view = buf.cast("B")
        while view.nbytes:
            written = os.write(fd, view)
            view = view[written:]
