"""How a stored block proves it is intact, and on shared storage that a holder of the secret wrote it.

- ``Seal.checksum()``: xxh3_64 of the payload (``hashing.checksum``). It detects damage (torn
  writes, flipped bits, truncation), not forgery: anyone who can write the bytes can recompute
  it. Enough for a tier only this user can write (a private G3 folder, an in-process pod).
- ``Seal.keyed(secret)``: a 32-byte keyed BLAKE3 MAC over the block's header fields (block key,
  layout digest, dtype, shape, payload size) and its payload, in place of the checksum. Without
  the secret nobody can produce a block that verifies, so a writable shared folder or Redis can
  destroy blocks (a counted miss) but never plant KV. The MAC key is derived from the secret with
  BLAKE3's key derivation (context string below), so the secret itself is never a hash key and
  one deployment secret can serve other purposes under other contexts. BLAKE3 was chosen by
  measurement (``benches/bench_tiers.py``, group ``mac-*``): several GB/s on one core where keyed
  BLAKE2b and HMAC-SHA256 run at about 1-2 GB/s.

The secret is provisioned through the environment, never argv, logs or Redis
(:func:`secret_from_environment`): ``KVCACHE_TIER_SECRET_FILE`` names a file readable by its owner
only (mode 0600 or 0400, owned by this user), or ``KVCACHE_TIER_SECRET`` holds it directly. At
least 16 bytes; 32 random bytes (``head -c 32 /dev/urandom > secret``) is the intended form.

Not here: the byte layout of a block (``codec``) or what a tier does with a block that fails
(it counts a miss and drops it).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import blake3

from kvcache.cache import hashing
from kvcache.errors import TierError
from kvcache.private_file import PrivateFileError, read_private_file

CHECKSUM = 1
KEYED_BLAKE3 = 2
KINDS = {CHECKSUM: "xxh3_64 checksum", KEYED_BLAKE3: "keyed BLAKE3 MAC"}
TAG_BYTES = 32
MIN_SECRET_BYTES = 16
SECRET_ENV = "KVCACHE_TIER_SECRET"
SECRET_FILE_ENV = "KVCACHE_TIER_SECRET_FILE"
_CONTEXT = "kvcache 2026-12 spill tier block MAC v2"


@dataclass(frozen=True, slots=True)
class Seal:
    """The tag a tier writes into every block header and requires on every read."""

    kind: int
    _mac_key: bytes = field(default=b"", repr=False)

    @classmethod
    def checksum(cls) -> Seal:
        return cls(CHECKSUM)

    @classmethod
    def keyed(cls, secret: bytes) -> Seal:
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
            got = f"{len(secret)} bytes" if isinstance(secret, bytes) else type(secret).__name__
            raise TierError(
                f"tier secret is {got}; it must be at least {MIN_SECRET_BYTES} bytes "
                f"(32 random bytes: head -c 32 /dev/urandom)"
            )
        return cls(KEYED_BLAKE3, blake3.blake3(secret, derive_key_context=_CONTEXT).digest())

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Seal | None:
        """A keyed seal from the deployment secret, or None when none is provisioned."""
        secret = secret_from_environment(environ)
        return None if secret is None else cls.keyed(secret)

    @property
    def authenticated(self) -> bool:
        return self.kind == KEYED_BLAKE3

    @property
    def name(self) -> str:
        return KINDS[self.kind]

    def tag(self, head: bytes | memoryview, payload: bytes | bytearray | memoryview) -> bytes:
        """``TAG_BYTES`` naming ``payload`` (and, keyed, the header fields ``head``)."""
        if self.kind == CHECKSUM:
            return hashing.checksum(payload).to_bytes(8, "little").ljust(TAG_BYTES, b"\0")
        mac = blake3.blake3(key=self._mac_key)
        mac.update(head)
        mac.update(payload)
        return mac.digest()

    def check(self, stored: bytes, head: bytes | memoryview, payload: bytes | bytearray | memoryview) -> bool:
        return hmac.compare_digest(stored, self.tag(head, payload))


def secret_from_environment(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The tier secret from ``KVCACHE_TIER_SECRET_FILE`` (an owner-only file) or
    ``KVCACHE_TIER_SECRET``; None when neither is set. A file others can read is refused."""
    env = os.environ if environ is None else environ
    path, direct = env.get(SECRET_FILE_ENV), env.get(SECRET_ENV)
    if path and direct:
        raise TierError(f"both {SECRET_FILE_ENV} and {SECRET_ENV} are set; set one of them")
    if direct:
        return direct.encode("utf-8")
    if not path:
        return None
    try:
        secret = read_private_file(path)
    except PrivateFileError as exc:
        raise TierError(f"{SECRET_FILE_ENV}={path} {exc.reason}") from exc
    return secret.rstrip(b"\r\n")
