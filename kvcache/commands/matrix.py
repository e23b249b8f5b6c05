"""``kvcache matrix``: the routing benchmark matrix (shapes x workers x capacities x policies)."""

from __future__ import annotations

import argparse
import json
import os

HELP = "replay every workload shape x worker count x capacity under every routing policy; judge affinity"


def _list(kind: type, text: str) -> tuple:  # type: ignore[type-arg]
    from kvcache.errors import ConfigError

    try:
        return tuple(kind(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{text!r} must be a comma list of {kind.__name__} values") from None


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="rag,bursty,long_agent,fleet", help="comma list of shapes")
    parser.add_argument("--workers", default="4,16,64", help="comma list of worker counts")
    parser.add_argument(
        "--fractions",
        default="0.05,0.1,0.3",
        help="total capacity as fractions of each trace's unique blocks",
    )
    parser.add_argument(
        "--policy", default="all", help="comma list of policies, or 'all' (the seven baselines and affinity)"
    )
    parser.add_argument(
        "--load", type=float, default=0.5, help="offered prefill load per worker (1.0 = saturated)"
    )
    parser.add_argument("--trace", default=None, help="also replay this Mooncake trace as one more shape")
    parser.add_argument("--max-requests", type=int, default=2500, help="largest synthetic trace")
    parser.add_argument(
        "--latency",
        default=None,
        help="latency model JSON (LatencyModel.to_json, e.g. from kvcache calibrate) the cells are "
        "scaled to --load on and replayed on (default: the built-in model)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    parser.add_argument("--json", default=None, help="write every row and verdict here")
    parser.add_argument("--plot", default=None, help="write the hit vs p99 TTFT plot here (PNG)")


def run(args: argparse.Namespace) -> int:
    from kvcache.costs import LatencyModel
    from kvcache.errors import ConfigError
    from kvcache.lab.matrix import MatrixConfig, plot, run_matrix, summary
    from kvcache.lab.workloads import SHAPES
    from kvcache.router.policies import COMPARED, POLICIES

    shapes = _list(str, args.shapes)
    policies = COMPARED if args.policy == "all" else _list(str, args.policy)
    for name in shapes:
        if name not in SHAPES:
            raise ConfigError(f"--shapes {name!r} is unknown; choose from {', '.join(SHAPES)}")
    for name in policies:
        if name not in POLICIES:
            raise ConfigError(f"--policy {name!r} is unknown; choose from {', '.join(POLICIES)} or 'all'")
    workers, fractions = _list(int, args.workers), _list(float, args.fractions)
    if min(workers) < 1 or not all(0 < f <= 1 for f in fractions) or args.jobs < 1 or args.load <= 0:
        raise ConfigError("--workers must be >= 1, --fractions in (0, 1], --jobs >= 1 and --load > 0")
    cfg = MatrixConfig(
        shapes,
        workers,
        fractions,
        policies,
        args.load,
        max_requests=args.max_requests,
        seed=args.seed,
        trace_path=args.trace,
        latency=LatencyModel.from_json(args.latency) if args.latency else LatencyModel(),
    )
    payload = run_matrix(cfg, jobs=args.jobs)
    print(summary(payload))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(payload, args.plot)
        print(f"wrote {args.plot}")
    return 0
