"""CPU seconds of the trace replay (``kvcache.lab.replay.replay``) on a few matrix cells and on the
shared Mooncake trace, this checkout against another one (an older commit, or main), side by side.

    python benches/replay_speed.py --baseline /work/wt/old [--repeats 3] [--json FILE]
    python benches/replay_speed.py --baseline /work/wt/old --instructions   # under valgrind

Each case is one replay: a ``kvcache matrix`` cell (shape, workers, capacity fraction, policy; its
trace and pool as ``matrix.run_cell`` builds them) or the shared trace as ``kvcache replay`` runs
it (capacity = fraction x unique blocks / workers). Only the ``replay`` call is timed, in
``time.process_time`` seconds; building the trace and hashing its prompts are not. Each repeat runs
every case once in a fresh child process per checkout (``PYTHONPATH`` set to that checkout), the
two checkouts alternating which goes first; the table gives each case's median over the repeats
and the ratio ours / baseline, then the sum of the medians. Every replay's results (every job's
worker, times and hit figures, the re-routed and lost counts) are digested, so a run against a
checkout with the same rules (main) also shows whether the results are bit-identical. The load
average is printed before and after.

CPU seconds on a shared machine move with its load (other processes evict the caches).
``--instructions`` counts instead the machine instructions of each case's replay under
valgrind's callgrind (collected only inside ``functools.reduce``, which the child calls the
replay through, after one replay outside it that pays the first-call costs): the same count on
every run, about a minute per case, one run per checkout.

Not here: the replay itself (``kvcache.lab.replay``), the cells (``kvcache.lab.matrix``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvcache.child import python_argv

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
# (shape, workers, fraction, policy): matrix cells across the shapes, worker counts and policies
CELLS = (
    ("rag", 16, 0.1, "affinity"),
    ("bursty", 64, 0.1, "affinity"),
    ("long_agent", 64, 0.1, "affinity"),
    ("long_agent", 16, 0.05, "lpm"),
    ("fleet", 16, 0.1, "round_robin"),
    ("fleet", 64, 0.3, "dynamo"),
)
TRACE_RUNS = ((16, 0.1, "affinity"), (256, 0.1, "affinity"))


def _digest(result: Any) -> str:
    """Every figure the replay produced, as exact float reprs: equal digests, identical results."""
    h = hashlib.sha256(f"{result.num_rerouted} {result.num_lost}".encode())
    for j in result.jobs:
        fields = (
            j.index,
            j.worker_id,
            j.attempts,
            j.start_ms,
            j.first_token_ms,
            j.finish_ms,
            j.cached_tokens,
            j.loaded_tokens,
            j.hit_blocks,
            j.query_blocks,
            j.prefill_tokens,
        )
        h.update(repr(fields).encode())
    return h.hexdigest()[:16]


def run_cases(cases: list[list[Any]], trace_path: str, counted: bool = False) -> list[dict[str, Any]]:
    """Replay every case once in this process (the child's job); ``counted``: replay it once more
    inside ``functools.reduce``, where callgrind collects."""
    from kvcache.lab.matrix import MatrixConfig, cell_trace, pool_blocks
    from kvcache.lab.replay import ReplayConfig, prepare, replay
    from kvcache.lab.trace import read_trace

    out = []
    for kind, name, workers, fraction, policy in cases:
        if kind == "cell":
            trace = cell_trace(name, workers, MatrixConfig(seed=0))
            prompts = prepare(trace, 512)
            mean_blocks = sum(len(p.keys) for p in prompts) / len(prompts)
            capacity = pool_blocks(fraction, trace.unique_blocks(), workers, mean_blocks)
        else:
            trace = read_trace(trace_path, 512)
            prompts = prepare(trace, 512)
            capacity = max(1, int(fraction * trace.unique_blocks(512) / workers))
        config = ReplayConfig(workers, capacity, policy)
        start = time.process_time()
        result = replay(trace, config, block_size=512, prompts=prompts)
        cpu_s = time.process_time() - start
        if counted:
            functools.reduce(lambda _a, _b: replay(trace, config, block_size=512, prompts=prompts), [0, 1])
        out.append({"cpu_s": cpu_s, "digest": _digest(result), "capacity": capacity})
    return out


def _child(tree: Path, cases: list[list[Any]], trace_path: str) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = python_argv(str(Path(__file__).resolve()), "--child", json.dumps(cases), "--trace", trace_path)
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _instructions(tree: Path, case: list[Any], trace_path: str) -> int:
    """Machine instructions of one replay of ``case`` with ``tree``'s code (callgrind)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    child = python_argv(str(Path(__file__).resolve()), "--child", json.dumps([case]), "--trace", trace_path)
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--collect-atstart=no",
        "--toggle-collect=functools_reduce",
        "--callgrind-out-file=/dev/null",
        *child,
        "--counted",
    ]
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    assert found is not None, done.stderr[-2000:]
    return int(found.group(1))


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=None, help="the other checkout (its repo root)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trace", default=str(TRACE), help="the Mooncake trace of the replay runs")
    parser.add_argument("--quick", action="store_true", help="only the first matrix cell and trace run")
    parser.add_argument("--json", type=Path, default=None, help="write every timing here")
    parser.add_argument(
        "--instructions", action="store_true", help="count each replay's instructions (valgrind) instead"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--counted", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_cases(json.loads(args.child), args.trace, args.counted)))
        return
    cells, runs = (CELLS[:1], TRACE_RUNS[:1]) if args.quick else (CELLS, TRACE_RUNS)
    cases: list[list[Any]] = [["cell", s, w, f, p] for s, w, f, p in cells]
    cases += [["trace", "mooncake", w, f, p] for w, f, p in runs]
    trees = {"ours": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    if args.instructions:
        _count(trees, cases, args.trace)
        return
    print(f"load average before: {_load()}")
    runs_by: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in trees}
    for r in range(args.repeats):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            runs_by[name].append(_child(trees[name], cases, args.trace))
    print(f"load average after:  {_load()}")
    header = f"{'case':<34}{'cap':>5}  {'ours s':>7}"
    if args.baseline:
        header += f"  {'base s':>7}  {'ratio':>6}  results"
    print(header)
    totals = dict.fromkeys(trees, 0.0)
    rows = []
    for i, (kind, name, workers, fraction, policy) in enumerate(cases):
        label = f"{'' if kind == 'cell' else 'trace '}{name} {workers}w {fraction:g} {policy}"
        med = {t: statistics.median(run[i]["cpu_s"] for run in runs_by[t]) for t in trees}
        digests = {t: {run[i]["digest"] for run in runs_by[t]} for t in trees}
        assert all(len(d) == 1 for d in digests.values()), f"{label}: a replay gave two results"
        for t in trees:
            totals[t] += med[t]
        line = f"{label:<34}{runs_by['ours'][0][i]['capacity']:>5}  {med['ours']:>7.3f}"
        row = {
            "case": label,
            "cpu_s": med,
            "samples_s": {t: [run[i]["cpu_s"] for run in runs_by[t]] for t in trees},
            "digest": {t: next(iter(d)) for t, d in digests.items()},
        }
        if args.baseline:
            same = digests["ours"] == digests["baseline"]
            line += f"  {med['baseline']:>7.3f}  {med['ours'] / med['baseline']:>6.2f}  "
            line += "identical" if same else "differ"
        print(line)
        rows.append(row)
    if args.baseline:
        ratio = totals["ours"] / totals["baseline"]
        print(f"{'sum of medians':<41}{totals['ours']:>7.3f}  {totals['baseline']:>7.3f}  {ratio:>6.2f}")
    if args.json:
        payload = {"trees": {t: str(p) for t, p in trees.items()}, "repeats": args.repeats, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    sys.stdout.flush()


def _count(trees: dict[str, Path], cases: list[list[Any]], trace_path: str) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind on PATH (apt-get install valgrind)")
    print(f"{'case':<34}" + "".join(f"{name + ' Minstr':>16}" for name in trees) + "   ratio")
    totals = dict.fromkeys(trees, 0)
    for kind, name, workers, fraction, policy in cases:
        label = f"{'' if kind == 'cell' else 'trace '}{name} {workers}w {fraction:g} {policy}"
        counts = {
            t: _instructions(tree, [kind, name, workers, fraction, policy], trace_path)
            for t, tree in trees.items()
        }
        for t in trees:
            totals[t] += counts[t]
        ratio = f"   {counts['ours'] / counts['baseline']:.2f}" if "baseline" in counts else ""
        print(f"{label:<34}" + "".join(f"{counts[t] / 1e6:>16.0f}" for t in trees) + ratio, flush=True)
    ratio = f"   {totals['ours'] / totals['baseline']:.2f}" if "baseline" in totals else ""
    print(f"{'sum':<34}" + "".join(f"{totals[t] / 1e6:>16.0f}" for t in trees) + ratio)


if __name__ == "__main__":
    main()
