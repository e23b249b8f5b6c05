"""vLLM-compatible block keys: the keys a vLLM engine reports in its KV events, computed for a
request before it is routed, so the router can match it against what each engine caches.

vLLM (v1, ``vllm/v1/core/kv_cache_utils.py``, ``vllm/utils/hashing.py``) keys each full block
of ``block_size`` tokens by a chain::

    key[0] = H((NONE_HASH, tuple(tokens[0:bs]), extra[0]))
    key[i] = H((key[i-1], tuple(tokens[i*bs:(i+1)*bs]), extra[i]))

where ``H`` is ``sha256_cbor`` (SHA-256 of the canonical CBOR encoding of the tuple) or
``xxhash_cbor`` (XXH3-128 of the same bytes), ``NONE_HASH = H(seed)`` for the engine's
``PYTHONHASHSEED`` string (an engine without one draws random bytes and cannot be matched),
and ``extra[i]`` is ``None`` or a tuple of: the LoRA adapter's name (every block), then the
request's ``cache_salt`` (block 0 only). Multimodal and prompt-embedding keys are not
modelled: such requests are keyed as text and simply miss. A partial last block has no key.

Events carry keys either as the digest bytes or, with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``,
as the digest's low 64 bits (big-endian); ``external_key`` maps both to that integer, and the
router's index uses it. ``scope_salt`` is the ``cache_salt`` that stands for a kvcache scope on
vLLM's side (the proxy sends it, a kvcache worker's event bridge keys with it). kvcache's own
keys are ``kvcache.cache.hashing``'s; this module only reproduces an external engine's key space.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import cbor2
import xxhash

from kvcache.cache.tenancy import Scope
from kvcache.errors import ConfigError

_MASK64 = (1 << 64) - 1


def sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def xxhash_cbor(obj: Any) -> bytes:
    return xxhash.xxh3_128_digest(cbor2.dumps(obj, canonical=True))


HASH_FUNCTIONS: dict[str, Callable[[Any], bytes]] = {"sha256_cbor": sha256_cbor, "xxhash_cbor": xxhash_cbor}


def scope_salt(scope: Scope, default_tenant: str = "default") -> str | None:
    """The ``cache_salt`` of ``scope``: none for the plain ``default_tenant`` (a keyless deployment's
    one tenant, keyed as vLLM keys unsalted prompts), else the scope's chain scope, which no two
    scopes share (``tenancy``)."""
    return None if scope.chain_scope == Scope(default_tenant).chain_scope else scope.chain_scope


def external_key(key: bytes | int) -> int:
    """A key as an event may carry it (digest bytes or a 64-bit int) as the 64-bit int."""
    if isinstance(key, int):
        return key & _MASK64
    return int.from_bytes(key, "big") & _MASK64


class VllmKeyer:
    """Block keys of one engine fleet's configuration (hash function, seed, block size)."""

    def __init__(self, block_size: int = 16, hash_name: str = "sha256_cbor", seed: str = "0") -> None:
        if hash_name not in HASH_FUNCTIONS:
            raise ConfigError(f"hash_name={hash_name!r} is unknown; choose one of {sorted(HASH_FUNCTIONS)}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(
                f"block_size={block_size!r} must be a positive integer (the engines' --block-size)"
            )
        if not isinstance(seed, str):
            raise ConfigError(f"seed={seed!r} must be the engines' PYTHONHASHSEED as a string")
        self.block_size = block_size
        self.hash_name = hash_name
        self.hash = HASH_FUNCTIONS[hash_name]
        self.none_hash = self.hash(seed)

    def block_hashes(
        self, token_ids: Sequence[int], lora_name: str | None = None, cache_salt: str | None = None
    ) -> list[bytes]:
        """The digest of every full block of ``token_ids``, as the engine computes it."""
        bs = self.block_size
        parent = self.none_hash
        out = []
        for i in range(len(token_ids) // bs):
            extra: list[Any] = [lora_name] if lora_name else []
            if i == 0 and cache_salt:
                extra.append(cache_salt)
            block = tuple(int(t) for t in token_ids[i * bs : (i + 1) * bs])
            parent = self.hash((parent, block, tuple(extra) if extra else None))
            out.append(parent)
        return out

    def keys(
        self, token_ids: Sequence[int], lora_name: str | None = None, cache_salt: str | None = None
    ) -> list[int]:
        """``block_hashes`` as the 64-bit ints the router indexes."""
        return [external_key(h) for h in self.block_hashes(token_ids, lora_name, cache_salt)]
