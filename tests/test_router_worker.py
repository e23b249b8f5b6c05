"""The simulated worker runs the engine's scheduler: chunked prefill beside decodes, seats, FCFS,
preemption, prefix reuse, long prompts, spill, failure, runs of decode steps cut by an arrival."""

from __future__ import annotations

import dataclasses

from kvcache import BlockRemoved, BlockStored, Scope
from kvcache.costs import LatencyModel
from kvcache.engine.sampling import SamplingParams
from kvcache.engine.sequence import Sequence
from kvcache.lab.replay import prepare
from kvcache.lab.sim_worker import PLACEHOLDER_TOKEN, Job, SimSequence, SimWorker
from kvcache.lab.trace import FORMAT_MOONCAKE, FORMAT_TOKENS, Trace, TraceRequest

# a step costs its prefill tokens (1 ms each) when it computes any, else 1 ms (a decode step)
LAT = LatencyModel(
    prefill_base_ms=0.0,
    prefill_ms_per_token=1.0,
    prefill_ms_per_token_per_ctx_token=0.0,
    decode_base_ms=1.0,
    decode_ms_per_token_per_seq=0.0,
    max_num_seqs=4,
    max_num_batched_tokens=1000,
)


def jobs(*ids: tuple[int, ...], outputs: int = 3) -> list[Job]:
    reqs = [TraceRequest(0.0, 4 * len(b), outputs, block_ids=b) for b in ids]
    trace = Trace(reqs, FORMAT_MOONCAKE, 4)
    return [Job(i, f"r{i}", r, p, 0.0) for i, (r, p) in enumerate(zip(reqs, prepare(trace, 4), strict=True))]


def drive(w: SimWorker, until_ms: float = float("inf")) -> list[tuple[str, float]]:
    """Advance ``w`` step by step while its work in flight ends by ``until_ms``; the jobs that
    finished, with their finish times."""
    done = []
    while w.busy_until_ms is not None and w.busy_until_ms <= until_ms:
        done += [(job.request_id, job.finish_ms) for job in w.advance(w.busy_until_ms)]
    return done


def test_prefix_reuse_and_timing() -> None:
    w = SimWorker(0, num_blocks=8, block_size=4, latency=LAT)
    a, b = jobs((1, 2, 3), (1, 2, 4))
    w.submit(a, 0.0)  # idle: a's prefill step starts now
    w.submit(b, 0.0)  # busy: b waits for the next step
    assert w.busy_until_ms == 12.0 and w.running == ["r0"] and w.waiting == ["r1"]
    assert [type(e) for e in w.take_events()] == [BlockStored] * 3
    assert drive(w, 12.0) == []
    # step 2: a decodes beside b's prefill of its 4 uncached tokens
    assert (b.start_ms, b.cached_tokens, b.prefill_tokens, b.hit_blocks, b.query_blocks) == (12.0, 8, 4, 2, 3)
    assert w.busy_until_ms == 16.0
    assert drive(w) == [("r0", 17.0), ("r1", 18.0)]
    assert (a.first_token_ms, b.first_token_ms) == (12.0, 16.0)
    w.manager.check_invariants()


def test_request_overhead_adds_to_first_token_and_finish_but_not_to_the_steps() -> None:
    w = SimWorker(0, num_blocks=8, block_size=4, latency=dataclasses.replace(LAT, request_overhead_ms=5.0))
    a, b = jobs((1, 2, 3), (1, 2, 4))
    w.submit(a, 0.0)
    w.submit(b, 0.0)
    drive(w, 12.0)
    assert a.first_token_ms == 17.0 and b.start_ms == 12.0  # the next step starts when the engine is free
    assert drive(w) == [("r0", 22.0), ("r1", 23.0)]


def test_a_long_prompt_is_chunked_while_another_request_decodes() -> None:
    w = SimWorker(0, num_blocks=16, block_size=4, latency=dataclasses.replace(LAT, max_num_batched_tokens=8))
    short, long = jobs((1,), (2, 3, 4, 5, 6, 7), outputs=5)
    w.submit(short, 0.0)
    w.submit(long, 0.0)
    drive(w, 4.0)  # short's prefill: 4 tokens
    assert short.first_token_ms == 4.0 and long.start_ms == 4.0
    # each step: short's decode token and 7 of long's 24 prompt tokens (8 a step), then the last 3
    ends = []
    while w.busy_until_ms is not None and w.busy_until_ms < 28.0:
        ends.append(w.busy_until_ms)
        assert w.advance(w.busy_until_ms) == []
    assert ends == [11.0, 18.0, 25.0] and w.busy_until_ms == 28.0
    assert drive(w, 28.0) == [("r0", 28.0)]  # short's 5th token comes with long's first
    assert long.first_token_ms == 28.0


