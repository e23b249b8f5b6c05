"""Block hashing: kvcache's xxh3-128 chain vs sha256 over pickled (parent, tokens, extra) tuples.

The baseline follows the default block hash of vLLM v1: for each full block,
``sha256(pickle.dumps((parent_hash, tuple(block_tokens), extra_keys), HIGHEST_PROTOCOL))``.
Both start from a Python list of ints, as callers hand prompts over.
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Any

import numpy as np
import pytest

from kvcache import BlockManager, CacheConfig
from kvcache.cache.hashing import tokens_to_bytes

BLOCK_SIZE = 16
NUM_TOKENS = 128 * 1024


def sha256_pickle_chain(tokens: list[int], block_size: int, extra: Any = None) -> list[bytes]:
    parent = b"\x00" * 32
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        data = pickle.dumps(
            (parent, tuple(tokens[start : start + block_size]), extra), pickle.HIGHEST_PROTOCOL
        )
        parent = hashlib.sha256(data).digest()
        keys.append(parent)
    return keys


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return np.random.default_rng(0).integers(0, 151_000, NUM_TOKENS).tolist()  # type: ignore[no-any-return]


@pytest.mark.benchmark(group="hash 128k-token prompt")
def test_hash_baseline_sha256_pickle(benchmark: Any, prompt: list[int]) -> None:
    benchmark.extra_info["tokens"] = len(prompt)
    keys = benchmark(sha256_pickle_chain, prompt, BLOCK_SIZE)
    assert len(keys) == NUM_TOKENS // BLOCK_SIZE


@pytest.mark.benchmark(group="hash 128k-token prompt")
def test_hash_kvcache_xxh3_chain(benchmark: Any, prompt: list[int]) -> None:
    manager = BlockManager(CacheConfig(num_blocks=16, block_size=BLOCK_SIZE, vocab_size=152_064))
    benchmark.extra_info["tokens"] = len(prompt)
    hashed = benchmark(manager.hash, prompt, "tenant")
    assert len(hashed.keys) == NUM_TOKENS // BLOCK_SIZE


@pytest.mark.benchmark(group="encode 128k token ids")
def test_encode_baseline_list(benchmark: Any, prompt: list[int]) -> None:
    benchmark.extra_info["tokens"] = len(prompt)
    benchmark(tokens_to_bytes, prompt, 152_064)


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint32"])
def test_encode_numpy(benchmark: Any, prompt: list[int], dtype: str) -> None:
    """The array path: a range check and one cast; meant to cost at most 1.2x the list path."""
    benchmark.group = "encode 128k token ids"
    arr = np.asarray(prompt, dtype=dtype)
    benchmark.extra_info["tokens"] = len(prompt)
    assert benchmark(tokens_to_bytes, arr, 152_064) == tokens_to_bytes(prompt)
