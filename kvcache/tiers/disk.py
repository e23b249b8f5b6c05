"""G3: local disk, one file per block under a directory of the user's choice.

    <root>/<layout digest hex>/<block key hex>.kvb        (``codec`` header + raw tensor bytes)

- Writes are atomic: a private temporary file (``O_EXCL|O_NOFOLLOW``, mode 0600) in the same
  directory, then ``os.replace``; a reader sees a whole old file, a whole new file, or none.
  ``fsync=True`` adds durability against power loss. A write that fails (disk full, ``EFBIG``
  under a file size limit, quota, I/O error) is a counted drop (``stats.dropped_stores``, a
  warning): the block is recomputed when next needed, and the caller never sees an error.
- Every read opens with ``O_NOFOLLOW|O_NONBLOCK``, requires a regular file of exactly the block's
  size, then checks the header (magic, version, seal kind, layout, key, size) and the tag: an
  xxh3_64 checksum, or with a tier secret a keyed BLAKE3 MAC (``seal``). A corrupt, truncated,
  forged or foreign file, a directory, FIFO or symlink under a block's name is a counted miss: it is
  dropped (a non-file is left in place but never indexed), a warning is logged, and the caller
  recomputes. It is never served, and no read can block.
- A folder other users can write needs a tier secret: without one the tier refuses to start,
  since a checksum proves nothing against someone who can write the files.
- Reads go straight into the destination tensor (one ``preadv`` into the header buffer and the
  tensor's own bytes), and the tag runs over that memory: no intermediate copy.
- No link is ever followed below the root: every operation opens the layout folder with
  ``O_DIRECTORY|O_NOFOLLOW`` and then works relative to that descriptor (``dir_fd``), so a symlink
  planted as a layout folder in a shared directory (``<root>/<digest> -> /elsewhere``) makes
  writes there counted drops, reads counted misses and removals no-ops: nothing outside the
  root is written, read or unlinked, and a folder swapped for a link after a check changes nothing.
- Persistent: a new process (or another process sharing the directory) finds what earlier ones
  stored, by scanning the directory at start and by checking the file system on an index miss.

Not here: eviction policy beyond LRU within ``capacity_blocks`` (the hierarchy decides what to
demote into this tier), and any in-memory cache of file contents (the OS page cache is that).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from kvcache.cache.lru import LRU
from kvcache.errors import CorruptBlockError, TierError
from kvcache.tiers import codec
from kvcache.tiers.base import LayoutFingerprint, Tier, TierKey
from kvcache.tiers.seal import SECRET_FILE_ENV, Seal

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

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity_blocks: int,
        fsync: bool = False,
        seal: Seal | None = None,
    ) -> None:
        super().__init__(capacity_blocks)
        self.root = Path(root)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            mode = os.stat(self.root).st_mode
        except OSError as exc:
            raise TierError(
                f"G3 directory {self.root} cannot be created: {exc}; pick a writable path"
            ) from exc
        # ``None``: the deployment secret when one is provisioned, else a checksum.
        self.seal = seal or Seal.from_environment() or codec.CHECKSUM_SEAL
        if not self.seal.authenticated and mode & 0o022:
            raise TierError(
                f"G3 directory {self.root} is writable by other users (mode {stat.filemode(mode)}), so "
                f"anyone could plant blocks that pass a checksum; provision a tier secret "
                f"({SECRET_FILE_ENV}, docs/tiers.md) so blocks carry a MAC, or chmod go-w {self.root}"
            )
        self.fsync = fsync
        self.lru: LRU[_Index, None] = LRU()  # unbounded: _make_room evicts, with side effects
        self.layouts: dict[bytes, LayoutFingerprint] = {}
        self._tmp_counter = 0
        self._dirs: dict[bytes, str] = {}
        self._header = bytearray(codec.HEADER_BYTES)
        self._scan()

    # ---- paths and index -----------------------------------------------------------------------

    def path(self, key: TierKey) -> Path:
        return Path(self._file(key.layout.digest, key.key))

    def _file(self, digest: bytes, key: bytes) -> str:
        """The block's path, for messages and callers; operations go through :meth:`_folder`."""
        return os.path.join(self._dir(digest), key.hex() + SUFFIX)

    def _dir(self, digest: bytes) -> str:
        folder = self._dirs.get(digest)
        if folder is None:
            folder = self._dirs[digest] = os.path.join(self.root, digest.hex())
        return folder

    @contextlib.contextmanager
    def _folder(self, digest: bytes, create: bool = False) -> Iterator[int]:
        """A descriptor of the layout folder, opened without following a link: ``OSError`` (``ELOOP``,
        ``ENOTDIR``, ``ENOENT``) when anything but a real directory is there. File names are then
        resolved relative to it, so nothing can redirect an operation once the folder is open."""
        path = self._dir(digest)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):  # mkdir never follows a link at the last name
                os.mkdir(path, 0o700)
            fd = os.open(path, flags)
        try:
            yield fd
        finally:
            os.close(fd)

    def _scan(self) -> None:
        """Index the files earlier processes left, oldest first; drop their dead temp files.

        Only regular files count: a directory, FIFO, socket or symlink under a block's name (which
        this tier never writes) is skipped, and a symlinked layout folder is not followed."""
        found: list[tuple[float, _Index]] = []
        with os.scandir(self.root) as subs:
            folders = [sub for sub in subs if sub.is_dir(follow_symlinks=False)]
        for sub in folders:
            try:
                digest = bytes.fromhex(sub.name)
            except ValueError:
                continue
            try:
                with self._folder(digest) as folder:
                    found += self._scan_folder(digest, folder)
            except OSError:  # replaced by a link or removed since the listing: not ours to index
                continue
        for _, index in sorted(found):
            self.lru.put(index, None)
        while len(self.lru) > self.capacity_blocks:
            self._drop(next(iter(self.lru)), evicted=True)

    @staticmethod
    def _scan_folder(digest: bytes, folder: int) -> list[tuple[float, _Index]]:
        found: list[tuple[float, _Index]] = []
        for entry in os.scandir(folder):
            name = entry.name
            if name.startswith("."):
                pid = name.rsplit(".", 3)[-3] if name.count(".") >= 3 else ""
                if name.endswith(".tmp") and pid.isdigit() and not _pid_alive(int(pid)):
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=folder)
                continue
            if not name.endswith(SUFFIX) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                key = bytes.fromhex(name[: -len(SUFFIX)])
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except (ValueError, OSError):
                continue
            found.append((mtime, (digest, key)))
        return found

    def _adopt(self, key: TierKey) -> bool:
        """Index a file another process stored since we scanned."""
        try:
            with self._folder(key.layout.digest) as folder:
                mode = os.stat(key.key.hex() + SUFFIX, dir_fd=folder, follow_symlinks=False).st_mode
        except OSError:
            return False
        if not stat.S_ISREG(mode):  # a planted directory, FIFO or symlink is never a block
            return False
        self._make_room()
        self.lru.put((key.layout.digest, key.key), None)
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
        self.lru.touch(index)
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
            # O_NOFOLLOW: a symlink is refused (ELOOP); O_NONBLOCK: a FIFO planted under the name
            # opens at once instead of waiting for a writer, and fstat below rejects it.
            with self._folder(layout.digest) as folder:
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open(key.key.hex() + SUFFIX, flags, dir_fd=folder)
        except FileNotFoundError:  # removed by another process since we indexed it
            self.lru.pop(index)
            return None
        except OSError as exc:
            self._reject(index, path, f"cannot be opened as a block file: {exc}")
            return None
        try:
            info = os.fstat(fd)
            expected = codec.HEADER_BYTES + layout.block_nbytes
            if not stat.S_ISREG(info.st_mode):
                raise CorruptBlockError(f"not a regular file (mode {stat.filemode(info.st_mode)})")
            if info.st_size != expected:
                raise CorruptBlockError(
                    f"file is {info.st_size} bytes, expected {expected} (truncated or foreign)"
                )
            got = os.preadv(fd, [self._header, payload], 0)
            if got != expected:
                raise CorruptBlockError(f"read {got} of {expected} bytes")
            codec.verify(self._header, payload, key, self.seal)
        except (CorruptBlockError, OSError) as exc:
            self._reject(index, path, str(exc))
            return None
        finally:
            os.close(fd)
        return out

    def _reject(self, index: _Index, path: str, reason: str) -> None:
        log.warning("G3: dropped corrupt block file %s: %s", path, reason)
        self._stats.corrupt += 1
        self._drop(index, evicted=False)

    def store(self, key: TierKey, block: torch.Tensor) -> None:
        layout = key.layout
        layout.check_block(block)
        self.layouts[layout.digest] = layout
        index = (layout.digest, key.key)
        if index in self.lru:  # same key and layout = same bytes: refresh, do not rewrite
            self.lru.touch(index)
            return
        self._make_room()
        payload = codec.tensor_bytes(block.cpu().contiguous())
        header = codec.encode_header(key, payload, self.seal)
        path = self._file(*index)
        try:
            self._write(index, header, payload)
        except OSError as exc:  # disk full, file size limit, quota, I/O error: a dropped copy
            s = self._stats
            s.dropped_stores += 1
            if s.dropped_stores & (s.dropped_stores - 1) == 0:  # the 1st, 2nd, 4th, 8th ... failure
                log.warning(
                    "G3: could not write block file %s (%s); %d blocks dropped so far, they will be "
                    "recomputed when needed",
                    path,
                    exc,
                    s.dropped_stores,
                )
            return
        self.lru.put(index, None)
        s = self._stats
        s.blocks_in += 1
        s.bytes_in += layout.block_nbytes

    def _write(self, index: _Index, header: bytes, payload: memoryview) -> None:
        """Write a block file atomically: a private temporary file, then ``os.replace``, both in the
        layout folder as opened without following links (``_folder``)."""
        self._tmp_counter += 1
        name = index[1].hex() + SUFFIX
        tmp = f".{name}.{os.getpid()}.{self._tmp_counter}.tmp"
        # O_EXCL|O_NOFOLLOW: never write through a file or link someone placed under the name.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._folder(index[0], create=True) as folder:
            fd = os.open(tmp, flags, 0o600, dir_fd=folder)
            try:
                _write_all(fd, [memoryview(header), payload])
                if self.fsync:
                    os.fsync(fd)
                os.close(fd)
                fd = -1
                os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=folder)
                raise

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
        self.lru.pop(index)
        # Gone already, a planted directory (left alone), or a folder that is now a link (not followed).
        with contextlib.suppress(OSError), self._folder(index[0]) as folder:
            os.unlink(index[1].hex() + SUFFIX, dir_fd=folder)
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