def test_seats_cap_admissions() -> None:
    w = SimWorker(0, num_blocks=8, block_size=4, latency=dataclasses.replace(LAT, max_num_seqs=1))
    a, b = jobs((1,), (2,))
    w.submit(a, 0.0)
    w.submit(b, 0.0)
    drive(w, 4.0)
    assert w.running == ["r0"] and w.waiting == ["r1"]  # the only seat decodes a
    assert drive(w) == [("r0", 6.0), ("r1", 12.0)]
    assert b.start_ms == 6.0 and b.first_token_ms == 10.0


def test_fcfs_the_head_of_the_queue_is_never_overtaken() -> None:
    w = SimWorker(0, num_blocks=5, block_size=4, latency=LAT)
    a, b, c = jobs((1, 2), (3, 4, 5), (6,))
    for job in (a, b, c):
        w.submit(job, 0.0)
    drive(w, 8.0)
    # a holds 3 blocks once it grows; b needs 3 of the 2 left and waits, c (1 block) waits behind it
    assert w.running == ["r0"] and w.waiting == ["r1", "r2"]
    assert drive(w, 10.0) == [("r0", 10.0)]
    assert w.running == ["r1", "r2"] and b.start_ms == c.start_ms == 10.0


def test_a_full_pool_preempts_the_newest_and_its_written_blocks_stay_cached() -> None:
    w = SimWorker(0, num_blocks=4, block_size=4, latency=LAT)
    a, b = jobs((1, 2), (3,), outputs=6)
    w.submit(a, 0.0)
    w.submit(b, 0.0)
    drive(w, 12.0)  # a's prefill (8 ms), then b's beside a's decode (4 ms)
    assert b.first_token_ms == 12.0
    # a grows into a third block, b into a second: no block is free, so b (the newest) goes back
    assert w.running == ["r0"] and w.waiting == ["r1"] and w.scheduler.num_preemptions == 1
    assert w.manager.lookup(b.prompt) == 4  # the block b wrote stays cached
    finished = drive(w)
    assert [rid for rid, _ in finished] == ["r0", "r1"]
    assert b.first_token_ms == 12.0 and (b.cached_tokens, b.prefill_tokens) == (0, 4)  # its first admission
    w.manager.check_invariants()


def test_a_preempted_token_prompt_comes_back_keyed_by_its_placeholder_outputs() -> None:
    reqs = [
        TraceRequest(0.0, 8, 6, tokens=list(range(1, 9)), tenant="a"),
        TraceRequest(0.0, 4, 6, tokens=[50, 51, 52, 53], tenant="a"),
    ]
    prompts = prepare(Trace(reqs, FORMAT_TOKENS, None), 4)
    a, b = (Job(i, f"r{i}", r, p, 0.0) for i, (r, p) in enumerate(zip(reqs, prompts, strict=True)))
    w = SimWorker(0, num_blocks=4, block_size=4, latency=LAT)
    w.submit(a, 0.0)
    w.submit(b, 0.0)
    drive(w, 12.0)
    assert w.running == ["r0"] and w.waiting == ["r1"] and w.scheduler.num_preemptions == 1
    assert drive(w) == [("r0", 16.0), ("r1", 25.0)]
    assert (b.first_token_ms, b.start_ms, b.cached_tokens, b.prefill_tokens) == (12.0, 8.0, 0, 4)
    # its prompt and the block its placeholder outputs filled stay cached under their keys
    assert w.manager.lookup(w.manager.extend(b.prompt, [PLACEHOLDER_TOKEN] * 5)) == 8
    w.manager.check_invariants()


def test_a_simulated_sequence_reads_as_its_placeholder_tokens_would() -> None:
    def make(cls: type[Sequence], tokens: list[int]) -> Sequence:
        return cls("r", tokens, 5, Scope("a"), SamplingParams(max_tokens=8), None, 0.0)

    sim = make(SimSequence, [PLACEHOLDER_TOKEN] * 3)  # its outputs only
    full = make(Sequence, [PLACEHOLDER_TOKEN] * 8)
    assert sim.num_tokens == full.num_tokens == 8 and sim.output_tokens == full.output_tokens
    for start in range(10):
        for stop in (None, *range(start, 11)):
            assert sim.tokens_between(start, stop) == full.tokens_between(start, stop), (start, stop)
    sim.tokens.append(PLACEHOLDER_TOKEN)
    assert sim.num_tokens == 9 and sim.check_stop(PLACEHOLDER_TOKEN, ()) is None


