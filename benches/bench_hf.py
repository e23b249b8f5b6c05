"""Time to first token vs prefix-hit fraction: the engine against no reuse and a hand-written restore.

For each prompt length and hit fraction, in one run:

- ``baseline_uncached``: the bare model prefills the whole prompt (what a server without a prefix
  cache does);
- ``hand``: the bare minimum of reuse written by hand with transformers: one copy
  (``copy.deepcopy``) of the prefix's ``DynamicCache`` kept in memory, then the model on the suffix
  only;
- ``engine``: ``Engine.generate(max_new_tokens=1)`` through the block manager: hash, lookup and
  allocate, one gather from the paged pool, cache construction, model on the suffix, scatter of the
  new blocks, release. Its TTFT is split into engine overhead and model time (``PrefillTimings``).

Every engine run uses a fresh tenant, and the cached prefix is a published public prefix, so each
run hits exactly the asked fraction (rounded down to whole blocks) and nothing more.

Targets: engine overhead <= 20% of the engine's TTFT; engine TTFT <= 1.25x the hand restore.
Settings come from the environment (defaults: CPU, a small random Qwen2 shape):
``BENCH_HF_MODEL`` (small-qwen2), ``BENCH_HF_LENGTHS`` (1024,2048,4096), ``BENCH_HF_HITS``
(0,0.5,0.9,0.99), ``BENCH_HF_DEVICE``, ``BENCH_HF_DTYPE``, ``BENCH_HF_ROUNDS`` (3),
``BENCH_HF_THREADS`` (1), ``BENCH_HF_PLOT`` (a PNG path for TTFT vs hit fraction).
``benches/gpu_hf.sh`` runs the GPU variant (Qwen2.5-7B shape, bf16, 8k and 32k at 90% hit).
The real default model: ``BENCH_HF_MODEL=smollm2-135m BENCH_HF_HITS=0.5,0.9,0.99
BENCH_HF_ROUNDS=5 python benches/bench_hf.py`` (prompts are random token ids of its vocabulary).
"""

from __future__ import annotations

import copy
import functools
import os
import statistics
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvcache.engine import Engine, EngineConfig
from kvcache.lab import tables
from kvcache.lab.tables import Column
from kvcache.model import hf

MODEL = os.environ.get("BENCH_HF_MODEL", "small-qwen2")
LENGTHS = [int(x) for x in os.environ.get("BENCH_HF_LENGTHS", "1024,2048,4096").split(",")]
HITS = [float(x) for x in os.environ.get("BENCH_HF_HITS", "0,0.5,0.9,0.99").split(",")]
DEVICE = os.environ.get("BENCH_HF_DEVICE") or None
DTYPE = os.environ.get("BENCH_HF_DTYPE") or None
ROUNDS = int(os.environ.get("BENCH_HF_ROUNDS", "3"))
THREADS = int(os.environ.get("BENCH_HF_THREADS", "1"))
BLOCK_SIZE = 16

_results: dict[tuple[int, float], dict[str, float]] = {}


@pytest.fixture(autouse=True, scope="module")
def _threads_and_report(request: pytest.FixtureRequest) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    lines = report_lines() if _results else []
    torch.set_num_threads(before)
    if lines:  # printed once output capture has ended
        request.config.add_cleanup(lambda: print("\n".join(lines)))
        plot = os.environ.get("BENCH_HF_PLOT")
        if plot:
            write_plot(plot)


