"""kvcache's router against NVIDIA Dynamo's real KV router (the ``ai-dynamo-runtime`` wheel).

Two comparisons, each measured side by side in one run, with the machine's load:

1. **Index**: one event stream applied to Dynamo's ``RadixTree`` (``apply_event``) and to the
   router's ``PreciseIndex``; then one 64-block prompt that most workers partly hold is scored
   by both (``find_matches`` / ``overlaps``). The per-worker overlap scores must be identical.
   Printed: events applied per CPU-second and lookup microseconds for both, and the ratios.
   Two lookups on each side: the one a router calls (Dynamo's ``find_matches``, which returns
   a Rust object; kvcache's ``overlap_by_slot``, one array of every worker's overlap by index
   slot, which the router gathers into its columns) and the answer as a Python dict (Dynamo's
   ``find_matches(...).scores``; kvcache's ``overlaps``). kvcache's index is bounded as the
   router bounds it (``capacity_blocks``: here the blocks each worker stores, so the bound is
   checked on every event and evicts nothing, and the scores stay comparable).
2. **Replay**: the shared Mooncake trace through Dynamo's offline replay (its mocker engines
   behind the real ``kv_router``, and ``round_robin``) and through ``kvcache.lab.replay``
   under the project's policies, at 16 / 64 / 256 / 1,024 workers. Printed: token hit rate
   and CPU seconds of each, and the ratios.
3. **Matrix shapes** (``--shapes``, instead of 2): each of ``kvcache matrix``'s cells (the
   same ``matrix.cell_trace``, written to a temporary Mooncake file; the matrix's pool per
   fraction, ``matrix.pool_blocks``, raised by the floor below) through Dynamo's kv_router and
   through the project's replay under ``affinity`` and its ``dynamo`` policy. Printed per cell:
   token hit and CPU seconds of each, affinity's hit over Dynamo's, the load average.

Event stream (index): the 64-block prompt is one key chain; of every 8 workers 7 hold a prefix
of it (lengths spread over 1..64), one holds none; every worker also stores 4 chains of 16
blocks of its own and then evicts the last 8 blocks of one (tail first, as a pool evicts). The
project's keys are 16-byte block keys; Dynamo's hashes are the same numbers as 64-bit integers
(``block_hash`` and ``tokens_hash`` both, so its tree walks the same chains). Dynamo receives
its events as the JSON bytes its event plane carries (encoded outside the timing); kvcache
receives ``BlockStored``/``BlockRemoved`` records. "Block events" counts one per block on both.

Capacity (replay): per worker ``max(0.1 x unique blocks / workers, longest request in blocks)``
(prompt and output; ``floored``). The first term is ``kvcache replay``'s ``--capacity-fraction
0.1`` rule (with ``--shapes``, the matrix's pool); the floor is there because Dynamo's offline
replay drops a request longer than a worker's whole pool, and with pools much smaller than the
longest requests it aborts ("effect-free zero-duration pass"; on the shared trace at 64 workers
x 68 blocks, 256 x 17, 1,024 x 4; on bursty at 16 workers x 17 blocks, the longest prompt, as
its output needs an 18th). With the floor every request completes on both sides, so the hit
rates cover the same requests. ``--capacity-blocks`` overrides it for the shared trace. Dynamo's
hit rate is its ``first_admission_prefix_cache_reused_ratio``: prompt tokens reused when a
request is first admitted, over prompt tokens, the project's token hit rate. Its
``prefix_cache_reused_ratio`` also counts what a preempted request reuses of its own blocks when
it is admitted again (printed beside it: up to 5.4 points more in the cells that preempt most).
Its kv_router is not deterministic (about +-1.5% between identical runs).

Timing (``--timing``): each side's replay runs on its own engine model by default, Dynamo's
mocker and the project's latency model, and they differ (the mocker prefills 8,192 tokens in
about 170 ms, the project's default model in about 710 ms), so the same trace loads the two
fleets differently. ``--timing mocker`` replays the project's policies on the mocker's timing:
the project's latency model fitted (``kvcache calibrate``'s least-squares fit) to steps the
mocker timed on probes of one worker (prefills of 512-16,384 tokens, alone and after a cached
prefix; decode steps of 1-128 sequences); ``project,mocker`` runs both. The mocker's other
rules (its admission, eviction and preemption) stay its own. CPU seconds: ``time.process_time()`` (every
thread of the process) around the replay call on both sides; Dynamo runs in a child process per
replay, kvcache in this one, excluding reading the trace.

    python benches/bench_vs_dynamo.py [TRACE] [--workers 16,64,256,1024] [--policies ...]
    python benches/bench_vs_dynamo.py --skip-index --shapes all [--fractions 0.05,0.1,0.3] [--json F]
    python benches/bench_vs_dynamo.py --skip-index --shapes all --timing project,mocker
    pytest benches/bench_vs_dynamo.py --benchmark-only        # the index lookup at 1,024 workers

Needs ``pip install kvcache[bench-dynamo]`` (the ``ai-dynamo-runtime`` wheel); without it the
script exits with a message saying so and pytest skips with that reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvcache.cache.events import BlockRemoved, BlockStored, CacheEvent
from kvcache.child import python_argv
from kvcache.costs import LatencyModel
from kvcache.lab import tables
from kvcache.lab.tables import Column
from kvcache.lab.trace import Trace
from kvcache.router.index import PreciseIndex

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
WORKERS = (16, 64, 256, 1024)
PROMPT_BLOCKS = 64
OWN_CHAINS, OWN_CHAIN_BLOCKS, EVICTED_BLOCKS = 4, 16, 8
MISSING = (
    "NVIDIA Dynamo's router is not installed: this benchmark runs the real one. Install it with "
    "`pip install 'kvcache[bench-dynamo]'` (the ai-dynamo-runtime==1.6.1 wheel, with pydantic and uvloop)."
)


def dynamo_core() -> Any:
    """``dynamo._core``, or a clear message: there is no fallback to measure against."""
    os.environ.setdefault("DYN_LOG", "error")
    try:
        import dynamo._core as core
    except ImportError:
        return None
    return core


def _key(n: int) -> bytes:
    return n.to_bytes(16, "little")


def _as_u64(key: bytes) -> int:
    return int.from_bytes(key[:8], "little")


class EventStream:
    """The same stores and evictions for both indexes, per worker in order."""

    def __init__(self, num_workers: int) -> None:
        self.prompt = [_key(1 + i) for i in range(PROMPT_BLOCKS)]
        self.ours: list[tuple[int, list[CacheEvent]]] = []
        self.dynamo: list[tuple[int, bytes]] = []
        self.held: dict[int, int] = {}  # worker -> prompt blocks it holds
        self.num_block_events = 0
        next_key = 1_000_000
        for w in range(num_workers):
            depth = 0 if w % 8 == 7 else 1 + (w * 37) % PROMPT_BLOCKS
            if depth:
                self.held[w] = depth
                self._store(w, self.prompt[:depth])
            for c in range(OWN_CHAINS):
                chain = [_key(next_key + i) for i in range(OWN_CHAIN_BLOCKS)]
                next_key += OWN_CHAIN_BLOCKS
                self._store(w, chain)
                if c == 0:
                    self._remove(w, chain[::-1][:EVICTED_BLOCKS])

    def _store(self, w: int, chain: list[bytes]) -> None:
        parent = b""
        events: list[CacheEvent] = []
        for i, key in enumerate(chain):
            events.append(BlockStored(key, parent, i, "s"))
            parent = key
        self.ours.append((w, events))
        blocks = [{"block_hash": _as_u64(k), "tokens_hash": _as_u64(k)} for k in chain]
        data = {"stored": {"parent_hash": None, "blocks": blocks}}
        self._dynamo_event(w, data)
        self.num_block_events += len(chain)

    def _remove(self, w: int, keys: list[bytes]) -> None:
        self.ours.append((w, [BlockRemoved(k, 0, "s") for k in keys]))
        self._dynamo_event(w, {"removed": {"block_hashes": [_as_u64(k) for k in keys]}})
        self.num_block_events += len(keys)

    def _dynamo_event(self, w: int, data: dict[str, Any]) -> None:
        self.dynamo.append((w, json.dumps({"event_id": len(self.dynamo), "data": data}).encode()))


def build_ours(stream: EventStream) -> PreciseIndex:
    index = PreciseIndex(capacity_blocks=PROMPT_BLOCKS + OWN_CHAINS * OWN_CHAIN_BLOCKS)
    for w, events in stream.ours:
        index.apply(w, events)
    return index


def build_dynamo(core: Any, stream: EventStream) -> Any:
    tree = core.RadixTree()
    for w, payload in stream.dynamo:
        tree.apply_event(w, payload)
    return tree


def dynamo_scores(tree: Any, keys: list[int]) -> dict[int, int]:
    return {w: n for (w, _dp_rank), n in tree.find_matches(keys).scores.items() if n}


def _cpu_best(fn: Callable[[], object], rounds: int) -> float:
    """Smallest CPU seconds of ``rounds`` calls (the least disturbed by neighbours)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def _lookup_us(fn: Callable[[], object], calls: int, rounds: int = 5) -> float:
    def batch() -> None:
        for _ in range(calls):
            fn()

    return _cpu_best(batch, rounds) / calls * 1e6