def test_an_arrival_cuts_a_run_of_decode_steps_at_the_step_in_progress() -> None:
    w = SimWorker(0, num_blocks=8, block_size=4, latency=LAT)
    a, b = jobs((1,), (2,), outputs=10)
    w.submit(a, 0.0)
    drive(w, 4.0)
    assert w.busy_until_ms == 8.0  # 4 decode steps at once: a's second block then fills up
    version = w.version
    w.submit(b, 5.5)
    assert w.busy_until_ms == 6.0 and w.version != version
    drive(w, 6.0)
    assert b.start_ms == 6.0 and w.running == ["r0", "r1"]


def test_waits_for_blocks_then_evicts() -> None:
    w = SimWorker(0, num_blocks=4, block_size=4, latency=LAT)
    a, b = jobs((1, 2, 3), (5, 6), outputs=1)
    w.submit(a, 0.0)
    w.submit(b, 0.0)
    w.take_events()
    assert drive(w, 12.0) == [("r0", 12.0)]  # b waited: 3 of 4 blocks were a's
    assert b.start_ms == 12.0
    assert [type(e) for e in w.take_events()] == [BlockRemoved, BlockStored, BlockStored]


def test_prompt_longer_than_pool_caches_its_head() -> None:
    w = SimWorker(0, num_blocks=2, block_size=4, latency=LAT)
    (a,) = jobs((1, 2, 3, 4))
    w.submit(a, 0.0)
    # 6 of 16 prompt tokens fit beside 2 computed outputs; the other 10 are computed, not cached
    assert w.busy_until_ms == 6.0 + 10.0
    assert [e.block_id for e in w.take_events() if isinstance(e, BlockStored)] == [0]
    assert drive(w) == [("r0", 18.0)]


class FakeTier:
    def __init__(self) -> None:
        self.evicted: list[bytes] = []
        self.asked: list[tuple[int, int]] = []  # (keys, context tokens in front of them)
        self.prestaged: list[tuple[int, int, float]] = []  # (worker, keys, now_ms)

    def on_evict(self, worker_id: int, keys: list[bytes], now_ms: float) -> None:
        self.evicted += keys

    def fetch(
        self, worker_id: int, keys: list[bytes], now_ms: float, context_tokens: int
    ) -> tuple[int, float]:
        self.asked.append((len(keys), context_tokens))
        held = 0
        while held < len(keys) and keys[held] in self.evicted:
            held += 1
        return held, 0.5 * held

    def prestage(self, worker_id: int, keys: list[bytes], now_ms: float) -> None:
        self.prestaged.append((worker_id, len(keys), now_ms))


def test_spill_hook_offloads_and_loads() -> None:
    tier = FakeTier()
    w = SimWorker(0, num_blocks=3, block_size=4, latency=LAT, spill=tier)
    a, b, c = jobs((1, 2), (7, 8, 9), (1, 2, 5), outputs=1)
    for job, t in ((a, 0.0), (b, 10.0)):
        w.submit(job, t)
        drive(w)
    assert tier.evicted == [a.prompt.keys[1], a.prompt.keys[0]]  # tail first
    w.submit(c, 20.0)
    # c's blocks 1, 2 are no longer on the device: all 3 of its blocks are offered for prestaging.
    assert tier.prestaged[-1] == (0, 3, 20.0)
    assert (c.cached_tokens, c.loaded_tokens, c.prefill_tokens) == (0, 8, 4)
    # nothing of c on the device: its blocks asked after no context, short of the last one (the
    # block holding the last prompt token is computed, as the engine does)
    assert tier.asked[-1] == (2, 0)
    assert w.busy_until_ms == 20.0 + 4.0 + 1.0  # 4 tokens computed, and the transfer of 2 blocks


def test_fail_returns_every_job() -> None:
    w = SimWorker(0, num_blocks=8, block_size=4, latency=LAT)
    a, b = jobs((1,), (2,))
    w.submit(a, 0.0)
    w.submit(b, 0.0)
    assert w.fail() == [a, b]
    assert not w.alive and w.manager.num_running == 0 and w.busy_until_ms is None
    w.manager.check_invariants()
