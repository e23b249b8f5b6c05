"""Block keys: the one hasher of kvcache.

A prompt is cut into blocks of ``block_size`` tokens. Block ``i``'s key is

    key[i] = xxh3_128(key[i-1] || content[i])          (16 + block_size*4 bytes in)

where ``content[i]`` is the block's token ids as little-endian uint32 (or, for traces that
carry precomputed block ids, the id as little-endian uint64), and ``key[-1]`` is the root of the
chain. The root names everything that changes what a block means:

    root = BLAKE2b-128(key=deployment_key, msg=encode(version, block_size, content kind,
                                                    model_id, adapter_id, scope))

``encode`` is canonical and length-prefixed (every field is a tag, a uint32 length and its
bytes; ``None`` differs from ``""``), so two different namespaces never serialize to the same
bytes. The keyed BLAKE2b makes roots unguessable without the deployment key; the xxh3 links
after it are cheap. Nothing depends on import-time randomness: the same inputs give the same
keys in every process and on every machine, which the router and the shared tiers rely on.

When a prompt continues privately after a published public prefix, the private chain starts
from ``switch = xxh3_128(private_root || last_public_key, seed=1)``; the seed keeps switch
links and block links in separate domains. ``publish_prefix`` records a prefix's public blocks
and ``key_prompt`` keys a prompt through them: the block manager and the server's front key
prompts with these two functions, so the front's routing keys are the workers' block keys.
``public_head`` is the rule for how many leading blocks are public (``kvcache route`` counts
them with it too, then keys them in vLLM's key space).

Token ids are validated and encoded once per prompt (``tokens_to_bytes``): a list through the
native encoder (exact ints only, range-checked), an integer array through one range check and one
cast; bools, floats, text and bytes are refused. ``chain_blocks`` returns each block's bytes with
its key, which the manager stores to confirm later hits. The native extension (``_hashchain.c``)
and the pure-Python loops give identical bytes and keys.

This module hashes; it does not decide what is cached or visible (see ``manager``).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

from kvcache.cache.tenancy import PUBLIC_SCOPE
from kvcache.errors import InvalidTokensError

HASH_SCHEME_VERSION = 1
KEY_BYTES = 16
TOKEN_BYTES = 4  # uint32 little-endian: every vocabulary in use is far below 2**32
BLOCK_ID_BYTES = 8  # uint64 little-endian for precomputed block ids (Mooncake ``hash_ids``)
KIND_TOKENS = "tokens"
KIND_BLOCK_IDS = "block_ids"

_xxh3_128 = xxhash.xxh3_128_digest
_ARRAY_CODE = "I" if array("I").itemsize == 4 else "L"
_NEEDS_BYTESWAP = sys.byteorder != "little"


def _field(tag: bytes, value: str | int | None) -> bytes:
    if value is None:
        return tag + b"\x00"
    data = value.encode("utf-8") if isinstance(value, str) else str(value).encode("ascii")
    return tag + b"\x01" + struct.pack("<I", len(data)) + data


def encode_namespace(
    *,
    block_size: int,
    kind: str,
    model_id: str,
    adapter_id: str | None,
    scope: str,
) -> bytes:
    """Canonical, length-prefixed bytes of everything that enters a chain root."""
    return b"".join(
        (
            b"kvcache-block-key",
            struct.pack("<I", HASH_SCHEME_VERSION),
            _field(b"B", block_size),
            _field(b"K", kind),
            _field(b"M", model_id),
            _field(b"A", adapter_id),
            _field(b"S", scope),
        )
    )


_TEXT_TYPES = (bytes, bytearray, memoryview, str)


def tokens_to_bytes(tokens: Sequence[int] | np.ndarray, vocab_size: int | None = None) -> bytes:
    """Validate token ids and return them as little-endian uint32 bytes (one conversion per prompt).

    Accepts a list or tuple of ints, a 1-D integer numpy array, or anything numpy can view as one
    (a CPU torch tensor). Rejects, with ``InvalidTokensError``: an empty prompt; bytes, str and
    other text (a prompt must be token ids, not their encoding); bools, floats and anything else
    that is not an integer; ids outside ``0..vocab_size-1`` (``0..2**32-1`` without a vocabulary).
    """
    if isinstance(tokens, _TEXT_TYPES):
        raise InvalidTokensError(
            f"tokens is a {type(tokens).__name__}; pass token ids (a list of ints or an integer "
            "array), not text or its bytes"
        )
    limit = vocab_size if vocab_size is not None else 2**32
    if type(tokens) is list or type(tokens) is tuple:
        if len(tokens) == 0:
            raise InvalidTokensError("tokens is empty; a prompt needs at least one token id")
        if _encode_native is not None:
            raw = _encode_native(tokens if type(tokens) is list else list(tokens), limit)
            if raw is not None:
                return raw  # type: ignore[no-any-return]
        return _sequence_to_bytes(tokens, vocab_size)
    if isinstance(tokens, np.ndarray) or hasattr(tokens, "__array__"):
        try:
            arr = np.asarray(tokens)
        except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a tensor on a GPU
            raise InvalidTokensError(
                f"tokens ({type(tokens).__name__}) cannot be read as a host array: {exc}; pass a "
                "list or a CPU array"
            ) from exc
        return _array_to_bytes(arr, vocab_size)
    if not isinstance(tokens, Sequence):
        raise InvalidTokensError(
            f"tokens is a {type(tokens).__name__}; pass a list/tuple of ints or a 1-D integer array"
        )
    if len(tokens) == 0:
        raise InvalidTokensError("tokens is empty; a prompt needs at least one token id")
    return _sequence_to_bytes(tokens, vocab_size)


def _sequence_to_bytes(tokens: Sequence[int], vocab_size: int | None) -> bytes:
    """The general path: any sequence of ints (numpy integer scalars included), no bools."""
    if bool in set(map(type, tokens)):
        raise InvalidTokensError(_describe_bad_token(tokens, vocab_size))
    try:
        arr = array(_ARRAY_CODE, tokens)
    except (TypeError, OverflowError) as exc:
        raise InvalidTokensError(_describe_bad_token(tokens, vocab_size)) from exc
    # Checked in native order, before any byte swap; numpy's max is ~100x faster than max(arr).
    if vocab_size is not None and int(np.frombuffer(arr, dtype=np.uint32).max()) >= vocab_size:
        raise InvalidTokensError(_describe_bad_token(tokens, vocab_size))
    if _NEEDS_BYTESWAP:
        arr.byteswap()
    return arr.tobytes()


def _array_to_bytes(arr: np.ndarray, vocab_size: int | None) -> bytes:
    """Integer arrays: a range check on the array, then one cast (none when already ``<u4``)."""
    if arr.ndim != 1:
        raise InvalidTokensError(f"tokens must be a flat sequence of ids, got an array of shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise InvalidTokensError(f"tokens have dtype {arr.dtype}; token ids must be integers")
    if arr.size == 0:
        raise InvalidTokensError("tokens is empty; a prompt needs at least one token id")
    limit = vocab_size if vocab_size is not None else 2**32
    if int(arr.max()) >= limit or (arr.dtype.kind == "i" and int(arr.min()) < 0):
        bad = int(np.flatnonzero((arr < 0) | (arr >= limit))[0])
        raise InvalidTokensError(
            f"tokens[{bad}]={int(arr[bad])} is outside 0..{limit - 1} (vocab_size={vocab_size})"
        )
    return arr.astype("<u4", copy=False).tobytes()


def _describe_bad_token(tokens: Sequence[int], vocab_size: int | None) -> str:
    limit = vocab_size if vocab_size is not None else 2**32
    for i, tok in enumerate(tokens):
        if isinstance(tok, (bool, np.bool_)) or not isinstance(tok, (int, np.integer)):
            return f"tokens[{i}]={tok!r} is a {type(tok).__name__}; token ids must be integers"
        if not 0 <= int(tok) < limit:
            return f"tokens[{i}]={tok} is outside 0..{limit - 1} (vocab_size={vocab_size})"
    return "tokens could not be converted to uint32"


def block_ids_to_bytes(block_ids: Sequence[int] | np.ndarray) -> bytes:
    """Precomputed block ids (e.g. Mooncake ``hash_ids``) as little-endian uint64 bytes.

    The same rule as token ids: integers only (no bools, floats or strings), in 0..2**64-1.
    """
    if isinstance(block_ids, _TEXT_TYPES):
        raise InvalidTokensError(f"block ids is a {type(block_ids).__name__}; pass a sequence of ints")
    if isinstance(block_ids, np.ndarray):
        arr = block_ids
        if arr.dtype.kind not in "iu":
            raise InvalidTokensError(f"block ids have dtype {arr.dtype}; they must be integers")
    else:
        for i, v in enumerate(block_ids):
            exact = type(v) is int
            if not exact and (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))):
                raise InvalidTokensError(
                    f"block_ids[{i}]={v!r} is a {type(v).__name__}; block ids must be integers"
                )
        try:
            arr = np.asarray([int(v) for v in block_ids], dtype=object)
        except (TypeError, ValueError) as exc:  # pragma: no cover - guarded by the loop above
            raise InvalidTokensError(f"block ids must be integers: {exc}") from exc
    if arr.ndim != 1:
        raise InvalidTokensError(f"block ids must be a flat sequence, got shape {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 2**64):
        bad = next(i for i, v in enumerate(arr.tolist()) if not 0 <= v < 2**64)
        raise InvalidTokensError(f"block_ids[{bad}]={arr[bad]} is outside 0..2**64-1")
    return np.asarray(arr, dtype="<u8").tobytes()


def chain_python(parent: bytes, content: bytes, width: int) -> list[bytes]:
    """Keys of every whole ``width``-byte block of ``content``, chained from ``parent``.

    The reference loop: one slice, one concatenation and one xxh3 call per block.
    """
    n = len(content) - len(content) % width
    keys: list[bytes] = []
    add = keys.append
    h = _xxh3_128
    key = parent
    for start in range(0, n, width):
        key = h(key + content[start : start + width])
        add(key)
    return keys


try:  # the same loops in C over the system xxHash library, when it could be built
    from kvcache.cache._hashchain import chain as _chain_native
    from kvcache.cache._hashchain import chain_blocks as _chain_blocks_native
    from kvcache.cache._hashchain import encode_tokens as _encode_native
except ImportError:  # pragma: no cover - depends on the machine
    _chain_native = None
    _chain_blocks_native = None
    _encode_native = None

HAS_NATIVE_CHAIN = _chain_native is not None


def chain(parent: bytes, content: bytes, width: int) -> list[bytes]:
    """Keys of every whole ``width``-byte block of ``content``, chained from ``parent``.

    Uses the native loop when built (identical keys, about 4x faster), else ``chain_python``.
    """
    if _chain_native is not None:
        return _chain_native(parent, content, width)  # type: ignore[no-any-return]
    return chain_python(parent, content, width)


def chain_blocks(parent: bytes, content: bytes, width: int) -> tuple[list[bytes], list[bytes]]:
    """``chain``'s keys and each whole block's own bytes (what a cached block keeps to confirm hits)."""
    if _chain_blocks_native is not None and _chain_native is not None:
        return _chain_blocks_native(parent, content, width)  # type: ignore[no-any-return]
    n = len(content) - len(content) % width
    return chain(parent, content, width), [content[i : i + width] for i in range(0, n, width)]


def checksum(data: bytes | bytearray | memoryview) -> int:
    """64-bit xxh3 of a buffer (no copy): the integrity check of blocks the spill tiers store."""
    return int(xxhash.xxh3_64_intdigest(data))


def link(parent: bytes, block: bytes) -> bytes:
    """One chain link: the key of ``block`` under ``parent``."""
    return _xxh3_128(parent + block)


def switch(private_root: bytes, public_key: bytes) -> bytes:
    """The parent of the first private block that follows a public prefix ending at ``public_key``."""
    return _xxh3_128(private_root + public_key, seed=1)


Published = dict[bytes, tuple[bytes, bytes]]  # public block key -> (parent key, content bytes)


@dataclass(slots=True)
class PromptKeys:
    """A token prompt's full-block keys: blocks ``< num_public_blocks`` follow a published prefix
    from the public root, the rest chain from ``private_parent`` in the caller's scope."""

    keys: list[bytes]
    contents: list[bytes]
    root: bytes  # parent of block 0: the public root when anything is published, else the scope's
    private_parent: bytes  # parent of block ``num_public_blocks``
    num_public_blocks: int


