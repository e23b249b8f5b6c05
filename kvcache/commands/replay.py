"""``kvcache replay``: replay a trace over simulated workers under one or every routing policy."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from kvcache.cache.config import DEFAULT_BLOCK_SIZE
from kvcache.commands import _argtypes as argtypes

HELP = "replay a request trace over simulated GPU workers and compare routing policies"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="JSONL trace: Mooncake (hash_ids) or token-level (tokens/text)")
    parser.add_argument("--workers", type=argtypes.positive_int, default=16)
    cap = parser.add_mutually_exclusive_group()
    cap.add_argument(
        "--capacity-blocks",
        default=None,
        help="blocks per worker, or a comma list for a capacity sweep (e.g. 137,274,548)",
    )
    cap.add_argument(
        "--capacity-fraction",
        type=argtypes.fraction,
        default=0.1,
        help="total capacity as a fraction of the trace's unique blocks, split evenly (default 0.1)",
    )
    parser.add_argument(
        "--policy",
        default="affinity",
        help="a policy name, a comma list, or 'all' (round_robin, random, least_loaded, lpm, "
        "dynamo, sglang, lpm_balanced, affinity)",
    )
    parser.add_argument(
        "--mode",
        choices=("precise", "approx"),
        default="precise",
        help="router learns from worker events (precise) or its own decisions (approx)",
    )
    parser.add_argument(
        "--event-delay-ms",
        type=argtypes.non_negative_float,
        default=0.0,
        help="delay of worker events (precise)",
    )
    parser.add_argument(
        "--ttl-s", type=argtypes.positive_float, default=120.0, help="approximate index entry lifetime"
    )
    parser.add_argument(
        "--block-size",
        type=argtypes.positive_int,
        default=None,
        help=f"tokens per block for token traces (default {DEFAULT_BLOCK_SIZE}); Mooncake traces use 512",
    )
    parser.add_argument("--latency", default=None, help="latency model JSON (LatencyModel.to_json)")
    parser.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="WORKER@SECONDS",
        help="remove a worker at SECONDS on the trace's clock (repeatable); a time outside the trace's "
        "arrivals is warned about, as it removes a worker nobody uses or one already idle",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", type=argtypes.output_path, default=None, help="write every metric to this file"
    )
    parser.add_argument(
        "--plot",
        type=argtypes.output_path,
        default=None,
        help="write a PNG of hit rate and p99 TTFT per policy",
    )
    parser.add_argument(
        "--no-bounds", action="store_true", help="skip the shared/infinite cache upper bounds"
    )
    parser.add_argument(
        "--per-worker", action="store_true", help="print each worker's share under every policy"
    )
    parser.add_argument("--markdown", action="store_true", help="also print each table in Markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--tiers",
        default=None,
        metavar="g2=SIZE,g3=SIZE,icms=SIZE",
        help="also replay with spill tiers below each worker's pool and compare with G1-only; SIZE "
        "in blocks or as a multiple of the per-worker capacity (4x); g2/g3 per worker, icms shared",
    )
    parser.add_argument(
        "--no-prestage",
        action="store_true",
        help="with --tiers: do not move a routed request's G3/ICMS blocks towards its worker ahead of need",
    )
    parser.add_argument(
        "--kv-bytes-per-token",
        type=argtypes.positive_int,
        default=None,
        help="KV bytes per token for tier transfer times (default: 8B Llama-3 shape, bf16, 128 KiB)",
    )


def _failures(specs: list[str]) -> tuple[tuple[int, float], ...]:
    from kvcache.errors import ConfigError

    out = []
    for spec in specs:
        worker, sep, seconds = spec.partition("@")
        try:
            if not sep:
                raise ValueError
            out.append((int(worker), float(seconds)))
        except ValueError:
            raise ConfigError(f"--fail {spec!r} must be WORKER@SECONDS, e.g. 3@120") from None
    return tuple(out)


def _warn_outside(failures: tuple[tuple[int, float], ...], first_s: float, last_s: float) -> None:
    """A warning on stderr for each fault outside ``[first_s, last_s]``, the trace's arrivals: it
    would fire before any request or after the last one arrived, so it tests nothing."""
    for worker, seconds in failures:
        if first_s <= seconds <= last_s:
            continue
        when = "before the first request arrives" if seconds < first_s else "after the last request arrived"
        print(
            f"kvcache replay: warning: --fail {worker}@{seconds:g} lies outside the trace, whose requests "
            f"arrive from {first_s:.1f} s to {last_s:.1f} s: worker {worker} fails {when}; pick a time in "
            "that span",
            file=sys.stderr,
        )


def _replay_with_tiers(
    args: argparse.Namespace, trace: Any, config: Any, block_size: int, prompts: Any
) -> dict[str, Any]:
    from kvcache.lab import report, spill_report
    from kvcache.lab.replay import replay
    from kvcache.lab.sim_tiers import KV_BYTES_PER_TOKEN, SimTiers, TierSizes

    sim = SimTiers(
        config.num_workers,
        TierSizes.parse(args.tiers, config.capacity_blocks),
        block_size,
        kv_bytes_per_token=args.kv_bytes_per_token or KV_BYTES_PER_TOKEN,
        prefill=config.latency,
        prestaging=not args.no_prestage,
    )
    result = replay(trace, config, block_size=block_size, prompts=prompts, spill=sim, progress=not args.quiet)
    row = report.metrics(result)
    row["tiers"] = spill_report.tier_metrics(sim, row)
    row["policy"] = f"{config.policy}+tiers"
    return row


def run(args: argparse.Namespace) -> int:
    from kvcache.costs import LatencyModel
    from kvcache.errors import ConfigError
    from kvcache.lab import report
    from kvcache.lab.replay import ReplayConfig, prepare, replay
    from kvcache.lab.trace import MOONCAKE_BLOCK_TOKENS, read_trace
    from kvcache.router.policies import COMPARED, POLICIES

    if args.plot:  # before the replay, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install matplotlib (or kvcache[dev])") from None
    block_size = args.block_size
    trace = read_trace(args.trace, block_size or MOONCAKE_BLOCK_TOKENS)
    if trace.block_tokens is not None:
        block_size = trace.block_tokens
    block_size = block_size or DEFAULT_BLOCK_SIZE
    policies = list(COMPARED) if args.policy == "all" else args.policy.split(",")
    for name in policies:
        if name not in POLICIES:
            raise ConfigError(f"--policy {name!r} is unknown; choose from {', '.join(POLICIES)} or 'all'")
    if args.capacity_blocks:
        try:
            capacities = [int(c) for c in args.capacity_blocks.split(",")]
            if min(capacities) < 1:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"--capacity-blocks {args.capacity_blocks!r} must be integers >= 1, comma separated"
            ) from None
    else:
        unique = trace.unique_blocks(block_size)
        capacities = [max(1, int(args.capacity_fraction * unique / args.workers))]
    latency = LatencyModel.from_json(args.latency) if args.latency else LatencyModel()
    failures = _failures(args.fail)
    if trace.requests:
        _warn_outside(failures, trace.requests[0].timestamp_ms / 1000, trace.requests[-1].timestamp_ms / 1000)
    prompts = prepare(trace, block_size)
    print(
        f"{args.trace}: {len(trace.requests)} requests over {trace.duration_ms / 1000:.0f} s, "
        f"{trace.unique_blocks(block_size)} unique blocks of {block_size} tokens; {args.workers} workers, "
        f"mode {args.mode}"
    )
    rows: list[dict[str, Any]] = []
    bounds: dict[int, dict[str, float]] = {}
    for capacity in capacities:
        for name in policies:
            config = ReplayConfig(
                args.workers,
                capacity,
                name,
                args.mode,
                args.event_delay_ms,
                args.ttl_s * 1000.0,
                latency,
                args.seed,
                failures,
            )
            rows.append(
                report.metrics(
                    replay(trace, config, block_size=block_size, prompts=prompts, progress=not args.quiet)
                )
            )
            if args.tiers:
                rows.append(_replay_with_tiers(args, trace, config, block_size, prompts))
        if not args.no_bounds:
            bounds[capacity] = report.upper_bounds(trace, prompts, block_size, capacity * args.workers)
        at = [r for r in rows if r["capacity_blocks"] == capacity]
        print(f"\n{capacity} blocks per worker ({capacity * args.workers} in all)")
        print(report.table(at))
        if args.markdown:
            print(report.markdown_table(at))
        if args.per_worker:
            for row in at:
                print(report.worker_table(row))
        if args.tiers:
            from kvcache.lab import spill_report

            print(f"\nspill tiers {args.tiers} (token hit rate by tier; TTFT includes transfer times)")
            print(spill_report.table(at))
            if args.markdown:
                print(spill_report.markdown_table(at))
        if capacity in bounds:
            b = bounds[capacity]
            print(
                "upper bounds (one cache, no queueing): same total capacity "
                f"{b['shared_cache_token_hit_rate']:.1%}, "
                f"infinite {b['infinite_cache_token_hit_rate']:.1%} token hit rate"
            )
        if any(r["rerouted"] for r in at):
            print("re-routed after failures: " + ", ".join(f"{r['policy']} {r['rerouted']}" for r in at))
    if args.json:
        payload = {
            "trace": args.trace,
            "block_size": block_size,
            "latency": dataclasses.asdict(latency),
            "results": rows,
            "upper_bounds": {str(c): b for c, b in bounds.items()},
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(rows, args.plot)
        print(f"wrote {args.plot}")
        if args.tiers:
            from pathlib import Path

            from kvcache.lab import spill_report

            tiers_png = Path(args.plot).with_name(Path(args.plot).stem + "-tiers.png")
            spill_report.plot(rows, tiers_png)
            print(f"wrote {tiers_png}")
    return 0
