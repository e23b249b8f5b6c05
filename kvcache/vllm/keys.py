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

kvcache's extension, the public head (``public_blocks``): a kvcache worker keys a prompt's
leading blocks that are an operator-published prefix in the public scope, shared by every tenant
(``hashing.key_prompt``). In vLLM's key space those blocks are keyed as a prompt of their own
salted with ``public_salt`` (on block 0), and the tenant's ``cache_salt`` moves to the extra keys
of the first block after them, chained on from the last public key::

    key[0] = H((NONE_HASH, tokens[0:bs], (public_salt,)))         blocks < public_blocks
    key[P] = H((key[P-1], tokens[P*bs:(P+1)*bs], (cache_salt,)))  P = public_blocks

so every tenant's public head has the same keys and what follows differs by tenant. With
``public_blocks=0`` (the default) the keys are exactly vLLM's. The extension is used only between
kvcache workers (``kvcache worker --vllm-events``) and ``kvcache route --engine-api kvcache``: a
real vLLM engine salts block 0 with the request's salt, so public prefixes do not apply to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import cbor2
import xxhash

from kvcache.cache.config import DEFAULT_BLOCK_SIZE
from kvcache.cache.tenancy import Scope
from kvcache.errors import ConfigError, ScopeError

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
    """Block keys of one engine fleet's configuration (hash function, seed, block size) and, for
    kvcache workers, the public scope's salt (``vllm.public.public_salt``: a deployment secret's
    pseudonym, so no tenant's salt is it)."""

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        hash_name: str = "sha256_cbor",
        seed: str = "0",
        public_salt: str | None = None,
    ) -> None:
        if hash_name not in HASH_FUNCTIONS:
            raise ConfigError(f"hash_name={hash_name!r} is unknown; choose one of {sorted(HASH_FUNCTIONS)}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(
                f"block_size={block_size!r} must be a positive integer (the engines' --block-size)"
            )
        if not isinstance(seed, str):
            raise ConfigError(f"seed={seed!r} must be the engines' PYTHONHASHSEED as a string")
        if public_salt is not None and (not isinstance(public_salt, str) or not public_salt):
            raise ConfigError(f"public_salt={public_salt!r} must be None or a non-empty string")
        self.block_size = block_size
        self.hash_name = hash_name
        self.hash = HASH_FUNCTIONS[hash_name]
        self.none_hash = self.hash(seed)
        self.public_salt = public_salt

    def _check_public(self, num_blocks: int, cache_salt: str | None, public_blocks: int) -> None:
        if isinstance(public_blocks, bool) or not isinstance(public_blocks, int):
            raise ConfigError(f"public_blocks={public_blocks!r} must be an integer")
        if not 0 <= public_blocks <= num_blocks:
            raise ConfigError(
                f"public_blocks={public_blocks} must be in 0..{num_blocks} (the prompt's full blocks)"
            )
        if cache_salt is not None and cache_salt == self.public_salt:
            raise ScopeError("cache_salt is the public scope's salt; a request is keyed in its own scope")
        if public_blocks and self.public_salt is None:
            raise ConfigError(
                f"public_blocks={public_blocks} needs the keyer's public_salt (kvcache workers and "
                "`kvcache route --engine-api kvcache` pass vllm.public.public_salt)"
            )
        if public_blocks and not cache_salt:
            # Unsalted, the first private block would be keyed as the next block of a public prefix.
            raise ScopeError(f"public_blocks={public_blocks} needs the request's cache_salt")

    def block_hashes(
        self,
        token_ids: Sequence[int],
        lora_name: str | None = None,
        cache_salt: str | None = None,
        public_blocks: int = 0,
    ) -> list[bytes]:
        """The digest of every full block of ``token_ids``, as the engine computes it; the first
        ``public_blocks`` blocks in the public scope (the module docstring)."""
        bs = self.block_size
        num_blocks = len(token_ids) // bs
        self._check_public(num_blocks, cache_salt, public_blocks)
        salt_at = {public_blocks: cache_salt}  # the scope's salt: block 0, or the first after the head
        if public_blocks:
            salt_at[0] = self.public_salt
        parent = self.none_hash
        out = []
        for i in range(num_blocks):
            extra: list[Any] = [lora_name] if lora_name else []
            salt = salt_at.get(i)
            if salt:
                extra.append(salt)
            block = tuple(int(t) for t in token_ids[i * bs : (i + 1) * bs])
            parent = self.hash((parent, block, tuple(extra) if extra else None))
            out.append(parent)
        return out

    def keys(
        self,
        token_ids: Sequence[int],
        lora_name: str | None = None,
        cache_salt: str | None = None,
        public_blocks: int = 0,
    ) -> list[int]:
        """``block_hashes`` as the 64-bit ints the router indexes."""
        return [external_key(h) for h in self.block_hashes(token_ids, lora_name, cache_salt, public_blocks)]