def publish_prefix(hasher: Hasher, raw: bytes, published: Published) -> int:
    """Record the full blocks of the encoded prefix ``raw`` in ``published``; returns how many."""
    width = hasher.block_size * TOKEN_BYTES
    parent = hasher.root(PUBLIC_SCOPE)
    keys = chain(parent, raw, width)
    for i, key in enumerate(keys):
        published[key] = (parent, raw[i * width : (i + 1) * width])
        parent = key
    return len(keys)


def public_head(hasher: Hasher, raw: bytes, published: Published) -> tuple[list[bytes], list[bytes]]:
    """Keys and contents of the encoded prompt ``raw``'s public head: the longest run of its leading
    full blocks that belong to a published prefix, each confirmed by parent and content. This is
    the one rule for which blocks are public; whoever keys prompts in another key space (the vLLM
    interop) counts them here."""
    width = hasher.block_size * TOKEN_BYTES
    num_full = len(raw) // width
    keys: list[bytes] = []
    contents: list[bytes] = []
    if not published:
        return keys, contents
    key = hasher.root(PUBLIC_SCOPE)
    while len(keys) < num_full:
        start = len(keys) * width
        content = raw[start : start + width]
        child = link(key, content)
        if published.get(child) != (key, content):
            break
        keys.append(child)
        contents.append(content)
        key = child
    return keys, contents


