"""Block keys: chained, canonical, deterministic across processes, scoped."""

from __future__ import annotations

import ctypes.util
import subprocess

import numpy as np
import pytest
import xxhash

from kvcache import Hasher, InvalidTokensError
from kvcache.cache.hashing import (
    HAS_NATIVE_CHAIN,
    chain,
    chain_python,
    encode_namespace,
    key_prompt,
    link,
    publish_prefix,
    tokens_to_bytes,
)
from kvcache.child import python_argv

TOKENS = list(range(100, 164))  # 64 tokens = 4 blocks of 16


def keys_of(hasher: Hasher, tokens: list[int], scope: str) -> list[bytes]:
    """Keys of every full block of ``tokens`` in ``scope``, nothing published."""
    return key_prompt(hasher, tokens_to_bytes(tokens), scope, {}).keys


def test_key_is_xxh3_128_of_parent_and_little_endian_uint32_tokens() -> None:
    hasher = Hasher(block_size=16)
    root = hasher.root("tenant:a")
    keys = keys_of(hasher, TOKENS, "tenant:a")
    assert len(keys) == 4
    expected = xxhash.xxh3_128_digest(root + np.asarray(TOKENS[:16], dtype="<u4").tobytes())
    assert keys[0] == expected
    assert keys[1] == xxhash.xxh3_128_digest(keys[0] + np.asarray(TOKENS[16:32], dtype="<u4").tobytes())


def test_only_full_blocks_get_keys() -> None:
    hasher = Hasher(block_size=16)
    assert len(keys_of(hasher, TOKENS[:15], "s")) == 0
    assert len(keys_of(hasher, TOKENS[:31], "s")) == 1
    assert keys_of(hasher, TOKENS[:31], "s") == keys_of(hasher, TOKENS[:16], "s")


def test_keys_depend_on_every_namespace_field() -> None:
    base = Hasher(block_size=16, model_id="m", adapter_id=None)
    variants = [
        Hasher(block_size=16, model_id="m2"),
        Hasher(block_size=16, model_id="m", adapter_id="lora"),
        Hasher(block_size=16, model_id="m", adapter_id=""),
        Hasher(block_size=16, model_id="m", deployment_key=b"secret"),
        Hasher(block_size=8, model_id="m"),
    ]
    ref = keys_of(base, TOKENS, "tenant:a")
    assert ref == keys_of(Hasher(block_size=16, model_id="m"), TOKENS, "tenant:a")
    assert keys_of(base, TOKENS, "tenant:b") != ref
    for other in variants:
        assert keys_of(other, TOKENS, "tenant:a")[0] != ref[0]


def test_namespace_encoding_is_length_prefixed() -> None:
    # Moving a character between adjacent fields must change the encoding.
    a = encode_namespace(block_size=16, kind="tokens", model_id="ab", adapter_id="c", scope="s")
    b = encode_namespace(block_size=16, kind="tokens", model_id="a", adapter_id="bc", scope="s")
    none = encode_namespace(block_size=16, kind="tokens", model_id="a", adapter_id=None, scope="s")
    empty = encode_namespace(block_size=16, kind="tokens", model_id="a", adapter_id="", scope="s")
    assert a != b
    assert none != empty


def test_chain_matches_link_by_link() -> None:
    raw = tokens_to_bytes(TOKENS)
    keys = chain(b"\0" * 16, raw, 64)
    parent = b"\0" * 16
    for i, key in enumerate(keys):
        assert key == link(parent, raw[i * 64 : (i + 1) * 64])
        parent = key


@pytest.mark.parametrize("width", [4, 8, 64, 100])
def test_native_chain_equals_reference(width: int) -> None:
    if ctypes.util.find_library("xxhash") is None:
        pytest.skip("no system xxHash library: kvcache runs on its pure-Python hash loop")
    assert HAS_NATIVE_CHAIN, "libxxhash is installed but the native hash chain was not built"
    content = np.random.default_rng(width).integers(0, 256, width * 37 + 3, dtype=np.uint8).tobytes()
    parent = bytes(range(16))
    assert chain(parent, content, width) == chain_python(parent, content, width)
    assert chain(parent, b"", width) == []


