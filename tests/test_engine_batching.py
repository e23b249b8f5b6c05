"""The batched engine against plain transformers: every sequence of a mixed batch (different
lengths and prefix hits, prefill chunks next to decode steps, several tenants) yields the logits
and greedy tokens of that sequence run alone, for every tiny family; seeded sampling does not
depend on the batch; a quota hit keeps the written prompt cache."""

from __future__ import annotations

import functools

import pytest
import torch

from kvcache import Scope, TenantQuota
from kvcache.engine import Engine, EngineConfig, SamplingParams
from kvcache.errors import QuotaError
from kvcache.model import hf

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-phi"]
BS = 16
ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@functools.cache
def _loaded(name: str) -> hf.LoadedModel:
    return hf.load_model(name, device="cpu", dtype=torch.float32)


def toks(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1024, (n,), generator=g).tolist()  # type: ignore[no-any-return]


@torch.inference_mode()
def solo_logits(model: object, tokens: list[int]) -> torch.Tensor:
    out = model(input_ids=torch.tensor([tokens]), use_cache=False)  # type: ignore[operator]
    return out.logits[0, -1].float()  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_batch_equals_solo_runs(name: str) -> None:
    loaded = _loaded(name)
    engine = Engine(loaded, EngineConfig(num_blocks=96, block_size=BS, max_num_batched_tokens=48))
    system = toks(0, 64)
    engine.publish(system)
    warm = toks(1, 80)
    engine.generate(warm, "a", max_new_tokens=1)  # caches warm's 5 full blocks for tenant a
    engine.generate(system + toks(9, 3), "b", max_new_tokens=1)  # computes the public blocks
    cases = [
        (warm + toks(2, 9), "a", 80),  # all but the last (partial) block cached
        (warm[:40] + toks(3, 30), "a", 32),  # partial hit
        (toks(4, 21), "a", 0),  # nothing cached
        (warm + toks(2, 9), "b", 0),  # same tokens, another tenant: nothing visible
        (system + toks(5, 70), "c", 64),  # the public prefix, then a chunked private prompt
    ]
    num_new = 7
    rids = [
        engine.add_request(p, scope, SamplingParams(max_tokens=num_new), keep_logits=True)
        for p, scope, _ in cases
    ]
    seqs = [engine.sequence(r) for r in rids]
    engine.step_records.clear()
    while engine.has_unfinished():
        engine.step()
        engine.manager.check_invariants()
    assert any(r.num_prefill_tokens and r.num_decode_seqs for r in engine.step_records)  # mixed steps
    for seq, (prompt, _, cached) in zip(seqs, cases, strict=True):
        assert seq.num_cached_tokens == cached
        assert len(seq.output_tokens) == num_new and len(seq.logits) == num_new
        for k in range(num_new):
            expected = solo_logits(loaded.model, prompt + seq.output_tokens[:k])
            torch.testing.assert_close(seq.logits[k], expected, atol=ATOL, rtol=0)
            assert seq.output_tokens[k] == int(expected.argmax())
    assert engine.manager.num_running == 0
    engine.manager.check_invariants()


def test_seeded_sampling_does_not_depend_on_the_batch() -> None:
    loaded = _loaded("tiny-qwen2")
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=1234)
    alone = Engine(loaded, EngineConfig(num_blocks=64, block_size=BS)).generate(toks(6, 30), params=params)
    engine = Engine(loaded, EngineConfig(num_blocks=64, block_size=BS, max_num_batched_tokens=32))
    others = [
        engine.add_request(toks(10 + i, 20 + 7 * i), f"t{i}", SamplingParams(max_tokens=5)) for i in range(3)
    ]
    assert len(others) == 3
    batched = engine.generate(toks(6, 30), params=params)
    assert batched.output_tokens == alone.output_tokens
    different = Engine(loaded, EngineConfig(num_blocks=64, block_size=BS)).generate(
        toks(6, 30), params=SamplingParams(max_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=99)
    )
    assert different.output_tokens != alone.output_tokens  # the seed matters


def test_stop_sequences_and_max_tokens_end_a_request() -> None:
    engine = Engine(_loaded("tiny-qwen2"), EngineConfig(num_blocks=64, block_size=BS))
    p = toks(7, 25)
    free = engine.generate(p, max_new_tokens=8).output_tokens
    stop = (free[2], free[3])
    rid = engine.add_request(p, params=SamplingParams(max_tokens=8, stop=(stop,)))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.step.token_id for o in outs if o.step] == free[:4]
    assert (outs[-1].request_id, outs[-1].finished, outs[-1].finish_reason) == (rid, True, "stop")


def test_quota_hit_during_decode_keeps_the_written_prompt_cache() -> None:
    quotas = {"a": TenantQuota(cap_blocks=4)}
    engine = Engine(_loaded("tiny-qwen2"), EngineConfig(num_blocks=32, block_size=BS, quotas=quotas))
    p = toks(8, 50)  # 4 blocks; decode fills the 4th, the 5th is over the cap
    with pytest.raises(QuotaError, match="cap_blocks=4"):
        engine.generate(p, Scope("a"), max_new_tokens=30)
    assert engine.manager.lookup(p, "a") == 48  # the 3 full prompt blocks were written: still hits
    assert engine.generate(p, Scope("a"), max_new_tokens=2).cached_tokens == 48
    assert engine.manager.num_running == 0
    engine.manager.check_invariants()