def key_prompt(hasher: Hasher, raw: bytes, scope: str, published: Published) -> PromptKeys:
    """Keys of every full block of the encoded prompt ``raw`` in chain scope ``scope``: its public
    head (``public_head``) in the public scope, the rest in ``scope``, chained on from the last
    public key through ``switch``."""
    width = hasher.block_size * TOKEN_BYTES
    num_full = len(raw) // width
    private_root = hasher.root(scope)
    root = hasher.root(PUBLIC_SCOPE) if published else private_root
    keys, contents = public_head(hasher, raw, published)
    num_public = len(keys)
    private_parent = switch(private_root, keys[-1]) if num_public else private_root
    more_keys, more_contents = chain_blocks(private_parent, raw[num_public * width : num_full * width], width)
    return PromptKeys(keys + more_keys, contents + more_contents, root, private_parent, num_public)


MAX_CACHED_ROOTS = 4096


@dataclass(slots=True)
class Hasher:
    """Computes and memoizes chain roots for one model/adapter/deployment.

    Roots are cached per (scope, kind), up to ``MAX_CACHED_ROOTS``: tenants and groups are few,
    but salted scopes (``tenancy.Scope``) are chosen by callers, so past the bound a root is
    computed again each time (one BLAKE2b call) rather than kept.
    """

    block_size: int
    model_id: str = "default"
    adapter_id: str | None = None
    deployment_key: bytes | None = None
    _roots: dict[tuple[str, str], bytes] = field(default_factory=dict, repr=False)

    def root(self, scope: str, kind: str = KIND_TOKENS) -> bytes:
        cached = self._roots.get((scope, kind))
        if cached is not None:
            return cached
        msg = encode_namespace(
            block_size=self.block_size,
            kind=kind,
            model_id=self.model_id,
            adapter_id=self.adapter_id,
            scope=scope,
        )
        root = hashlib.blake2b(msg, key=self.deployment_key or b"", digest_size=KEY_BYTES).digest()
        if len(self._roots) < MAX_CACHED_ROOTS:
            self._roots[(scope, kind)] = root
        return root
