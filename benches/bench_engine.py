"""The batched engine against plain transformers, in one run: throughput, step overhead, cached TTFT.

    BENCH_ENGINE_CB=1 .venv/bin/python -u benches/bench_engine.py   # the table (medians of ROUNDS)
    .venv/bin/pytest benches/bench_engine.py --benchmark-only       # the same, under pytest-benchmark

The model is the project's default (``smollm2-135m``, float32 on CPU) unless ``BENCH_ENGINE_MODEL``
names another. Output tokens/s for N concurrent greedy requests of ``PROMPT`` random tokens plus
``NEW`` new tokens each, for:

- ``sequential``: ``model.generate`` one request after another (baseline a; its rate does not
  depend on N, so it is timed on the first ``BENCH_ENGINE_SEQUENTIAL_SAMPLE`` (2) prompts);
- ``static``: ``model.generate`` on one batch of all N prompts (baseline b; equal lengths, no pad);
- ``cb``: transformers' own continuous batching, ``model.generate_batch`` with ``paged|sdpa``
  (baseline c; slow on CPU, so only with ``BENCH_ENGINE_CB=1``, ``BENCH_ENGINE_CB_ROUNDS`` runs);
- ``engine``: ``Engine.generate_many`` (continuous batching over the paged pool).

Rounds are interleaved (each round runs every contender once), so a change in machine load hits
all of them alike; the figure is the median over ``ROUNDS`` rounds after one small warm-up. Distinct
prompts at N in ``BENCH_ENGINE_SEQS`` (1,8,32), then prompts sharing a ``SHARED``-token system
prompt at N in ``BENCH_ENGINE_SHARED_SEQS`` (8). Then the engine's per-step overhead at the largest
N (step time outside the model forward, from ``StepRecord``), and the TTFT of a ``TTFT_LEN``-token
prompt 90% cached against transformers running the same suffix over a prefix ``DynamicCache``
already in memory (the ideal: nothing to load). The ``step`` part times one decode step at N in
``BENCH_ENGINE_STEP_SEQS`` (1,4,32) sequences of ``PROMPT`` tokens: ``Engine.step`` against
transformers' own decode step (the static batch's forward of one token per sequence over its
``DynamicCache``), interleaved, against the weights-read limit (every weight byte read once per
step at this machine's memory bandwidth, measured in the same rounds by a ``copy_`` of
``BANDWIDTH_MIB`` MiB). ``BENCH_ENGINE_PARTS`` picks parts (``distinct,shared,overhead,ttft,step``;
``step`` is off by default). Threads fixed by ``BENCH_ENGINE_THREADS`` (1); the machine load is printed
before and after.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from kvcache.engine import Engine, EngineConfig, SamplingParams
from kvcache.model import hf
from kvcache.model import registry as models

MODEL = os.environ.get("BENCH_ENGINE_MODEL", models.DEFAULT_MODEL)
SEQS = [int(x) for x in os.environ.get("BENCH_ENGINE_SEQS", "1,8,32").split(",")]
SHARED_SEQS = [int(x) for x in os.environ.get("BENCH_ENGINE_SHARED_SEQS", "8").split(",")]
PARTS = os.environ.get("BENCH_ENGINE_PARTS", "distinct,shared,overhead,ttft").split(",")
PROMPT = int(os.environ.get("BENCH_ENGINE_PROMPT", "128"))
NEW = int(os.environ.get("BENCH_ENGINE_NEW", "32"))
SHARED = int(os.environ.get("BENCH_ENGINE_SHARED", "1024"))
TTFT_LEN = int(os.environ.get("BENCH_ENGINE_TTFT_LEN", "4096"))
ROUNDS = int(os.environ.get("BENCH_ENGINE_ROUNDS", "5"))
THREADS = int(os.environ.get("BENCH_ENGINE_THREADS", "1"))
DEVICE = os.environ.get("BENCH_ENGINE_DEVICE") or None
DTYPE = os.environ.get("BENCH_ENGINE_DTYPE") or None
CB = os.environ.get("BENCH_ENGINE_CB", "0") == "1"
CB_ROUNDS = int(os.environ.get("BENCH_ENGINE_CB_ROUNDS", "1"))
SEQUENTIAL_SAMPLE = int(os.environ.get("BENCH_ENGINE_SEQUENTIAL_SAMPLE", "2"))
STEP_SEQS = [int(x) for x in os.environ.get("BENCH_ENGINE_STEP_SEQS", "1,4,32").split(",")]
STEP_ROUNDS = int(os.environ.get("BENCH_ENGINE_STEP_ROUNDS", "9"))
BANDWIDTH_MIB = 256
BS = 16


def median_s(fn: Callable[[], Any], rounds: int = ROUNDS) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompts(n: int, shared: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(1, 1000, (shared,), generator=g).tolist()
    return [system + torch.randint(1, 1000, (PROMPT,), generator=g).tolist() for _ in range(n)]


class Bench:
    def __init__(self) -> None:
        torch.set_num_threads(THREADS)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(DTYPE or "")
        self.loaded = models.load(MODEL, device=DEVICE, dtype=dtype)
        self.model = self.loaded.model
        self.device = self.loaded.device
        longest = max(SEQS + SHARED_SEQS) * (SHARED + PROMPT + NEW) + 2 * TTFT_LEN
        self.config = EngineConfig(
            num_blocks=longest // BS + 64,
            block_size=BS,
            device=DEVICE,
            dtype=DTYPE,
            max_num_seqs=max(SEQS + SHARED_SEQS),
            max_num_batched_tokens=2048,
        )
        self.rounds = 0
        self.shared_engine = self.engine()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def engine(self) -> Engine:
        return Engine(self.loaded, self.config)

    @torch.inference_mode()
    def sequential(self, batch: list[list[int]]) -> None:
        for p in batch:
            ids = torch.tensor([p], device=self.device)
            self.model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        self.sync()

    @torch.inference_mode()
    def static(self, batch: list[list[int]]) -> None:
        ids = torch.tensor(batch, device=self.device)
        self.model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        self.sync()

    def cb(self, batch: list[list[int]]) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.model.set_attn_implementation("paged|sdpa")
        try:
            config = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)
            # Its cache is sized to the batch (pages of 256 tokens): left to itself it takes 90% of
            # free memory, which on a shared CPU machine is memory others need.
            pages = -(-sum(len(p) + NEW for p in batch) // 256) + 16
            cb_config = ContinuousBatchingConfig(num_blocks=pages)
            self.model.generate_batch(
                inputs=batch, generation_config=config, continuous_batching_config=cb_config
            )
        finally:
            self.model.set_attn_implementation("sdpa")

    def ours(self, batch: list[list[int]]) -> None:
        # One engine for all runs, a fresh tenant each run: nothing cached by an earlier run is
        # visible, so the only reuse is within the run (the shared system prompt), as for the
        # baselines, and no run pays for allocating a pool.
        self.rounds += 1
        tenant = f"run{self.rounds}"
        self.shared_engine.generate_many([(p, tenant) for p in batch], SamplingParams(max_tokens=NEW))
        self.sync()

    def warm_up(self) -> None:
        """Each contender once on two short prompts, off the clock (first-call costs, allocator)."""
        batch = prompts(2, 0, seed=0)
        self.sequential(batch[:1])
        self.static(batch)
        self.ours(batch)
        if CB:
            self.cb(batch)

    def throughput(self, shared: int, seqs: list[int]) -> list[str]:
        lines = []
        for n in seqs:
            batch = prompts(n, shared, seed=n)
            runs: dict[str, Callable[[], None]] = {
                # one request after another: its rate does not depend on N, so it is timed on
                # the first SEQUENTIAL_SAMPLE prompts of the batch
                "sequential": lambda b=batch[:SEQUENTIAL_SAMPLE]: self.sequential(b),
                "static": lambda b=batch: self.static(b),
                "engine": lambda b=batch: self.ours(b),
            }
            if CB:
                runs["cb"] = lambda b=batch: self.cb(b)
            times: dict[str, list[float]] = {name: [] for name in runs}
            for i in range(ROUNDS):
                for name, fn in runs.items():
                    if name == "cb" and i >= CB_ROUNDS:
                        continue
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            tokens = {name: n * NEW for name in runs} | {"sequential": min(n, SEQUENTIAL_SAMPLE) * NEW}
            rate = {name: tokens[name] / statistics.median(t) for name, t in times.items()}
            cb = rate.get("cb", float("nan"))
            best = max(rate["static"], rate.get("cb", 0.0))
            ours = rate["engine"]
            case = "distinct" if not shared else f"shared{shared}"
            lines.append(
                f"{case:<11}{n:>5}{rate['sequential']:>12.1f}{rate['static']:>9.1f}{cb:>9.1f}"
                f"{ours:>9.1f}{ours / rate['sequential']:>7.2f}x{ours / best:>12.2f}x"
            )
        return lines

    def overhead(self) -> str:
        n = max(SEQS)
        engine = self.engine()
        engine.generate_many([(p, "t") for p in prompts(n, 0, seed=99)], SamplingParams(max_tokens=NEW))
        decode = [r for r in engine.step_records if r.num_decode_seqs == n and not r.num_prefill_tokens]
        share = statistics.median((r.seconds - r.model_seconds) / r.seconds for r in decode)
        step_ms = 1000 * statistics.median(r.seconds for r in decode)
        return (
            f"step overhead at {n} seqs: {100 * share:.1f}% of a {step_ms:.1f} ms decode step "
            f"(median of {len(decode)})"
        )

    def bandwidth_bytes_s(self, src: torch.Tensor, dst: torch.Tensor) -> float:
        """Bytes per second of one ``copy_`` between two large buffers (read once, written once)."""
        start = time.perf_counter()
        dst.copy_(src)
        return src.numel() * src.element_size() / (time.perf_counter() - start)

    def decode_steps(self) -> list[str]:
        """One decode step at each N: the engine's against transformers' and the weights-read limit."""
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        src = torch.ones(BANDWIDTH_MIB << 18)  # float32: BANDWIDTH_MIB MiB
        dst = torch.empty_like(src)
        lines = [
            f"decode step, {PROMPT}-token contexts, {weight_bytes / 1e6:.0f} MB of weights; "
            f"medians of {STEP_ROUNDS} interleaved rounds"
        ]
        engine = self.engine()
        for n in STEP_SEQS:
            batch = prompts(n, 0, seed=1000 + n)
            for i, p in enumerate(batch):  # prefilled, then STEP_ROUNDS + 1 decode steps
                engine.add_request(
                    p, f"step{n}", SamplingParams(max_tokens=STEP_ROUNDS + 2), request_id=(n, i)
                )
            ids = [(n, i) for i in range(n)]
            while any(engine.sequence(r).num_computed_tokens < PROMPT for r in ids):
                engine.step()  # prefill (chunked by max_num_batched_tokens), off the clock
            with torch.inference_mode():
                cache = hf.new_cache()
                hf.forward(self.model, torch.tensor(batch, device=self.device), cache, 0)
            nxt = torch.ones((n, 1), dtype=torch.long, device=self.device)
            times: dict[str, list[float]] = {"engine": [], "transformers": [], "bandwidth": []}
            for r in range(STEP_ROUNDS + 1):
                start = time.perf_counter()
                engine.step()
                self.sync()
                engine_s = time.perf_counter() - start
                with torch.inference_mode():
                    start = time.perf_counter()
                    nxt = hf.forward(self.model, nxt, cache, PROMPT + r).argmax(-1, keepdim=True)
                    self.sync()
                    hf_s = time.perf_counter() - start
                rate = self.bandwidth_bytes_s(src, dst)
                if r:  # the first round warms up
                    times["engine"].append(engine_s)
                    times["transformers"].append(hf_s)
                    times["bandwidth"].append(rate)
            while engine.has_unfinished():
                engine.step()
            ours, theirs = statistics.median(times["engine"]), statistics.median(times["transformers"])
            rate = statistics.median(times["bandwidth"])
            limit = weight_bytes / rate
            lines.append(
                f"step {n:>3} seqs: engine {1000 * ours:.1f} ms, transformers "
                f"{1000 * theirs:.1f} ms (engine / transformers {ours / theirs:.2f}x), "
                f"weights-read limit {1000 * limit:.1f} ms at {rate / 1e9:.1f} GB/s "
                f"(engine / limit {ours / limit:.2f}x), load {os.getloadavg()[0]:.2f}"
            )
            print(lines[-1], flush=True)
        return lines

    def ttft(self) -> str:
        g = torch.Generator().manual_seed(7)
        full = torch.randint(1, 1000, (TTFT_LEN,), generator=g).tolist()
        cached = int(0.9 * TTFT_LEN) // BS * BS
        engine = self.engine()
        engine.generate([*full[:cached], 1], "t", max_new_tokens=1)  # caches the prefix blocks
        counter = iter(range(10**9))

        def ours() -> None:
            suffix = torch.randint(1, 1000, (TTFT_LEN - cached,), generator=g).tolist()
            gen = engine.generate(full[:cached] + suffix, "t", max_new_tokens=1, request_id=next(counter))
            assert gen.cached_tokens == cached

        with torch.inference_mode():
            prefix = hf.new_cache()
            hf.forward(self.model, torch.tensor([full[:cached]], device=self.device), prefix, 0)
        times = []
        for i in range(ROUNDS + 1):
            with torch.inference_mode():
                cache = copy.deepcopy(prefix)  # a fresh prefix cache in memory, built off the clock
                suffix = torch.tensor([full[cached:]], device=self.device)
                self.sync()
                start = time.perf_counter()
                int(hf.forward(self.model, suffix, cache, cached)[0].argmax())
                self.sync()
                if i:
                    times.append(time.perf_counter() - start)
        plain = statistics.median(times)
        mine = median_s(ours)
        return (
            f"TTFT {TTFT_LEN}-token prompt, {cached} cached: engine {1000 * mine:.1f} ms, "
            f"transformers suffix over an in-memory DynamicCache {1000 * plain:.1f} ms, "
            f"ratio {mine / plain:.2f}x"
        )


def header(bench: Bench) -> str:
    name = torch.cuda.get_device_name() if bench.device.type == "cuda" else "cpu"
    load = os.getloadavg()
    return (
        f"model {bench.loaded.model_id} on {name} {str(bench.loaded.dtype).removeprefix('torch.')}, "
        f"torch threads {torch.get_num_threads()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"prompt {PROMPT} + {NEW} new tokens, medians of {ROUNDS} runs"
    )


TABLE_HEAD = (
    f"{'case':<11}{'seqs':>5}{'sequential':>12}{'static':>9}{'cb':>9}{'engine':>9}"
    f"{'x seq':>8}{'x best(b,c)':>13}   (output tokens/s)"
)


def report(bench: Bench) -> list[str]:
    lines = [header(bench)]
    print(lines[-1], flush=True)
    bench.warm_up()
    if "distinct" in PARTS or "shared" in PARTS:
        lines.append(TABLE_HEAD)
        print(lines[-1], flush=True)
    for part, shared, seqs in (("distinct", 0, SEQS), ("shared", SHARED, SHARED_SEQS)):
        if part in PARTS:
            for line in bench.throughput(shared, seqs):
                lines.append(line)
                print(line, flush=True)
    if "overhead" in PARTS:
        lines.append(bench.overhead())
        print(lines[-1], flush=True)
    if "ttft" in PARTS:
        lines.append(bench.ttft())
        print(lines[-1], flush=True)
    if "step" in PARTS:
        lines += bench.decode_steps()
    lines.append("load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(lines[-1], flush=True)
    return lines


def main() -> None:
    report(Bench())


def test_engine_benchmark(benchmark: Any) -> None:
    """Under pytest-benchmark: the engine at the largest concurrency, plus the full table printed."""
    bench = Bench()
    batch = prompts(max(SEQS), 0, seed=1)
    benchmark.extra_info["tokens"] = len(batch) * NEW
    benchmark.pedantic(lambda: bench.ours(batch), rounds=ROUNDS, warmup_rounds=1)
    print()
    report(bench)


if __name__ == "__main__":
    main()
