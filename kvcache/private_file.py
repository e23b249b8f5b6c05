"""Read a small secret from a file only its owner may read, without ever blocking or following a link.

Both secrets a deployment may keep in a file (the deployment secret, ``serve.auth``, and the tier
secret, ``tiers.seal``) are read here, so both refuse the same things in the same way:

- a symbolic link (``O_NOFOLLOW``: the open fails with ``ELOOP``);
- anything that is not a regular file: a directory, a socket, a device, or a FIFO, which a plain
  ``open`` would wait on forever for a writer (``O_NONBLOCK`` opens it at once, ``fstat`` refuses it);
- a file owned by another user, or one that its group or others may read or write.

Not here: parsing the secret (each caller's format), or where the path comes from.
"""

from __future__ import annotations

import os
import stat


class PrivateFileError(Exception):
    """Why a secret file was refused: ``reason`` completes "<path> ...", naming the fix."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_private_file(path: str, max_bytes: int = 4096) -> bytes:
    """The first ``max_bytes`` of ``path``; ``PrivateFileError`` for anything but an owner-only file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PrivateFileError(
            f"cannot be opened ({exc.strerror}); name an existing regular file, not a link"
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PrivateFileError(
                f"is not a regular file (mode {stat.filemode(info.st_mode)}); name a "
                "file that holds the secret"
            )
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise PrivateFileError(
                f"has mode {stat.filemode(info.st_mode)} and owner uid {info.st_uid}; "
                f"it must be owned by uid {os.geteuid()} and readable by it only "
                f"(chmod 600 {path})"
            )
        # O_NONBLOCK has no effect on a regular file's reads: they never wait on another process.
        chunks: list[bytes] = []
        left = max_bytes
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