def test_abort_from_any_state_frees_blocks_at_once() -> None:
    engine = Engine(_loaded("tiny-qwen2"), EngineConfig(num_blocks=32, block_size=BS, max_num_seqs=1))
    running = engine.add_request(toks(11, 40), "a", SamplingParams(max_tokens=20))
    waiting = engine.add_request(toks(12, 40), "a", SamplingParams(max_tokens=20))
    engine.step()
    assert engine.sequence(running).status.value == "running"
    assert engine.sequence(waiting).status.value == "waiting"
    assert engine.abort(waiting) and engine.abort(running)
    assert not engine.abort(running)  # already over
    assert engine.manager.num_running == 0 and not engine.has_unfinished()
    assert engine.manager.lookup(toks(11, 40), "a") == 32  # its written prompt blocks stay cached
    engine.manager.check_invariants()


def test_async_streams_run_concurrently_and_a_cancelled_one_is_aborted() -> None:
    import asyncio

    from kvcache.engine import AsyncEngine

    loaded = _loaded("tiny-qwen2")
    solo = Engine(loaded, EngineConfig(num_blocks=64, block_size=BS))
    expected = [solo.generate(toks(20 + i, 30), max_new_tokens=6) for i in range(2)]
    engine = Engine(loaded, EngineConfig(num_blocks=64, block_size=BS))

    async def main() -> list[list[int]]:
        front = AsyncEngine(engine)

        async def collect(i: int) -> list[int]:
            stream = front.stream(toks(20 + i, 30), f"t{i}", SamplingParams(max_tokens=6))
            return [s.token_id async for s in stream]

        async def give_up() -> None:
            async for _ in front.stream(toks(30, 30), "t9", SamplingParams(max_tokens=500)):
                break  # the consumer goes away after the first token

        results = await asyncio.gather(collect(0), collect(1), give_up())
        await front.close()
        return [results[0], results[1]]

    assert asyncio.run(main()) == [g.output_tokens for g in expected]
    assert not engine.has_unfinished() and engine.manager.num_running == 0
    assert max(r.num_decode_seqs for r in engine.step_records) >= 2  # the streams shared steps
    engine.manager.check_invariants()


def test_a_stream_gets_its_first_token_when_the_engine_steps_before_the_stream_resumes() -> None:
    """The engine thread may run a request's first step before the stream's coroutine resumes
    after the add (the event loop is busy): that step's token still reaches the stream."""
    import asyncio
    import time

    from kvcache.engine import AsyncEngine

    engine = Engine(_loaded("tiny-qwen2"), EngineConfig(num_blocks=64, block_size=BS))
    solo = Engine(_loaded("tiny-qwen2"), EngineConfig(num_blocks=64, block_size=BS))
    want = solo.generate(toks(41, 20), max_new_tokens=4).output_tokens
    add = engine.add_request

    async def main() -> list[int]:
        front = AsyncEngine(engine)
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def slow_add(*args: object, **kwargs: object) -> object:
            rid = add(*args, **kwargs)  # type: ignore[arg-type]
            if args[3:4] == ("late",):  # AsyncEngine passes the request id fourth
                time.sleep(0.1)  # the loop submits the next step meanwhile; it queues behind this add
                loop.call_soon_threadsafe(time.sleep, 0.3)  # then the loop is busy while that step runs
            return rid

        engine.add_request = slow_add  # type: ignore[method-assign]

        async def long() -> None:  # keeps the engine stepping
            async for _ in front.stream(toks(40, 20), "t0", SamplingParams(max_tokens=60)):
                started.set()

        async def late() -> list[int]:
            await started.wait()
            stream = front.stream(toks(41, 20), "t1", SamplingParams(max_tokens=4), "late")
            return [s.token_id async for s in stream]

        _, tokens = await asyncio.gather(long(), late())
        await front.close()
        return tokens

    assert asyncio.run(main()) == want


def test_a_stream_with_a_live_request_id_is_refused_and_the_live_one_runs_on() -> None:
    import asyncio

    from kvcache.engine import AsyncEngine
    from kvcache.errors import RequestError

    loaded = _loaded("tiny-qwen2")
    want = Engine(loaded, EngineConfig(num_blocks=64, block_size=BS)).generate(toks(42, 20), max_new_tokens=5)
    engine = Engine(loaded, EngineConfig(num_blocks=64, block_size=BS))

    async def main() -> list[int]:
        front = AsyncEngine(engine)
        first = front.stream(toks(42, 20), "t0", SamplingParams(max_tokens=5), "same")
        tokens = [(await anext(first)).token_id]
        with pytest.raises(RequestError, match="'same' is already in use"):
            await anext(front.stream(toks(43, 20), "t1", SamplingParams(max_tokens=5), "same"))
        tokens += [s.token_id async for s in first]
        await front.close()
        return tokens

    assert asyncio.run(main()) == want.output_tokens