def index_row(core: Any, num_workers: int) -> dict[str, Any]:
    stream = EventStream(num_workers)
    ours, tree = build_ours(stream), build_dynamo(core, stream)
    prompt_u64 = [_as_u64(k) for k in stream.prompt]
    got = ours.overlaps(stream.prompt, 0.0)
    want = dynamo_scores(tree, prompt_u64)
    if got != want or got != stream.held:
        raise AssertionError(f"overlap scores differ at {num_workers} workers: kvcache {got} dynamo {want}")
    apply_ours = _cpu_best(lambda: build_ours(stream), 3)
    apply_dynamo = _cpu_best(lambda: build_dynamo(core, stream), 3)
    by_slot = ours.overlap_by_slot(stream.prompt, 0.0)
    assert {ours.slot(w): n for w, n in got.items()} == {s: int(by_slot[s]) for s in by_slot.nonzero()[0]}
    calls = max(20, 20_000 // num_workers)
    return {
        "workers": num_workers,
        "block_events": stream.num_block_events,
        "matching_workers": len(got),
        "ours_events_per_cpu_s": stream.num_block_events / apply_ours,
        "dynamo_events_per_cpu_s": stream.num_block_events / apply_dynamo,
        "ours_lookup_us": _lookup_us(lambda: ours.overlap_by_slot(stream.prompt, 0.0), calls),
        "ours_dict_us": _lookup_us(lambda: ours.overlaps(stream.prompt, 0.0), calls),
        "dynamo_lookup_us": _lookup_us(lambda: tree.find_matches(prompt_u64), calls),
        # the same answer as a Python dict, as ``overlaps`` returns it
        "dynamo_scores_us": _lookup_us(lambda: tree.find_matches(prompt_u64).scores, calls),
    }


INDEX_COLUMNS = (
    Column("workers", "workers", ","),
    Column("block events", "block_events", ","),
    Column("matching", "matching_workers", ","),
    Column("events/CPU-s kvcache", lambda r: f"{r['ours_events_per_cpu_s'] / 1e6:.2f} M"),
    Column("Dynamo", lambda r: f"{r['dynamo_events_per_cpu_s'] / 1e6:.2f} M"),
    Column("ratio", lambda r: f"{r['ours_events_per_cpu_s'] / r['dynamo_events_per_cpu_s']:.2f}x"),
    Column("lookup us kvcache `overlap_by_slot`", "ours_lookup_us", ".1f"),
    Column("Dynamo `find_matches`", "dynamo_lookup_us", ".1f"),
    Column("ratio", lambda r: f"{r['ours_lookup_us'] / r['dynamo_lookup_us']:.2f}x"),
    Column("as a dict: kvcache `overlaps`", "ours_dict_us", ".1f"),
    Column("Dynamo `.scores`", "dynamo_scores_us", ".1f"),
    Column("ratio", lambda r: f"{r['ours_dict_us'] / r['dynamo_scores_us']:.2f}x"),
)


def index_table(rows: list[dict[str, Any]]) -> str:
    return tables.markdown(INDEX_COLUMNS, rows)


# Run in a child per replay: Dynamo's runtime starts threads, and its CPU time is its own.
_DYNAMO_REPLAY = """
import json, os, sys, time
os.environ.setdefault("DYN_LOG", "error")
from dynamo._core import KvRouterConfig, run_mocker_trace_replay
trace, workers, capacity, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
engine = {"block_size": 512, "num_gpu_blocks": capacity, "max_num_seqs": 128,
          "max_num_batched_tokens": 8192, "enable_prefix_caching": True, "enable_chunked_prefill": True}
start = time.process_time()
result = run_mocker_trace_replay([trace], extra_engine_args={"engine": engine},
    router_config=KvRouterConfig(), num_workers=workers, router_mode=mode,
    trace_format="mooncake", trace_block_size=512)
cpu_s = time.process_time() - start
s = result.summary
print(json.dumps({"cpu_s": cpu_s, "token_hit_rate": s["first_admission_prefix_cache_reused_ratio"],
    "reused_with_readmissions": s["prefix_cache_reused_ratio"],
    "completed": s["completed_requests"], "requests": s["num_requests"], "p99_ttft_ms": s["p99_ttft_ms"]}))
"""

# Dynamo's mocker timed on probes, one worker: prefills alone (some after a cached prefix) and
# decode steps of 1-128 sequences. Prints one step per line: prefill tokens, attention work,
# decoding sequences, milliseconds (a prefill of ceil(n / 8192) chunks: its TTFT split evenly).
_DYNAMO_PROBE = """
import json, os, sys
os.environ.setdefault("DYN_LOG", "error")
from dynamo._core import KvRouterConfig, run_mocker_trace_replay
path = sys.argv[1]
engine = {"block_size": 512, "num_gpu_blocks": 4000, "max_num_seqs": 128,
          "max_num_batched_tokens": 8192, "enable_prefix_caching": True, "enable_chunked_prefill": True}
next_id = [1]
def fresh(n):
    next_id[0] += n
    return list(range(next_id[0] - n, next_id[0]))
def run(reqs):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\\n" for r in reqs)
    result = run_mocker_trace_replay([path], extra_engine_args={"engine": engine},
        router_config=KvRouterConfig(), num_workers=1, router_mode="round_robin",
        trace_format="mooncake", trace_block_size=512, capture_per_request=True)
    return sorted(result.per_request, key=lambda r: r["arrival_time_ms"])
reqs, shapes, t = [], [], 0
for blocks in (1, 2, 4, 8, 16, 32):
    prefix = fresh(blocks)
    reqs.append({"timestamp": t, "input_length": blocks * 512, "output_length": 2, "hash_ids": prefix})
    shapes.append((blocks * 512, 0))
    reqs.append({"timestamp": t + 60000, "input_length": (blocks + 1) * 512, "output_length": 2,
                 "hash_ids": prefix + fresh(1)})
    shapes.append((512, blocks * 512))
    t += 120000
for rec, (n, cached) in zip(run(reqs), shapes):
    assert rec["reused_input_tokens"] == cached, (rec["reused_input_tokens"], cached)
    chunks = -(-n // 8192)
    for c in range(chunks):
        m = min(8192, n - c * 8192)
        print(json.dumps([m, m * (cached + c * 8192 + m / 2), 0, rec["ttft_ms"] / chunks]))
for seqs in (1, 4, 16, 64, 128):
    recs = run([{"timestamp": 0, "input_length": 512, "output_length": 256, "hash_ids": fresh(1)}
                for _ in range(seqs)])
    itl = sorted(r["itl_ms"] for r in recs)[len(recs) // 2]
    print(json.dumps([0, 0.0, seqs, itl]))
"""


def dynamo_replay(trace: Path, workers: int, capacity: int, mode: str) -> dict[str, Any]:
    proc = subprocess.run(
        python_argv("-c", _DYNAMO_REPLAY, str(trace), str(workers), str(capacity), mode),
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "DYN_LOG": "error"},
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return row


def mocker_latency() -> LatencyModel:
    """The project's latency model fitted to Dynamo's mocker engine (``kvcache calibrate``'s
    least-squares fit, on steps timed by the mocker instead of the engine): replays on it run the
    project's policies on the timing Dynamo's router was measured on."""
    from kvcache.engine.engine import StepRecord
    from kvcache.lab.calibration import fit

    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            python_argv("-c", _DYNAMO_PROBE, str(Path(tmp) / "probe.jsonl")),
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "DYN_LOG": "error"},
            check=False,
        )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"timing Dynamo's mocker failed: {tail}")
    steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    records = [StepRecord(int(p), int(d), 0, float(w), ms / 1000, ms / 1000) for p, w, d, ms in steps]
    return fit(records, max_num_seqs=128, max_num_batched_tokens=8192)


