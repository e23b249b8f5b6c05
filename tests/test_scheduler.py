"""The scheduler's decisions as data (no model), and the whole engine under random arrivals,
aborts and pools small enough to preempt: no block leaks, every finished request equals its solo
run, every request finishes or was aborted."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvcache import BlockManager, CacheConfig, Scope
from kvcache.engine import Engine, EngineConfig, SamplingParams, Scheduler, SchedulerConfig
from kvcache.engine.sequence import Sequence, Status
from kvcache.errors import CapacityError, ConfigError
from kvcache.model import hf

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def seq(rid: str, n: int, start: int = 1, max_tokens: int = 4, tenant: str = "a") -> Sequence:
    return Sequence(
        request_id=rid,
        tokens=list(range(start, start + n)),
        num_prompt_tokens=n,
        scope=Scope(tenant),
        params=SamplingParams(max_tokens=max_tokens),
        generator=torch.Generator(),
        arrival_s=0.0,
    )


def advance(sched: Scheduler, token: int = 7) -> None:
    """What the engine does after a forward: computed marks move; finished chunks sample a token."""
    for seq in sched.complete(sched.schedule()):
        seq.tokens.append(token)


def make(num_blocks: int = 8, budget: int = 8, max_seqs: int = 4) -> Scheduler:
    manager = BlockManager(CacheConfig(num_blocks=num_blocks, block_size=4, vocab_size=1000))
    return Scheduler(manager, SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs))


def test_chunked_prefill_runs_next_to_decoding_sequences() -> None:
    sched = make(num_blocks=16, budget=8)
    a, b = seq("a", 6), seq("b", 13, start=100)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.plan() == [("a", 6), ("b", 2)] and out.admitted == ["a", "b"]
    for s in out.scheduled:
        s.seq.num_computed_tokens += s.num_new_tokens
    a.tokens.append(7)  # a sampled its first token
    assert sched.schedule().plan() == [("a", 1), ("b", 7)]  # a decodes while b's prompt continues
    sched.manager.check_invariants()


def test_fcfs_admission_waits_for_seats_and_blocks() -> None:
    sched = make(num_blocks=4, budget=64, max_seqs=2)
    for rid, start in (("a", 1), ("b", 100), ("c", 200)):
        sched.add(seq(rid, 5, start=start))
    out = sched.schedule()
    assert out.admitted == ["a", "b"] and [s.request_id for s in sched.waiting] == ["c"]  # 2 seats
    sched.finish(sched.running[0], "length")
    out = sched.schedule()
    assert out.admitted == ["c"]  # a's 2 blocks came back
    sched.manager.check_invariants()


def test_a_full_pool_preempts_the_newest_which_keeps_its_written_blocks() -> None:
    sched = make(num_blocks=4, budget=64)
    a, b = seq("a", 8), seq("b", 8, start=100)
    sched.add(a)
    sched.add(b)
    advance(sched)  # both prompts computed (2 blocks each, pool full), each sampled a token
    out = sched.schedule()  # a needs a 3rd block: b (newest) is preempted
    assert out.preempted == ["b"] and out.plan() == [("a", 1)]
    assert (b.status, b.num_computed_tokens, sched.waiting[0]) == (Status.WAITING, 0, b)
    assert sched.manager.lookup(b.tokens[:8], "a") == 4  # its written blocks are cached (one held back
    # by lookup's cap: a whole-prompt hit leaves the last block to compute)
    sched.manager.check_invariants()


def test_a_request_larger_than_the_pool_fails_with_a_typed_error() -> None:
    sched = make(num_blocks=2)
    big = seq("big", 12)
    sched.add(big)
    out = sched.schedule()
    assert out.failed == [big] and isinstance(big.error, CapacityError) and not sched.waiting


def test_bad_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_num_seqs=0"):
        SchedulerConfig(max_num_seqs=0)


# ---- the whole engine under random schedules -------------------------------------------------------


@functools.cache
def _loaded() -> hf.LoadedModel:
    return hf.load_model("tiny-qwen2", device="cpu", dtype=torch.float32)


@functools.cache
def solo_greedy(prompt: tuple[int, ...], n: int) -> list[int]:
    model, tokens, out = _loaded().model, list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1].argmax())
            out.append(token)
            tokens.append(token)
    return out


request = st.tuples(
    st.integers(0, 2),  # step at which it arrives
    st.integers(1, 3),  # prompt family: shared prefixes between requests
    st.integers(8, 26),  # prompt length
    st.integers(1, 8),  # max tokens
    st.sampled_from(["a", "b"]),  # tenant
    st.one_of(st.none(), st.integers(0, 6)),  # step at which it is aborted, if any
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request, min_size=2, max_size=6), num_blocks=st.integers(9, 12))
def test_random_arrivals_aborts_and_preemption(
    requests: list[tuple[int, int, int, int, str, int | None]], num_blocks: int
) -> None:
    config = EngineConfig(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    engine = Engine(_loaded(), config)
    prompts = {
        i: [(f * 37 + j) % 1000 + 1 for j in range(n)] for i, (_, f, n, _, _, _) in enumerate(requests)
    }
    rids: dict[int, object] = {}
    aborted: set[int] = set()
    outputs: dict[int, list[int]] = {i: [] for i in prompts}
    finished: dict[int, str | None] = {}
    step = 0
    while step < 200 and (len(rids) < len(requests) or engine.has_unfinished()):
        for i, (arrive, _, _, max_tokens, tenant, abort_at) in enumerate(requests):
            if arrive == step:
                rids[i] = engine.add_request(prompts[i], tenant, SamplingParams(max_tokens=max_tokens))
            if abort_at is not None and i in rids and abort_at + arrive == step and i not in finished:
                assert engine.abort(rids[i])
                aborted.add(i)
        by_rid = {r: i for i, r in rids.items()}
        for out in engine.step():
            i = by_rid[out.request_id]
            if out.step is not None:
                outputs[i].append(out.step.token_id)
            if out.finished:
                finished[i] = out.finish_reason
        engine.manager.check_invariants()
        step += 1
    assert not engine.has_unfinished() and engine.manager.num_running == 0
    event(f"preemptions: {min(engine.scheduler.num_preemptions, 2)}")
    for i, (_, _, _, max_tokens, _, _) in enumerate(requests):
        assert i in finished or i in aborted  # nothing dropped
        if i in finished and i not in aborted:
            assert finished[i] == "length"
            assert outputs[i] == solo_greedy(tuple(prompts[i]), max_tokens)


def test_preempted_sequences_are_recomputed_to_the_same_tokens() -> None:
    config = EngineConfig(num_blocks=12, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    engine = Engine(_loaded(), config)
    prompts = [[(i * 37 + j) % 1000 + 1 for j in range(14)] for i in range(4)]
    gens = engine.generate_many([(p, "a") for p in prompts], SamplingParams(max_tokens=6))
    assert engine.scheduler.num_preemptions >= 1
    assert [g.output_tokens for g in gens] == [solo_greedy(tuple(p), 6) for p in prompts]
    engine.manager.check_invariants()


def test_manager_abort_keeps_the_blocks_whose_kv_was_written() -> None:
    from kvcache.errors import RequestError

    manager = BlockManager(CacheConfig(num_blocks=8, block_size=4, vocab_size=1000))
    tokens = list(range(1, 15))  # 3 full blocks + 2 tokens
    manager.allocate("r", tokens)
    with pytest.raises(RequestError, match="num_computed_tokens=15"):
        manager.abort("r", 15)
    with pytest.raises(RequestError, match="num_computed_tokens=True"):
        manager.abort("r", True)
    assert manager.num_running == 1  # the failed calls changed nothing
    manager.abort("r", 9)  # blocks 0 and 1 were written, block 2 only partly
    assert manager.lookup([*tokens, 99]) == 8
    manager.check_invariants()
