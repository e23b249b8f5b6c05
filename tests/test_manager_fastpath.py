"""The manager's fast paths behave like the reference paths: try_allocate, array inputs, bounded
events, the unscoped namespace, and the native encoder and chain against the Python loops."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import toks
from test_manager import snapshot

from kvcache import BlockManager, BlockRemoved, BlockStored, CacheConfig, InvalidTokensError, Scope
from kvcache.cache import hashing

MakeManager = Callable[..., BlockManager]


def test_try_allocate_returns_none_matches_once_and_changes_nothing(
    make_manager: MakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = make_manager(num_blocks=4)
    m.allocate("a", toks(0, 12), "t")  # 3 blocks held
    before = snapshot(m)
    calls: list[int] = []
    real = m._match
    monkeypatch.setattr(m, "_match", lambda p: calls.append(1) or real(p))
    assert m.try_allocate("b", toks(100, 8), "t") is None
    assert calls == [1]
    assert snapshot(m) == before
    m.free("a")
    alloc = m.try_allocate("b", toks(0, 8) + toks(100, 4), "t")
    assert alloc is not None and (alloc.block_ids, alloc.num_cached_tokens) == ([0, 1, 3], 8)
    m.check_invariants()


@pytest.mark.parametrize(
    "convert",
    [
        lambda t: np.asarray(t, dtype=np.int64),
        lambda t: np.asarray(t, dtype=np.uint32),
        lambda t: np.asarray(t, dtype=np.int32),
        lambda t: np.asarray(t, dtype=np.uint16),
        lambda t: torch.tensor(t, dtype=torch.int64),
        tuple,
    ],
)
def test_arrays_and_tensors_key_like_lists(make_manager: MakeManager, convert: Callable[..., object]) -> None:
    m = make_manager(vocab_size=1000)
    tokens = toks(3, 21)
    expected = m.hash(tokens, "t")
    got = m.hash(convert(tokens), "t")  # type: ignore[arg-type]
    assert (got.keys, got.contents, got.tail_tokens, got.num_tokens) == (
        expected.keys,
        expected.contents,
        expected.tail_tokens,
        expected.num_tokens,
    )


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        (np.array([1, -2, 3]), r"tokens\[1\]=-2 is outside"),
        (np.array([1, 2, 1000]), r"tokens\[2\]=1000 is outside"),
        (np.array([1.0, 2.0]), "dtype float64"),
        (np.array([[1, 2], [3, 4]]), "shape"),
        (np.array([], dtype=np.int64), "empty"),
        (torch.tensor([1.5]), "dtype float32"),
        (iter([1, 2, 3]), "list_iterator"),
        (7, "pass a list"),
        (torch.tensor([1, 2], device="meta"), "cannot be read as a host array"),
    ],
)
def test_bad_arrays_are_typed_errors(make_manager: MakeManager, tokens: object, match: str) -> None:
    m = make_manager(vocab_size=1000)
    with pytest.raises(InvalidTokensError, match=match):
        m.hash(tokens)  # type: ignore[arg-type]


def test_native_encoder_and_chain_match_the_python_paths() -> None:
    tokens = [0, 1, 2**32 - 1, 7, 123_456, 5, 6, 9, 10]
    raw = hashing.tokens_to_bytes(tokens)
    assert raw == hashing._sequence_to_bytes(tokens, None)
    assert raw == np.asarray(tokens, dtype="<u4").tobytes()
    parent = bytes(range(16))
    keys, contents = hashing.chain_blocks(parent, raw, 8)
    assert keys == hashing.chain_python(parent, raw, 8)
    assert contents == [raw[i : i + 8] for i in range(0, 32, 8)]
    with pytest.raises(InvalidTokensError, match=r"tokens\[0\]=4294967296"):
        hashing.tokens_to_bytes([2**32])


def test_events_are_bounded_and_counted(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=4, max_events=3)
    m.allocate("a", toks(0, 16), "t")  # 4 stored
    m.free("a")
    m.allocate("b", toks(100, 8), "t")  # 2 removed, 2 stored
    events = m.drain_events()
    assert [type(e) for e in events] == [BlockRemoved, BlockStored, BlockStored]
    assert m.stats().events_dropped == 5
    assert m.drain_events() == []
    m.free("b")
    m.allocate("c", toks(200, 4), "t")  # 1 removed, 1 stored: fits, nothing more dropped
    assert len(m.drain_events()) == 2 and m.stats().events_dropped == 5


def test_events_off(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=4, max_events=0)
    m.allocate("a", toks(0, 16), "t")
    m.free("a")
    m.allocate("b", toks(100, 8), "t")
    assert m.drain_events() == [] and m.stats().events_dropped == 0
    assert m.stats().evictions == 2


def test_unscoped_calls_never_share_with_a_tenant_named_default(make_manager: MakeManager) -> None:
    m = make_manager()
    m.allocate("a", toks(0, 9))
    m.free("a")
    assert m.lookup(toks(0, 9)) == 8
    assert m.lookup(toks(0, 9), "default") == 0
    assert m.lookup(toks(0, 9), Scope("default")) == 0
    assert m.hash(toks(0, 8)).keys != m.hash(toks(0, 8), "default").keys
    assert set(m.stats().tenants) == {""}


@pytest.mark.parametrize("bound", [1, 2, 5, 7, 11])
def test_bounded_events_are_the_newest_of_the_unbounded_stream(make_manager: MakeManager, bound: int) -> None:
    def run(m: BlockManager) -> None:
        m.allocate("a", toks(0, 16), Scope("x", group="g"))
        m.allocate("b", toks(0, 16), Scope("y", group="g"))  # duplicates of a's blocks: not stored
        m.free("a")
        m.free("b")
        m.allocate("c", toks(100, 12), "t")  # evicts
        m.append("c", toks(200, 8))
        m.abort("c")

    full = make_manager(num_blocks=8, k_anonymity=2)
    run(full)
    everything = full.drain_events()
    bounded = make_manager(num_blocks=8, k_anonymity=2, max_events=bound)
    run(bounded)
    assert bounded.drain_events() == everything[-bound:]
    assert bounded.stats().events_dropped == len(everything) - bound
    assert full.stats().events_dropped == 0


def test_python_fallbacks_give_the_same_keys_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = toks(5, 37)
    m = BlockManager(hashing_config())
    native = m.hash(tokens, "t")
    monkeypatch.setattr(hashing, "_encode_native", None)
    monkeypatch.setattr(hashing, "_chain_native", None)
    monkeypatch.setattr(hashing, "_chain_blocks_native", None)
    fallback = m.hash(tokens, "t")
    assert fallback.keys == native.keys
    assert (fallback.contents, fallback.tail_raw) == (native.contents, native.tail_raw)
    with pytest.raises(InvalidTokensError, match="bool"):
        m.hash([1, True, 3], "t")
    with pytest.raises(InvalidTokensError, match="outside"):
        m.hash([1, 5000], "t")


def hashing_config() -> CacheConfig:
    return CacheConfig(num_blocks=8, block_size=4, vocab_size=1000)


@pytest.mark.parametrize("bound", [0, 3, 65_536])
def test_key_runs_are_the_events_keys_in_order(make_manager: MakeManager, bound: int) -> None:
    def run(m: BlockManager) -> None:
        m.allocate("a", toks(0, 16), Scope("x", group="g"))
        m.allocate("b", toks(0, 16), Scope("y", group="g"))  # duplicates of a's blocks: not stored
        m.free("a")
        m.free("b")
        m.allocate("c", toks(100, 12), "t")  # evicts
        m.append("c", toks(200, 8))
        m.abort("c")  # un-indexes the blocks it cached (one record each)

    events = make_manager(num_blocks=8, k_anonymity=2, max_events=bound)
    runs = make_manager(num_blocks=8, k_anonymity=2, max_events=bound)
    run(events)
    run(runs)
    records = events.drain_events()
    drained = runs.drain_key_runs()
    assert [(isinstance(e, BlockStored), e.key) for e in records] == [
        (stored, key) for stored, keys in drained for key in keys
    ]
    assert runs.stats().events_dropped == events.stats().events_dropped
    assert runs.drain_key_runs() == [] and runs.drain_events() == []
    if bound == 65_536:  # a's 4 stored; c's 3; 1 evicted and 2 stored by the append; 5 un-indexed
        assert [(stored, len(keys)) for stored, keys in drained] == [
            (True, 4),
            (True, 3),
            (False, 1),
            (True, 2),
            *[(False, 1)] * 5,
        ]