def ours_replay(
    trace: Any, prompts: Any, workers: int, capacity: int, policy: str, latency: LatencyModel | None = None
) -> dict[str, Any]:
    from kvcache.lab import report
    from kvcache.lab.replay import ReplayConfig, replay

    config = ReplayConfig(workers, capacity, policy, latency=latency or LatencyModel())
    start = time.process_time()
    result = replay(trace, config, prompts=prompts)
    cpu_s = time.process_time() - start
    m = report.metrics(result)
    return {
        "cpu_s": cpu_s,
        "token_hit_rate": m["token_hit_rate"],
        "completed": m["completed"],
        "p99_ttft_ms": m["p99_ttft_ms"],
    }


def floored(capacity_blocks: int, longest_blocks: int) -> int:
    """A worker's pool raised to the longest request (``longest_blocks``), so Dynamo's offline
    replay drops no request and never aborts on a pool far smaller than the requests (see the
    module docstring)."""
    return max(capacity_blocks, longest_blocks)


def replay_capacity(unique_blocks: int, longest_blocks: int, workers: int) -> int:
    return floored(max(1, int(0.1 * unique_blocks / workers)), longest_blocks)


def longest_blocks(trace: Trace) -> int:
    """The longest request of a trace, prompt and output, in 512-token blocks (the floor of
    ``floored``): a pool of only the prompt's blocks still aborts Dynamo's replay when the output
    needs one more (bursty at 16 workers: 17 prompt blocks, 18 with the output)."""
    return max(-(-(r.num_tokens + r.output_tokens) // 512) for r in trace.requests)


def replay_rows(
    trace_path: Path,
    workers: list[int],
    policies: list[str],
    modes: list[str],
    capacity: int | None,
    timings: dict[str, LatencyModel | None],
) -> list[dict[str, Any]]:
    from kvcache.lab.replay import prepare
    from kvcache.lab.trace import read_trace

    trace = read_trace(trace_path, 512)
    prompts = prepare(trace, 512)
    unique = trace.unique_blocks(512)
    longest = longest_blocks(trace)
    rows = []
    for w in workers:
        cap = capacity or replay_capacity(unique, longest, w)
        row: dict[str, Any] = {"workers": w, "capacity": cap, "rule": max(1, int(0.1 * unique / w))}
        for mode in modes:
            row[f"dynamo {mode}"] = dynamo_replay(trace_path, w, cap, mode)
        for policy in policies:
            for suffix, latency in timings.items():
                row[policy + suffix] = ours_replay(trace, prompts, w, cap, policy, latency)
        row["load"] = os.getloadavg()[0]
        rows.append(row)
        print(
            replay_table([row], [p + s for p in policies for s in timings], modes).splitlines()[-1],
            flush=True,
        )
    return rows


def replay_table(rows: list[dict[str, Any]], policies: list[str], modes: list[str]) -> str:
    names = [f"dynamo {m}" for m in modes] + policies

    def cpu_ratios(r: dict[str, Any]) -> str:
        ref = r.get("dynamo kv_router", {})
        return " / ".join(f"{r[p]['cpu_s'] / ref['cpu_s']:.2f}x" if "cpu_s" in ref else "-" for p in policies)

    columns = [
        Column(
            "workers (blocks each; 0.1 rule)",
            lambda r: f"{r['workers']:,} ({r['capacity']}; {r['rule']})",
            align="<",
        ),
        *(Column(f"{n} hit / CPU-s", lambda r, n=n: _hit_cpu(r[n]), align="<") for n in names),
        Column("kvcache CPU / Dynamo kv_router CPU", cpu_ratios, align="<"),
        Column("load", "load", ".2f", align="<"),
    ]
    return tables.markdown(columns, rows)


def shape_rows(
    shapes: list[str],
    workers: list[int],
    fractions: list[float],
    policies: list[str],
    timings: dict[str, LatencyModel | None],
) -> list[dict[str, Any]]:
    """Every matrix cell (shape x workers x fraction) through Dynamo's kv_router and the project's
    replay under ``policies``, at the matrix's pool raised by ``floored``. Fractions whose pools
    come out equal share one replay of each side (the row says so with ``shared_with``)."""
    from kvcache.lab.matrix import MatrixConfig, cell_trace, pool_blocks
    from kvcache.lab.replay import prepare
    from kvcache.lab.trace import write_trace

    cfg = MatrixConfig(shapes=tuple(shapes), workers=tuple(workers), fractions=tuple(fractions))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            for w in workers:
                trace = cell_trace(shape, w, cfg)
                path = Path(tmp) / f"{shape}-{w}.jsonl"
                write_trace(path, trace.requests)
                prompts = prepare(trace, 512)
                unique = trace.unique_blocks()
                mean_blocks = sum(len(p.keys) for p in prompts) / len(prompts)
                longest = longest_blocks(trace)
                done: dict[int, dict[str, Any]] = {}  # capacity -> the row that replayed it
                for fraction in fractions:
                    pool = pool_blocks(fraction, unique, w, mean_blocks)
                    cap = floored(pool, longest)
                    row: dict[str, Any] = {
                        "shape": shape,
                        "workers": w,
                        "fraction": fraction,
                        "requests": len(trace.requests),
                        "matrix_pool": pool,
                        "capacity": cap,
                        "longest": longest,
                    }
                    if cap in done:
                        first = done[cap]
                        row.update({k: v for k, v in first.items() if k not in row and k != "fraction"})
                        row["shared_with"] = first["fraction"]
                    else:
                        row["dynamo kv_router"] = dynamo_replay(path, w, cap, "kv_router")
                        for policy in policies:
                            for suffix, latency in timings.items():
                                row[policy + suffix] = ours_replay(trace, prompts, w, cap, policy, latency)
                        row["load"] = os.getloadavg()[0]
                        done[cap] = row
                    rows.append(row)
                    print(shape_table([row], policies, timings).splitlines()[-1], flush=True)
    return rows


def _hit_cpu(cell: dict[str, Any]) -> str:
    return (
        f"error: {cell['error']}"
        if "error" in cell
        else f"{cell['token_hit_rate']:.1%} / {cell['cpu_s']:.1f}"
    )


def shape_table(
    rows: list[dict[str, Any]], policies: list[str], timings: dict[str, LatencyModel | None]
) -> str:
    """One line per replayed pool: fractions of a (shape, workers) trace that share a pool share
    a line. A pool raised by the floor shows as ``matrix -> run``."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["workers"], r["capacity"]), []).append(r)

    def pool(group: list[dict[str, Any]]) -> str:
        pools = sorted({g["matrix_pool"] for g in group})
        capacity = group[0]["capacity"]
        return "/".join(map(str, pools)) + (f" -> {capacity}" if capacity != pools[0] else "")

    def dynamo(group: list[dict[str, Any]]) -> str:
        ref = group[0]["dynamo kv_router"]
        dropped = ref.get("requests", 0) - ref.get("completed", 0)
        return _hit_cpu(ref) + (f" ({dropped} dropped)" if dropped > 0 else "")

    def hit_ratio(group: list[dict[str, Any]], name: str) -> str:
        ref, me = group[0]["dynamo kv_router"], group[0].get(name, {})
        if "token_hit_rate" in ref and "token_hit_rate" in me and ref["token_hit_rate"]:
            return f"{me['token_hit_rate'] / ref['token_hit_rate']:.2f}x"
        return "-"

    def ours(name: str) -> Column:
        return Column(f"kvcache `{name}`", lambda g: _hit_cpu(g[0][name]), align="<")

    def ratio(suffix: str) -> Column:
        return Column(f"affinity{suffix} / Dynamo", lambda g: hit_ratio(g, "affinity" + suffix))

    names = [p + suffix for p in policies for suffix in timings]
    columns = [
        Column("shape", lambda g: g[0]["shape"], align="<"),
        Column("workers", lambda g: g[0]["workers"], ","),
        Column("requests", lambda g: g[0]["requests"], ","),
        Column("fractions", lambda g: ", ".join(f"{x['fraction']:.0%}" for x in g), align="<"),
        Column("pool: matrix -> run", pool),
        Column("Dynamo kv_router hit / CPU-s", dynamo, align="<"),
        Column(
            "its hit with re-admissions",
            lambda g: g[0]["dynamo kv_router"].get("reused_with_readmissions", float("nan")),
            ".1%",
        ),
        Column(
            "its p99 TTFT s (mocker)",
            lambda g: g[0]["dynamo kv_router"].get("p99_ttft_ms", float("nan")) / 1000,
            ",.1f",
        ),
        *(ours(n) for n in names),
        *(ratio(suffix) for suffix in timings if "affinity" in policies),
        Column("load", lambda g: g[0]["load"], ".2f"),
    ]
    return tables.markdown(columns, groups.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trace", nargs="?", type=Path, default=DEFAULT_TRACE, help="Mooncake JSONL trace")
    parser.add_argument("--workers", default=",".join(map(str, WORKERS)))
    parser.add_argument(
        "--policies",
        default=None,
        help="kvcache policies (default: round_robin,dynamo,affinity; with --shapes affinity,dynamo)",
    )
    parser.add_argument(
        "--shapes", default=None, help="replay these matrix shapes ('all': every one) instead of TRACE"
    )
    parser.add_argument(
        "--fractions", default="0.05,0.1,0.3", help="with --shapes: the matrix's pool fractions"
    )
    parser.add_argument("--json", type=Path, default=None, help="with --shapes: write every row here")
    parser.add_argument("--dynamo-modes", default="kv_router,round_robin")
    parser.add_argument("--capacity-blocks", type=int, default=None, help="override the capacity rule")
    parser.add_argument("--skip-index", action="store_true")
    parser.add_argument("--skip-replay", action="store_true")
    parser.add_argument(
        "--timing",
        default="project",
        help="the project's replays on 'project' (its default latency model), 'mocker' (the latency "
        "model fitted to Dynamo's mocker engine, the timing Dynamo's router runs on), or both "
        "('project,mocker')",
    )
    args = parser.parse_args(argv)
    core = dynamo_core()
    if core is None:
        print(MISSING, file=sys.stderr)
        return 2
    workers = [int(w) for w in args.workers.split(",")]
    timings: dict[str, LatencyModel | None] = {}
    for name in args.timing.split(","):
        if name not in ("project", "mocker"):
            parser.error(f"--timing {name!r}: give project, mocker or both (project,mocker)")
        timings["" if name == "project" else " @mocker"] = None if name == "project" else mocker_latency()
    if " @mocker" in timings:
        print(f"latency model fitted to Dynamo's mocker: {timings[' @mocker']}")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} cpus")
    if not args.skip_index:
        rows = [index_row(core, w) for w in workers]
        print(f"\nindex: {PROMPT_BLOCKS}-block prompt, identical overlap scores at every size")
        print(index_table(rows))
    if args.shapes:
        from kvcache.lab.workloads import SHAPES

        shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
        policies = (args.policies or "affinity,dynamo").split(",")
        print(
            "\nmatrix shapes through Dynamo's kv_router and kvcache's replay"
            " (pools floored at the longest request)"
        )
        fractions = [float(f) for f in args.fractions.split(",")]
        rows = shape_rows(shapes, workers, fractions, policies, timings)
        print(shape_table(rows, policies, timings))
        if args.json:
            fitted = {k.strip(): dataclasses.asdict(v) for k, v in timings.items() if v is not None}
            record = {"load_before": load, "timings": fitted, "rows": rows}
            args.json.write_text(json.dumps(record, indent=1) + "\n")
    elif not args.skip_replay:
        if not args.trace.is_file():
            print(f"trace {args.trace} not found; pass its path", file=sys.stderr)
            return 2
        policies = (args.policies or "round_robin,dynamo,affinity").split(",")
        modes = args.dynamo_modes.split(",")
        print(f"\nreplay of {args.trace}")
        rows = replay_rows(args.trace, workers, policies, modes, args.capacity_blocks, timings)
        print(replay_table(rows, [p + s for p in policies for s in timings], modes))
    load = os.getloadavg()
    print(f"\nload average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


@pytest.fixture(scope="module")
def core() -> Any:
    found = dynamo_core()
    if found is None:
        pytest.skip(MISSING)
    return found


@pytest.mark.parametrize("side", ["dynamo", "kvcache"])
def test_index_lookup_1024_workers(benchmark: Any, core: Any, side: str) -> None:
    benchmark.group = "index lookup, 64-block prompt, 1,024 workers"
    stream = EventStream(1024)
    if side == "dynamo":
        benchmark.name = benchmark.name.replace("test_index_lookup", "test_index_lookup_baseline")
        tree, keys = build_dynamo(core, stream), [_as_u64(k) for k in stream.prompt]
        benchmark(lambda: tree.find_matches(keys))  # what a router calls: a Rust object
        scores = dynamo_scores(tree, keys)
    else:
        index = build_ours(stream)
        benchmark(lambda: index.overlap_by_slot(stream.prompt, 0.0))  # what the router calls
        scores = index.overlaps(stream.prompt, 0.0)
    assert scores == stream.held
    benchmark.extra_info["load"] = os.getloadavg()[0]


if __name__ == "__main__":
    sys.exit(main())
