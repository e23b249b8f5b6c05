"""Does the replay predict the real server? One trace, served for real and simulated, per policy.

    .venv/bin/python benches/sim_vs_real.py                       # tiny model, 2 workers, minutes
    .venv/bin/python benches/sim_vs_real.py --runs 5              # medians of 5 runs
    .venv/bin/python benches/sim_vs_real.py --model smollm2-135m --requests 96 --load 0.5

1. A multi-turn chat trace with one shared system prompt (``lab.workloads.synthesize``, the generator behind
   ``kvcache trace --workload chat --format tokens``), token ids below ``--vocab-size`` so the real
   server takes them as they are.
2. ``kvcache calibrate`` on this machine and model (unless ``--latency FILE``): the latency model.
3. Per policy: a fresh ``kvcache serve --workers N --latency FILE --no-pod-tier`` (the pod tier is
   off because the replay here simulates device pools only), a few warm-up requests, then the
   trace through ``bench-serve``'s loop (Poisson arrivals at ``--rate``, every request in flight
   at once if need be, exactly one pass over the trace). Each request's send time is kept.
4. The same requests through ``kvcache replay``'s simulator with N workers of the same pool size,
   arriving when they were really sent, decoding as many tokens as they really did, on the
   calibrated latency model with the served workers' concurrency (``--max-num-seqs``,
   ``launch.worker_latency``) and the serving overhead outside the engine
   (``request_overhead_ms``), measured once on the first policy's server while it is idle: the
   median over a few requests sent one at a time of TTFT minus the model's prefill
   (``probe_overhead``; ``--overhead MS`` gives it instead). Nothing is fitted at load.
5. A table per policy, measured vs modelled: token hit rate, mean / p50 / p90 TTFT, mean
   end-to-end latency, output throughput, with ratios; the policy ranking by mean TTFT on each
   side; TTFT CDFs per policy in one figure (``--plot``) and everything in JSON (``--out``).

Goals: hit rates within 2 points, p50 and p90 TTFT within 25%, the same ranking. What the
model leaves out shows in the ratios: streaming overheads per output token, how the serving
overhead grows with load, CPU contention between the front, the workers and the load generator
on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
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

import numpy as np

from kvcache.child import python_argv
from kvcache.costs import LatencyModel
from kvcache.lab import serve_bench as bench
from kvcache.lab import serving, tables
from kvcache.lab.replay import ReplayConfig, ReplayResult, replay
from kvcache.lab.tables import Column
from kvcache.lab.trace import FORMAT_TOKENS, Trace, TraceRequest, token_request
from kvcache.lab.workloads import SynthConfig, synthesize
from kvcache.serve import launch

POLICIES = ("round_robin", "least_loaded", "sglang", "affinity")
BLOCK_SIZE = 16


def make_trace(
    num_requests: int,
    *,
    vocab_size: int = 256,
    system_tokens: int = 512,
    user_tokens: int = 64,
    output_tokens: int = 16,
    turns: int = 4,
    seed: int = 0,
) -> list[TraceRequest]:
    """A chat trace: sessions of ``turns`` turns opening with one system prompt shared by all; one
    tenant (the keyless server serves every request in one scope)."""
    cfg = SynthConfig(
        workload="chat",
        num_requests=num_requests,
        num_tenants=1,
        num_system_prompts=1,
        system_prompt_tokens=system_tokens,
        user_tokens=user_tokens,
        output_tokens=output_tokens,
        turns=turns,
        vocab_size=vocab_size,
        seed=seed,
    )
    return [dataclasses.replace(r, tenant="default") for r in synthesize(cfg)]


def offered_rate(trace: list[TraceRequest], latency: LatencyModel, num_workers: int, load: float) -> float:
    """Requests per second that keep ``num_workers`` served workers busy ``load`` of the time,
    by the latency model, one request at a time with no cache hits (an upper bound on the work)."""
    lat = launch.worker_latency(latency, 1)
    service_ms = [lat.prefill_ms(r.num_tokens) + (r.output_tokens - 1) * lat.decode_step_ms(1) for r in trace]
    return load * num_workers * 1000.0 / float(np.mean(service_ms))


def calibrate(model: str, threads: int, out: Path, max_num_seqs: int) -> LatencyModel:
    cmd = [
        *python_argv(),
        "-m",
        "kvcache.cli",
        "calibrate",
        "--model",
        model,
        "--out",
        str(out),
        "--threads",
        str(threads),
        "--max-num-seqs",
        str(max_num_seqs),
    ]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return LatencyModel.from_json(out)


async def _warm_up(url: str, num_workers: int, vocab_size: int) -> None:
    """Two requests per worker at once, on prompts no trace request shares: every worker runs a
    forward pass before timing starts."""
    import aiohttp

    rng = np.random.default_rng(12345)
    async with aiohttp.ClientSession() as session:
        await bench.wait_ready(session, url, timeout_s=300)
        prompts = [rng.integers(1, vocab_size, size=48).tolist() for _ in range(2 * num_workers)]
        reqs = [token_request(p, 2) for p in prompts]
        await asyncio.gather(*(bench._one(session, url, r, {}) for r in reqs))


def measure(
    args: argparse.Namespace,
    policy: str,
    trace: list[TraceRequest],
    latency_path: Path,
    log_dir: Path,
    probe: LatencyModel | None = None,
) -> tuple[list[bench.Result], float, float | None]:
    """Serve ``trace`` for real under ``policy``: a fresh deployment, warm-up, one pass. With
    ``probe`` (the calibrated model), first measure the serving overhead (``probe_overhead``)."""
    port = serving.free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ("--policy", policy, "--latency", str(latency_path), "--no-pod-tier")
    extra += ("--block-size", str(BLOCK_SIZE), "--max-num-seqs", str(args.max_num_seqs))
    cmd = serving.serve_command(
        model=args.model,
        port=port,
        workers=args.workers,
        threads=args.threads,
        num_blocks=args.num_blocks,
        extra=extra,
    )
    env = serving.own_deployment_env()  # serve starts its own Redis and secret
    with (log_dir / f"serve-{policy}.log").open("wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            asyncio.run(_warm_up(url, args.workers, args.vocab_size))
            mean_tokens = int(np.mean([r.num_tokens for r in trace]))
            overhead = (
                None
                if probe is None
                else asyncio.run(probe_overhead(url, probe, mean_tokens, args.vocab_size))
            )
            load = bench.run_load(
                url,
                trace,
                rate=args.rate,
                duration_s=1e9,
                max_concurrency=len(trace),
                keys={},
                seed=args.seed,
                num_prompts=len(trace),
            )
            results, wall_s = asyncio.run(load)
            return results, wall_s, overhead
        finally:
            server.terminate()
            server.wait(timeout=60)


async def probe_overhead(
    url: str, latency: LatencyModel, num_tokens: int, vocab_size: int, num_probes: int = 9
) -> float:
    """The served request's time outside the engine (``LatencyModel.request_overhead_ms``): the
    median, over ``num_probes`` requests sent one at a time to the idle server (fresh prompts of
    ``num_tokens`` tokens that share nothing with the trace), of measured TTFT minus the model's
    prefill time for what was not cached."""
    import aiohttp

    rng = np.random.default_rng(54321)
    gaps = []
    async with aiohttp.ClientSession() as session:
        for _ in range(num_probes):
            req = token_request(rng.integers(1, vocab_size, size=num_tokens).tolist(), 2)
            res = await bench._one(session, url, req, {})
            if res.ok:
                computed = res.prompt_tokens - res.cached_tokens
                gaps.append(1000.0 * res.ttft_s - latency.prefill_ms(computed, res.cached_tokens))
    if not gaps:
        raise RuntimeError("every overhead probe failed; see the server log")
    return max(0.0, float(np.median(gaps)))


def model(
    trace: list[TraceRequest],
    results: list[bench.Result],
    policy: str,
    num_workers: int,
    num_blocks: int,
    latency: LatencyModel,
    max_num_seqs: int,
) -> ReplayResult:
    """The same requests in the simulator: arriving when they were sent, decoding as many tokens
    as the server returned (the requested number for a request that failed)."""
    timed = [
        dataclasses.replace(
            r,
            timestamp_ms=1000.0 * res.sent_s,
            output_tokens=res.output_tokens if res.ok else r.output_tokens,
        )
        for r, res in zip(trace, results, strict=True)
    ]
    timed.sort(key=lambda r: r.timestamp_ms)
    served = launch.worker_latency(latency, max_num_seqs)
    config = ReplayConfig(num_workers, num_blocks, policy, latency=served)
    return replay(Trace(timed, FORMAT_TOKENS, None), config, block_size=BLOCK_SIZE)


def _stats(
    ttft_ms: np.ndarray, e2e_ms: np.ndarray, hit: float, output_tokens: int, duration_s: float
) -> dict[str, Any]:
    return {
        "token_hit_rate": hit,
        "mean_e2e_ms": float(e2e_ms.mean()),
        "mean_ttft_ms": float(ttft_ms.mean()),
        "p50_ttft_ms": float(np.percentile(ttft_ms, 50)),
        "p90_ttft_ms": float(np.percentile(ttft_ms, 90)),
        "output_tok_s": output_tokens / duration_s,
        "ttft_ms": ttft_ms.tolist(),
    }


def measured_stats(results: list[bench.Result], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    hit = sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0
    ttft, e2e = np.array([1000.0 * r.ttft_s for r in ok]), np.array([1000.0 * r.e2e_s for r in ok])
    out = _stats(ttft, e2e, hit, sum(r.output_tokens for r in ok), wall_s)
    out["failed"] = len(results) - len(ok)
    return out


def modelled_stats(result: ReplayResult) -> dict[str, Any]:
    jobs = result.jobs
    prompt = sum(j.request.num_tokens for j in jobs)
    hit = sum(j.cached_tokens for j in jobs) / prompt if prompt else 0.0
    start = min(j.arrival_ms for j in jobs)
    duration_s = (max(j.finish_ms for j in jobs) - start) / 1000.0
    ttft = np.array([j.first_token_ms - j.arrival_ms for j in jobs])
    e2e = np.array([j.finish_ms - j.arrival_ms for j in jobs])
    return _stats(ttft, e2e, hit, sum(j.request.output_tokens for j in jobs), duration_s)


def ranking(rows: dict[str, dict[str, dict[str, Any]]], side: str) -> list[str]:
    return sorted(rows, key=lambda p: rows[p][side]["mean_ttft_ms"])


def median_rows(runs: list[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per policy and side, the median of every figure over ``runs``; TTFT samples pooled."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for policy in runs[0]:
        out[policy] = {}
        for side in ("measured", "modelled"):
            sides = [r[policy][side] for r in runs]
            merged: dict[str, Any] = {}
            for key, value in sides[0].items():
                if isinstance(value, list):
                    merged[key] = [x for s in sides for x in s[key]]
                else:
                    merged[key] = float(np.median([s[key] for s in sides]))
            out[policy][side] = merged
    return out


TABLE_METRICS = (  # (key, title): each one's group of columns, measured, modelled, their ratio
    ("mean_ttft_ms", "mean TTFT ms"),
    ("p50_ttft_ms", "p50 TTFT ms"),
    ("p90_ttft_ms", "p90 TTFT ms"),
    ("mean_e2e_ms", "mean E2E ms"),
    ("output_tok_s", "output tok/s"),
)


_Row = tuple[str, dict[str, dict[str, Any]]]  # (policy, {"measured": stats, "modelled": stats})


def _hit_pct(row: _Row, side: str) -> float:
    return 100 * float(row[1][side]["token_hit_rate"])


def _metric(side: str, key: str) -> Callable[[_Row], float]:
    return lambda r: float(r[1][side][key])


def _metric_ratio(key: str) -> Callable[[_Row], float]:
    """Modelled over measured."""

    def ratio(r: _Row) -> float:
        measured = r[1]["measured"][key]
        return float(r[1]["modelled"][key] / measured) if measured else float("nan")

    return ratio


def table(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One line per policy: measured, modelled and modelled/measured per metric."""

    columns = [
        Column("policy", 0, align="<"),
        Column("hit% real", lambda r: _hit_pct(r, "measured"), ".1f"),
        Column("model", lambda r: _hit_pct(r, "modelled"), ".1f"),
        Column("diff", lambda r: _hit_pct(r, "modelled") - _hit_pct(r, "measured"), "+.1f"),
    ]
    for key, title in TABLE_METRICS:
        columns += [
            Column("|", lambda r: "|", align="<"),  # between metrics
            Column(title, _metric("measured", key), ".1f"),
            Column("model", _metric("modelled", key), ".1f"),
            Column("ratio", _metric_ratio(key), ".2f"),
        ]
    lines = [tables.plain(columns, rows.items())]
    lines.append("ranking by mean TTFT, measured: " + " < ".join(ranking(rows, "measured")))
    lines.append("ranking by mean TTFT, modelled: " + " < ".join(ranking(rows, "modelled")))
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, dict[str, Any]]], path: str, title: str) -> None:
    """Measured (solid) and modelled (dashed) TTFT CDFs, one panel per policy, shared axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if len(rows) > 1 else 1
    nrows = -(-len(rows) // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(5.5 * ncols, 3.4 * nrows),
        sharex=True,
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    for ax, (policy, row) in zip(axes.flat, rows.items(), strict=False):
        for side, style, color in (("measured", "-", "tab:blue"), ("modelled", "--", "tab:red")):
            ttft = np.sort(np.asarray(row[side]["ttft_ms"]))
            ax.step(
                ttft,
                np.arange(1, len(ttft) + 1) / len(ttft),
                style,
                color=color,
                where="post",
                label=f"{side} (p50 {np.percentile(ttft, 50):.0f} ms)",
            )
        ax.set_title(policy)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("TTFT (ms, log scale)")
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of requests")
    for ax in list(axes.flat)[len(rows) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="tiny", help="tiny (default) or smollm2-135m, any serve model")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker and for calibrate")
    parser.add_argument("--num-blocks", type=int, default=1024, help="device pool blocks per worker")
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="sequences each served worker batches (serve --max-num-seqs); 1 = one at a time",
    )
    parser.add_argument("--requests", type=int, default=96, help="trace length")
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--user-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=16, help="mean output tokens per request")
    parser.add_argument("--vocab-size", type=int, default=256, help="token ids are drawn below this")
    parser.add_argument(
        "--load",
        type=float,
        default=0.5,
        help="offered load per worker, by the latency model, no hits (sets --rate)",
    )
    parser.add_argument("--rate", type=float, help="requests per second (overrides --load)")
    parser.add_argument("--latency", help="latency JSON to use instead of running kvcache calibrate")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole comparison; print medians")
    parser.add_argument(
        "--overhead",
        type=float,
        default=None,
        help="request_overhead_ms of the model (default: measured on the first server, idle)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="sim_vs_real.json")
    parser.add_argument("--plot", default="sim_vs_real.png")
    parser.add_argument("--logs", default=None, help="server logs folder (default: a temporary one)")
    args = parser.parse_args()

    log_dir = Path(args.logs or tempfile.mkdtemp(prefix="sim_vs_real-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    trace = make_trace(
        args.requests,
        vocab_size=args.vocab_size,
        system_tokens=args.system_tokens,
        user_tokens=args.user_tokens,
        output_tokens=args.output_tokens,
        seed=args.seed,
    )
    latency_path = Path(args.latency) if args.latency else log_dir / "latency.json"
    if args.latency:
        latency = LatencyModel.from_json(latency_path)
    else:
        latency = calibrate(args.model, args.threads, latency_path, args.max_num_seqs)
    if args.rate is None:
        args.rate = offered_rate(trace, latency, args.workers, args.load)
    print(
        f"{len(trace)} requests, mean prompt {np.mean([r.num_tokens for r in trace]):.0f} tokens, "
        f"{args.workers} workers, rate {args.rate:.2f} req/s; latency {latency}",
        flush=True,
    )
    runs: list[dict[str, dict[str, dict[str, Any]]]] = []
    overheads: list[float] = []
    base = latency
    for run in range(args.runs):
        rows: dict[str, dict[str, dict[str, Any]]] = {}
        run_logs = log_dir / f"run{run + 1}"
        run_logs.mkdir(exist_ok=True)
        for i, policy in enumerate(args.policies.split(",")):
            started = time.monotonic()
            probe = base if i == 0 and args.overhead is None else None
            results, wall_s, overhead = measure(args, policy, trace, latency_path, run_logs, probe)
            if i == 0:  # each run measures the overhead anew on its first, idle server
                overheads.append(overhead if overhead is not None else args.overhead)
                latency = dataclasses.replace(base, request_overhead_ms=overheads[-1])
                how = "measured on the idle server" if overhead is not None else "--overhead"
                print(
                    f"run {run + 1}: serving overhead outside the engine {overheads[-1]:.2f} ms per "
                    f"request ({how})",
                    flush=True,
                )
            sim = model(trace, results, policy, args.workers, args.num_blocks, latency, args.max_num_seqs)
            rows[policy] = {"measured": measured_stats(results, wall_s), "modelled": modelled_stats(sim)}
            failed = rows[policy]["measured"]["failed"]
            took = time.monotonic() - started
            print(f"{policy}: {took:.0f} s, {failed} failed, load {os.getloadavg()[0]:.2f}", flush=True)
        runs.append(rows)
        if args.runs > 1:
            print(table(rows))
    rows = median_rows(runs)
    if args.runs > 1:
        print(f"medians of {args.runs} runs (CDFs: every run's requests pooled):")
    load_after = os.getloadavg()
    print(table(rows))
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; logs in {log_dir}")
    title = (
        f"{args.model}, {args.workers} workers, {len(trace)} chat requests at {args.rate:.1f} req/s; "
        f"measured (serve + bench-serve) vs modelled (replay, calibrated)"
    )
    plot(rows, args.plot, title)
    served = launch.worker_latency(base, args.max_num_seqs)
    report = {
        "args": vars(args),
        "latency": dataclasses.asdict(served),
        "overheads_ms": overheads,
        "runs": runs,
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
