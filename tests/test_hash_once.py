"""Keys are computed once per request and the prefix is matched once per admission: a preempted
request carries its keys (extended by what it generated) back into the queue, the scheduler's
wait-for-unwritten-blocks rule runs on the same match that allocates, and the block table has one
owner, the block manager."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache import BlockManager, CacheConfig, Scope, TenantQuota
from kvcache.cache.manager import Prompt
from kvcache.engine import SamplingParams, Scheduler, SchedulerConfig
from kvcache.engine.sequence import Sequence, Status
from kvcache.errors import CapacityError, InvalidTokensError, RequestError

BS = 4


def manager(num_blocks: int = 16) -> BlockManager:
    return BlockManager(CacheConfig(num_blocks=num_blocks, block_size=BS, vocab_size=1000))


def test_extending_a_prompt_keys_exactly_as_hashing_the_whole() -> None:
    m = manager()
    head, more = list(range(1, 7)), list(range(50, 61))  # 6 tokens, then 11: ends mid-block
    extended = m.extend(m.hash(head, "a"), more)
    whole = m.hash(head + more, "a")
    assert extended.keys == whole.keys and len(whole.keys) == 4
    assert (extended.num_tokens, extended.raw, extended.tail_raw) == (17, whole.raw, whole.tail_raw)
    assert extended.tokens == head + more
    assert m.extend(extended, []) is extended  # nothing to add


def test_an_extended_prompt_hits_the_blocks_append_cached() -> None:
    """After a public prefix, generated blocks continue the private chain: the extension keys
    them as ``append`` did, so a preempted request finds them."""
    m = manager()
    public = list(range(1, 9))  # two full public blocks
    m.publish(public)
    prompt = m.hash(public, "a")
    assert prompt.num_public_blocks == 2
    m.allocate("r", prompt)
    generated = [90, 91, 92, 93, 94]
    m.append("r", generated)  # fills the third block
    m.abort("r", num_computed_tokens=12)  # its KV was written: it stays cached
    again = m.extend(prompt, generated)
    assert m.lookup(again) == 12 and m.lookup(public + generated, "b") == 8  # b: public part only
    m.check_invariants()


def test_a_block_id_prompt_cannot_be_extended() -> None:
    m = manager()
    prompt = m.hash_block_ids([1, 2], num_tokens=8)
    with pytest.raises(InvalidTokensError, match="block ids"):
        m.extend(prompt, [1])


def test_admit_waits_on_an_unwritten_prefix_block_and_changes_nothing() -> None:
    m = manager()
    tokens = list(range(1, 13))
    first = m.allocate("first", tokens, "a")
    before = m.stats()
    prompt = m.hash([*tokens, 99], "a")
    assert m.admit("second", prompt, unwritten={prompt.keys[1]}) is None
    assert m.stats() == before and m.num_running == 1  # no request, no stats, nothing touched
    alloc = m.admit("second", prompt, unwritten={b"\0" * 16})
    assert alloc is not None and alloc.num_cached_tokens == 12
    assert alloc.block_ids[:3] == first.block_ids
    m.check_invariants()


def test_admit_with_wait_refuses_room_without_an_error_and_asks_again_once_the_pool_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = manager(num_blocks=4)
    m.allocate("held", list(range(1, 13)), "a")  # 3 of the 4 blocks
    prompt = m.hash(list(range(50, 58)), "a")  # needs 2
    with pytest.raises(CapacityError, match="need 2 free blocks, only 1"):
        m.admit("r", prompt, unwritten=set())
    before = m.stats()
    calls: list[int] = []
    match = m._match
    monkeypatch.setattr(m, "_match", lambda p: calls.append(1) or match(p))
    assert m.admit("r", prompt, unwritten=set(), wait=True) is None
    assert m.admit("r", prompt, unwritten=set(), wait=True) is None  # nothing changed: not matched again
    assert calls == [1] and m.stats() == before and m.num_running == 1
    again = m.hash(list(range(50, 58)), "a")  # the same tokens, another prompt object: matched
    assert m.admit("r", again, unwritten=set(), wait=True) is None
    assert calls == [1, 1]
    m.free("held")  # the pool changed: asked again, it fits (evicting the LRU block)
    alloc = m.admit("r", prompt, unwritten=set(), wait=True)
    assert alloc is not None and alloc.num_cached_tokens == 0 and calls == [1, 1, 1]
    m.check_invariants()


def test_admission_matches_the_prefix_once(monkeypatch: pytest.MonkeyPatch) -> None:
    m = manager()
    m.allocate("warm", list(range(1, 9)), "a")
    calls: list[int] = []
    match = m._match
    monkeypatch.setattr(m, "_match", lambda prompt: calls.append(1) or match(prompt))
    assert m.admit("r", m.hash(list(range(1, 11)), "a"), unwritten=set()) is not None
    assert len(calls) == 1


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(
        request_id=rid,
        tokens=tokens,
        num_prompt_tokens=len(tokens),
        scope=Scope("a"),
        params=SamplingParams(max_tokens=8),
        generator=torch.Generator(),
        arrival_s=0.0,
    )


def test_a_preempted_sequence_keeps_its_keys_and_is_not_hashed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    m = manager(num_blocks=4)
    sched = Scheduler(m, SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4))
    a, b = seq("a", list(range(1, 9))), seq("b", list(range(100, 108)))
    for s in (a, b):
        s.prompt = m.hash(s.tokens, s.scope)
        sched.add(s)
    for s in sched.schedule().scheduled:
        s.seq.num_computed_tokens += s.num_new_tokens
        s.seq.tokens.append(7)
    keys_before = list(b.prompt.keys) if b.prompt is not None else []
    hashed: list[int] = []
    hash_ = m.hash
    monkeypatch.setattr(m, "hash", lambda *args: hashed.append(1) or hash_(*args))
    out = sched.schedule()  # a needs a third block; b (newest) is preempted
    assert out.preempted == ["b"] and b.status is Status.WAITING
    assert b.prompt is not None and b.prompt.num_tokens == 9 and b.prompt.keys == keys_before
    sched.finish(a, "length")
    assert sched.schedule().admitted == ["b"] and not hashed  # readmitted with the carried keys
    assert b.num_computed_tokens == 4  # its first block hit; its second went to a (tail first)
    assert m.block_ids("b") and len(m.block_ids("b")) == 3  # the manager owns b's block table
    m.check_invariants()


OPS = ["allocate", "append", "free", "abort", "admit"]
OP = st.tuples(st.sampled_from(OPS), st.integers(0, 3), st.integers(1, 9))


@settings(max_examples=120, deadline=None)
@given(ops=st.lists(OP, max_size=40), quotas=st.booleans(), by_ids=st.booleans())
def test_a_remembered_refusal_is_what_asking_again_would_answer(
    ops: list[tuple[str, int, int]], quotas: bool, by_ids: bool
) -> None:
    """Whatever runs between two asks (allocations that evict, growth, frees, aborts), a refusal
    the manager remembers is the answer a manager without the memory gives."""
    config = CacheConfig(num_blocks=6, block_size=BS, vocab_size=1000)
    if quotas:
        config = dataclasses.replace(config, quotas={"t0": TenantQuota(floor_blocks=2, cap_blocks=4)})
    m = BlockManager(config)
    scopes = [Scope(f"t{i % 2}") for i in range(4)]  # two tenants, so quotas bind

    def prompt(i: int, n: int) -> Prompt:  # requests 0..3 share their first block
        if by_ids:
            ids = [7, *range(10 * i, 10 * i + (n - 1) // BS)]
            return m.hash_block_ids(ids, n + BS - 1, scopes[i])
        return m.hash([7] * BS + list(range(10 * i, 10 * i + n)), scopes[i])

    asked: dict[str, Prompt] = {}
    for op, i, n in ops:
        rid = f"r{i}"
        try:
            if op == "allocate":
                m.allocate(rid, prompt(i, n))
            elif op == "append":
                if by_ids:
                    m.append_unkeyed(rid, n)
                else:
                    m.append(rid, [500 + n] * n)
            elif op in ("free", "abort"):
                m.free(rid) if op == "free" else m.abort(rid)
            else:
                asked[rid] = asked.get(rid) or prompt(i, n)
                if m.admit(rid, asked[rid], unwritten=(), wait=True) is not None:
                    del asked[rid]
        except (CapacityError, RequestError, InvalidTokensError):
            pass
        for rid, p in asked.items():
            if m.still_refused(rid, p):
                fresh = copy.deepcopy(m)
                fresh._refused = None
                assert fresh.admit(rid, p, unwritten=(), wait=True) is None
        m.check_invariants()
