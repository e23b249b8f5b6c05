"""The scheduler's seams for a driver without a model: ``complete`` after a step, ``step_shape``
of a step, and runs of steady decode steps skipped at once (equal to taking them one by one)."""

from __future__ import annotations

from kvcache import BlockManager, CacheConfig, Scope
from kvcache.engine.sampling import SamplingParams
from kvcache.engine.scheduler import Scheduler, SchedulerConfig, StepShape, step_shape
from kvcache.engine.sequence import Sequence


def seq(rid: str, n: int, start: int = 1) -> Sequence:
    return Sequence(
        request_id=rid,
        tokens=list(range(start, start + n)),
        num_prompt_tokens=n,
        scope=Scope("a"),
        params=SamplingParams(max_tokens=8),
        generator=None,
        arrival_s=0.0,
    )


def make(num_blocks: int = 16, budget: int = 8) -> Scheduler:
    manager = BlockManager(CacheConfig(num_blocks=num_blocks, block_size=4, vocab_size=1000))
    return Scheduler(manager, SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=4))


def step(sched: Scheduler, token: int = 7) -> list[str]:
    """One step without a model: schedule, complete, sample ``token`` for whoever samples."""
    sampling = sched.complete(sched.schedule())
    for s in sampling:
        s.tokens.append(token)
    return [str(s.request_id) for s in sampling]


def test_complete_names_who_samples_and_step_shape_is_what_the_step_computes() -> None:
    sched = make(budget=8)
    a, b = seq("a", 6), seq("b", 13, start=100)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.plan() == [("a", 6), ("b", 2)]
    assert step_shape(out.scheduled) == StepShape(8, 0, 8, 6 * 3 + 2 * 1)
    assert [s.request_id for s in sched.complete(out)] == ["a"]  # b's prompt is not done
    a.tokens.append(7)
    out = sched.schedule()
    assert out.plan() == [("a", 1), ("b", 7)]
    assert step_shape(out.scheduled) == StepShape(7, 1, 7 + 9, 7 * (2 + 3.5))
    assert [s.request_id for s in sched.complete(out)] == ["a"]
    assert (a.num_computed_tokens, b.num_computed_tokens) == (7, 9)


def test_steady_decode_steps_skipped_at_once_equal_the_steps_one_by_one() -> None:
    one, many = make(budget=16), make(budget=16)
    for sched in (one, many):
        sched.add(seq("a", 5))
        sched.add(seq("b", 5, start=50))
        assert step(sched) == ["a", "b"]  # both prefills in one step
    out = many.schedule()
    assert many.is_steady(out) and many.decode_slack() == 2  # each holds 6 of its 8 slots
    for s in many.complete(out):
        s.tokens.append(7)
    many.skip_decode_steps(2, 7)
    for _ in range(3):
        assert step(one) == ["a", "b"]
    for x, y in zip(one.running, many.running, strict=True):
        assert (x.tokens, x.num_computed_tokens, x.num_allocated_tokens) == (
            y.tokens,
            y.num_computed_tokens,
            y.num_allocated_tokens,
        )
        assert one.manager.block_ids(x.request_id) == many.manager.block_ids(y.request_id)
    assert one.decode_slack() == many.decode_slack() == 0  # the next step grows into new blocks
    many.manager.check_invariants()


def test_a_step_that_admits_is_not_steady() -> None:
    sched = make()
    sched.add(seq("a", 3))
    assert step(sched) == ["a"]
    sched.add(seq("b", 3, start=40))
    out = sched.schedule()
    assert out.admitted == ["b"] and not sched.is_steady(out)
