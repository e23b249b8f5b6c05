"""Every error a user of kvcache can cause, in one hierarchy.

``KVCacheError`` is the root; catch it to handle anything the library raises on bad input or
exhausted capacity. Internal invariants are checked with ``assert`` and are not part of this
hierarchy: an ``AssertionError`` is always a kvcache bug.

    KVCacheError
    ├── ConfigError          a configuration value is out of range
    ├── InvalidTokensError   tokens are empty, not integers, negative or >= vocab_size
    ├── RequestError         a request id is unknown, already freed, or already in use
    ├── ScopeError           a scope is malformed or not allowed to do what was asked
    ├── CapacityError        the pool cannot hold the request (nothing was changed)
    │   └── QuotaError       the tenant's block cap would be exceeded (nothing was changed)
    ├── TraceError           a trace file is malformed (names the line and field)
    ├── TierError            a storage tier was misused (wrong layout, bad size)
    │   └── CorruptBlockError  stored block bytes failed a check (tiers count it as a miss)
    ├── KernelError          a block-copy kernel got a tensor of the wrong shape, dtype, device or
    │                        layout, or block ids outside the pool
    ├── ModelError           a model cannot be loaded (not available offline, unknown name)
    ├── AuthError            an API key is missing or unknown (HTTP 401)
    └── ProtocolError        a request body or wire message is malformed (HTTP 400)
"""

from __future__ import annotations


class KVCacheError(Exception):
    """Root of every error kvcache raises for something the caller can fix."""


class ConfigError(KVCacheError, ValueError):
    """A configuration value is out of range."""


class InvalidTokensError(KVCacheError, ValueError):
    """Token ids are empty, not integers, negative, or not below the vocabulary size."""


class RequestError(KVCacheError, KeyError):
    """A request id is unknown, already freed, or already in use."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class ScopeError(KVCacheError, ValueError):
    """A scope is malformed or not allowed to do what was asked."""


class CapacityError(KVCacheError, MemoryError):
    """The block pool cannot hold what was asked; the pool is left exactly as it was."""


class QuotaError(CapacityError):
    """A tenant's block cap would be exceeded; the pool is left exactly as it was."""


class TraceError(KVCacheError, ValueError):
    """A trace file is malformed; the message names the line and the field."""


class TierError(KVCacheError, ValueError):
    """A storage tier was given data of the wrong layout or size."""


class CorruptBlockError(TierError):
    """Stored block bytes failed a check (magic, version, layout, key, size or checksum).

    Tiers catch it, count a miss, drop the block and report it; it never reaches a request."""


class KernelError(KVCacheError, ValueError):
    """A block-copy kernel was given a bad argument; the message names it, and nothing was written."""


class AuthError(KVCacheError, PermissionError):
    """An API key is missing or not in the server's configuration."""


class ProtocolError(KVCacheError, ValueError):
    """A request body or a wire message is malformed; the message names the field and the fix
    (``param``: the field, when one is to blame)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelError(KVCacheError, ValueError):
    """A model cannot be loaded: not available locally, or an unknown random-weight name."""