def test_keys_identical_in_a_fresh_process() -> None:
    code = (
        "from kvcache import Hasher;"
        "from kvcache.cache.hashing import key_prompt, tokens_to_bytes;"
        "h = Hasher(block_size=16, model_id='m', adapter_id='a', deployment_key=b'k');"
        f"keys = key_prompt(h, tokens_to_bytes({TOKENS!r}), 'tenant:x', {{}}).keys;"
        "print(','.join(k.hex() for k in keys))"
    )
    out = subprocess.run([*python_argv(), "-c", code], capture_output=True, text=True, check=True)
    here = Hasher(block_size=16, model_id="m", adapter_id="a", deployment_key=b"k")
    assert out.stdout.strip() == ",".join(k.hex() for k in keys_of(here, TOKENS, "tenant:x"))


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([], "empty"),
        ([1, -5], "tokens[1]=-5"),
        ([1, 2**32], "tokens[1]=4294967296"),
        ([1, 2.5], "tokens[1]=2.5 is a float"),
        (["7"], "tokens[0]='7' is a str"),
        ([3, 1000], "tokens[1]=1000 is outside 0..999"),
    ],
)
def test_bad_tokens_are_named(tokens: list[object], message: str) -> None:
    with pytest.raises(InvalidTokensError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tokens_to_bytes(tokens, vocab_size=1000)  # type: ignore[arg-type]


def test_numpy_integers_are_accepted() -> None:
    assert tokens_to_bytes(np.arange(5, dtype=np.int64).tolist()) == tokens_to_bytes(list(range(5)))
    assert tokens_to_bytes([np.int32(3)]) == tokens_to_bytes([3])  # type: ignore[list-item]


def test_the_root_memo_is_bounded_and_roots_stay_exact_past_it() -> None:
    from kvcache.cache.hashing import MAX_CACHED_ROOTS

    h = Hasher(block_size=4)
    first = [h.root(f"salted:8:tenant:a:{i}") for i in range(MAX_CACHED_ROOTS + 10)]
    assert len(h._roots) == MAX_CACHED_ROOTS  # callers choose salts: the memo must not grow with them
    fresh = Hasher(block_size=4)
    assert h.root(f"salted:8:tenant:a:{MAX_CACHED_ROOTS + 5}") == first[-5]
    assert fresh.root(f"salted:8:tenant:a:{MAX_CACHED_ROOTS + 5}") == first[-5]


def test_key_prompt_is_the_block_managers_keying() -> None:
    """A router keying with ``key_prompt`` and the published prefixes gets the manager's keys."""
    from kvcache import BlockManager, CacheConfig

    manager = BlockManager(CacheConfig(num_blocks=8, block_size=16, model_id="m", deployment_key=b"k" * 16))
    hasher = Hasher(block_size=16, model_id="m", deployment_key=b"k" * 16)
    system = TOKENS[:40]  # 2 full blocks, then 8 tokens of a third
    published: dict[bytes, tuple[bytes, bytes]] = {}
    assert publish_prefix(hasher, tokens_to_bytes(system), published) == manager.publish(system) == 2
    prompt = system + list(range(500, 530))
    keyed = key_prompt(hasher, tokens_to_bytes(prompt), "tenant:a", published)
    expected = manager.hash(prompt, "a")
    assert (keyed.keys, keyed.num_public_blocks) == (expected.keys, expected.num_public_blocks)
    assert len(keyed.keys) == 4
    other = key_prompt(hasher, tokens_to_bytes(prompt), "tenant:b", published).keys
    assert keyed.keys[:2] == other[:2] and keyed.keys[2:] != other[2:]  # public shared, the rest not