@functools.cache
def engine() -> Engine:
    longest = max(LENGTHS)
    num_blocks = 3 * (longest // BLOCK_SIZE) + 64
    return Engine.load(
        MODEL, EngineConfig(num_blocks=num_blocks, block_size=BLOCK_SIZE, device=DEVICE, dtype=DTYPE)
    )


def prompt(length: int) -> list[int]:
    g = torch.Generator().manual_seed(length)
    return torch.randint(1, engine().vocab_size, (length,), generator=g).tolist()  # type: ignore[no-any-return]


def cached_tokens(length: int, hit: float) -> int:
    return min(int(length * hit), length - 1) // BLOCK_SIZE * BLOCK_SIZE


def sync() -> None:
    if engine().device.type == "cuda":
        torch.cuda.synchronize()


def record(length: int, hit: float, name: str, seconds: float) -> None:
    _results.setdefault((length, hit), {})[name] = seconds


def baseline_uncached(benchmark: Any, length: int, hit: float) -> None:
    eng, tokens = engine(), prompt(length)
    ids = torch.tensor([tokens], device=eng.device)

    @torch.inference_mode()
    def run() -> int:
        token = int(hf.forward(eng.model, ids, hf.new_cache(), 0)[0].argmax())
        sync()
        return token

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(length, hit, "uncached", benchmark.stats.stats.median)
    record(length, hit, "uncached_min", benchmark.stats.stats.min)


def hand_restore(benchmark: Any, length: int, hit: float) -> None:
    eng, tokens = engine(), prompt(length)
    num_cached = cached_tokens(length, hit)
    with torch.inference_mode():
        store = hf.new_cache()  # the prefix's cache, kept in memory
        if num_cached:
            hf.forward(eng.model, torch.tensor([tokens[:num_cached]], device=eng.device), store, 0)
    suffix = torch.tensor([tokens[num_cached:]], device=eng.device)

    @torch.inference_mode()
    def run() -> int:
        cache = copy.deepcopy(store)  # the restore: one copy of the prefix's K and V
        token = int(hf.forward(eng.model, suffix, cache, num_cached)[0].argmax())
        sync()
        return token

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(length, hit, "hand", benchmark.stats.stats.median)
    record(length, hit, "hand_min", benchmark.stats.stats.min)


def engine_reuse(benchmark: Any, length: int, hit: float) -> None:
    eng, tokens = engine(), prompt(length)
    num_cached = cached_tokens(length, hit)
    if num_cached:
        eng.publish(tokens[:num_cached])
        eng.generate(tokens[: num_cached + 1], "bench-fill", max_new_tokens=1)
    counter = iter(range(10**9))
    timings: list[Any] = []

    def run() -> int:
        gen = eng.generate(tokens, f"bench-{length}-{hit}-{next(counter)}", max_new_tokens=1)
        assert gen.cached_tokens == num_cached, (gen.cached_tokens, num_cached)
        timings.append(gen.timings)
        return gen.output_tokens[0]

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    measured = timings[1:]  # the warm-up round is not in the stats
    overhead = statistics.median(t.overhead_s for t in measured)
    model = statistics.median(t.model_s for t in measured)
    benchmark.extra_info.update(overhead_ms=overhead * 1e3, model_ms=model * 1e3)
    record(length, hit, "engine", benchmark.stats.stats.median)
    record(length, hit, "engine_min", benchmark.stats.stats.min)
    record(length, hit, "overhead", overhead)
    record(length, hit, "model", model)


VARIANTS = {"baseline_uncached": baseline_uncached, "hand_restore": hand_restore, "engine": engine_reuse}


# ``variant`` varies fastest, so the three ways of one (length, hit) run back to back under the
# same machine load.
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("hit", HITS)
@pytest.mark.parametrize("length", LENGTHS)
def test_ttft(benchmark: Any, length: int, hit: float, variant: str) -> None:
    benchmark.group = f"TTFT {length} tokens, {hit:.0%} hit"
    benchmark.extra_info["tokens"] = length
    VARIANTS[variant](benchmark, length, hit)


def device_name() -> str:
    dev = engine().device
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def report_lines() -> list[str]:
    eng = engine()
    load = os.getloadavg()
    lines = [
        "",
        f"HF TTFT: {eng.model_id} on {device_name()} {str(eng.dtype).removeprefix('torch.')}, torch threads "
        f"{torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"medians of {ROUNDS}",
    ]
    columns = (  # one row per (prompt length, hit fraction): ((length, hit), its timings)
        Column("tokens", lambda r: r[0][0]),
        Column("hit", lambda r: r[0][1], ".0%"),
        Column("cached", lambda r: cached_tokens(*r[0])),
        Column("uncached ms", lambda r: r[1]["uncached"] * 1e3, ".2f"),
        Column("hand ms", lambda r: r[1]["hand"] * 1e3, ".2f"),
        Column("engine ms", lambda r: r[1]["engine"] * 1e3, ".2f"),
        Column("overhead ms", lambda r: r[1]["overhead"] * 1e3, ".2f"),
        Column("overhead %", lambda r: r[1]["overhead"] / r[1]["engine"], ".1%"),
        Column("engine/hand", lambda r: f"{r[1]['engine'] / r[1]['hand']:.2f}x"),
        Column("(min)", lambda r: f"{r[1]['engine_min'] / r[1]['hand_min']:.2f}x"),
        Column("speedup", lambda r: f"{r[1]['uncached'] / r[1]['engine']:.2f}x"),
    )
    measured = [(k, r) for k, r in sorted(_results.items()) if {"uncached", "hand", "engine"} <= r.keys()]
    lines += tables.plain(columns, measured).splitlines()
    lines.append(
        "targets: overhead % <= 20%, engine/hand <= 1.25x (medians; (min): fastest runs, less exposed to "
        "a busy machine); speedup = uncached / engine"
    )
    return lines


def write_plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for length in sorted({k[0] for k in _results}):
        rows = sorted((h, r) for (n, h), r in _results.items() if n == length and "engine" in r)
        hits = [100 * h for h, _ in rows]
        line = ax.plot(hits, [1e3 * r["engine"] for _, r in rows], marker="o", label=f"{length} engine")
        color = line[0].get_color()
        ax.plot(hits, [1e3 * r["hand"] for _, r in rows], ls=":", color=color, label=f"{length} hand restore")
        ax.plot(
            hits, [1e3 * r["uncached"] for _, r in rows], ls="--", color=color, label=f"{length} uncached"
        )
    ax.set_xlabel("prefix hit (% of prompt tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_yscale("log")
    ax.set_title(f"TTFT vs prefix hit, {engine().model_id} on {device_name()}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


class _Timer:
    """The slice of pytest-benchmark's fixture this module uses, for machines without it."""

    def __init__(self) -> None:
        self.group = ""
        self.extra_info: dict[str, Any] = {}
        self.stats: Any = None

    def pedantic(self, fn: Any, rounds: int, iterations: int = 1, warmup_rounds: int = 0) -> None:
        import time
        from types import SimpleNamespace

        for _ in range(warmup_rounds):
            fn()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=statistics.median(times), min=min(times)))


def main() -> None:
    """Run the same measurements without pytest (e.g. a GPU machine without pytest-benchmark, or a
    slow model): the no-reuse baseline, which does not depend on the hit, runs once per length,
    and the table so far is printed after each length."""
    torch.set_num_threads(THREADS)
    for length in LENGTHS:
        for i, hit in enumerate(HITS):
            for name, variant in VARIANTS.items():
                if name == "baseline_uncached" and i > 0:
                    first = _results[(length, HITS[0])]
                    record(length, hit, "uncached", first["uncached"])
                    record(length, hit, "uncached_min", first["uncached_min"])
                    continue
                variant(_Timer(), length, hit)
        print("\n".join(report_lines()), flush=True)
    plot = os.environ.get("BENCH_HF_PLOT")
    if plot:
        write_plot(plot)


if __name__ == "__main__":
    main()
