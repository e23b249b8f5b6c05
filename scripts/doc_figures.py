"""Every deterministic figure in README.md and docs/*.md: the replays behind them, recorded, and
the Markdown the docs show, generated from the record.

    .venv/bin/python scripts/doc_figures.py              # run every replay, record, rewrite the docs
    .venv/bin/python scripts/doc_figures.py mooncake     # only these figures, then rewrite the docs
    .venv/bin/python scripts/doc_figures.py --docs-only  # rewrite the docs from the record

Each figure is one ``kvcache replay`` command (after a ``kvcache trace`` command for a synthetic
trace), run through the CLI itself; its ``--json`` output, without wall-clock times, goes into
``docs/figures.json`` under the figure's name. The docs hold cog blocks
(``<!-- [[[cog ... ]]] -->`` ... ``<!-- [[[end]]] -->``) that call the functions below, which
format the recorded rows with the project's own report code (``kvcache.lab.report``,
``kvcache.lab.spill_report``, ``kvcache.lab.matrix``); ``cog -r -I scripts FILE`` rewrites
them. The router matrix (``kvcache matrix``, ~10 minutes) records itself in
``docs/router_matrix.json`` and the cost-term ablation (``benches/router_ablation.py --json``) in
``docs/router_ablation.json``, the matrix at 256 and 1,024 workers in
``docs/router_matrix_fleet.json`` and the held-out choice of the default
(``benches/router_heldout.py --json``) in ``docs/router_heldout.json`` and
``docs/router_heldout_fleet.json``; this script reruns none of them. ``kvcache tiers`` takes two seconds:
its block runs it directly.

``tests/test_docs_figures.py`` checks that every block matches the record and that the record is
what the current code produces (the Mooncake table whole, affinity's rows of every other figure,
one matrix cell).

Replays are deterministic simulations: the same command gives the same figures on any machine.
Wall-clock figures (replay speed, benchmarks) are measured, not generated, and are not here.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcache.lab import tables
from kvcache.lab.matrix import verdicts_table
from kvcache.lab.tables import Column

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "figures.json"
MATRIX = ROOT / "docs" / "router_matrix.json"
ABLATION = ROOT / "docs" / "router_ablation.json"
FLEET = ROOT / "docs" / "router_matrix_fleet.json"
HELDOUT = ROOT / "docs" / "router_heldout.json"
HELDOUT_FLEET = ROOT / "docs" / "router_heldout_fleet.json"
FORECAST = ROOT / "docs" / "router_forecast.json"
RELEASE = ROOT / "docs" / "router_release.json"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The shared Mooncake trace, as the docs name it: relative to the repository root.
TRACE = "../shared/traces/mooncake_synthetic_trace.jsonl"
TRACE_PATH = ROOT.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
# docs/router.md's slower latency model (a 70B-class prefill), shown there as lat70.json
LAT70 = {
    "prefill_base_ms": 5.0,
    "prefill_ms_per_token": 0.2,
    "prefill_ms_per_token_per_ctx_token": 4e-06,
    "decode_base_ms": 20.0,
    "decode_ms_per_token_per_seq": 0.3,
    "max_num_seqs": 128,
    "max_num_batched_tokens": 8192,
}
TIERS = "g2=4x,g3=16x,icms=16x"
NONE = "\u2013"  # an en dash: a tier a row does not have


@dataclass(frozen=True)
class Figure:
    """``kvcache replay`` arguments; ``TRACE`` is the shared trace, ``{trace}`` the one that
    ``trace`` (``kvcache trace`` arguments after the output file) generates, ``{lat70}`` LAT70
    written as a file. ``plots``: a file the command writes into ``{out}`` -> where it goes."""

    replay: tuple[str, ...]
    trace: tuple[str, ...] = ()
    plots: dict[str, str] = field(default_factory=dict)


MOONCAKE_16 = (TRACE, "--workers", "16", "--capacity-fraction", "0.1")
FIGURES: dict[str, Figure] = {
    "mooncake": Figure(
        (*MOONCAKE_16, "--policy", "all", "--plot", "{out}/p.png"),
        plots={"p.png": "docs/router_mooncake.png"},
    ),
    "sweep": Figure(
        (
            TRACE,
            "--workers",
            "16",
            "--capacity-blocks",
            "137,274,548",
            "--policy",
            "all",
            "--plot",
            "{out}/p.png",
        ),
        plots={"p.png": "docs/router_capacity_sweep.png"},
    ),
    "approx": Figure((*MOONCAKE_16, "--policy", "all", "--mode", "approx")),
    "under_load": Figure((*MOONCAKE_16, "--policy", "all", "--latency", "{lat70}")),
    "failure": Figure(
        (*MOONCAKE_16, "--policy", "dynamo,sglang,affinity", "--fail", "3@300", "--fail", "11@600")
    ),
    "mix": Figure(
        ("{trace}", "--workers", "8", "--policy", "all"),
        trace=("--workload", "mix", "--requests", "3000", "--session-rate", "3"),
    ),
    "shared_prefix": Figure(
        ("{trace}", "--workers", "8", "--policy", "all", "--no-bounds"),
        trace=("--workload", "shared_prefix", "--requests", "2000", "--session-rate", "4"),
    ),
    "tiers": Figure(
        (*MOONCAKE_16, "--policy", "all", "--tiers", TIERS, "--plot", "{out}/p.png"),
        plots={"p-tiers.png": "docs/tiers-replay.png"},
    ),
    "tiers_no_prestage": Figure(
        (*MOONCAKE_16, "--policy", "affinity", "--tiers", TIERS, "--no-prestage", "--no-bounds")
    ),
    **{
        f"tiers_{spec}": Figure((*MOONCAKE_16, "--policy", "affinity", "--tiers", spec, "--no-bounds"))
        for spec in ("g2=4x", "g2=4x,g3=16x", "icms=16x", "g2=4x,g3=16x,icms=100x")
    },
}


def run_figure(
    name: str, trace_path: Path = TRACE_PATH, policies: Sequence[str] = (), plots: bool = False
) -> dict[str, Any]:
    """Run one figure's commands through the CLI and return its record; ``policies``: only these
    (a quicker check of part of a figure); ``plots``: also write its plots into docs/."""
    from kvcache import cli

    fig = FIGURES[name]
    with tempfile.TemporaryDirectory() as out:
        lat70 = Path(out) / "lat70.json"
        lat70.write_text(json.dumps(LAT70), encoding="utf-8")
        synthetic = Path(out) / "trace.jsonl"
        if fig.trace:
            _cli(cli, ["trace", str(synthetic), *fig.trace])
        argv = [a.format(out=out, lat70=lat70, trace=synthetic) for a in fig.replay]
        argv = [str(trace_path) if a == TRACE else a for a in argv]
        if policies:
            argv[argv.index("--policy") + 1] = ",".join(policies)
        if not plots and "--plot" in argv:
            at = argv.index("--plot")
            del argv[at : at + 2]
        _cli(cli, ["replay", *argv, "--quiet", "--json", f"{out}/replay.json"])
        payload = json.loads(Path(out, "replay.json").read_text(encoding="utf-8"))
        if plots:
            for made, dest in fig.plots.items():
                Path(out, made).replace(ROOT / dest)
    for row in payload["results"]:
        del row["wall_s"]  # the one measured, machine-dependent figure of a replay
    generated = "generated: kvcache trace FILE " + " ".join(fig.trace)
    payload["trace"] = TRACE if payload["trace"] == str(trace_path) else generated
    return {"command": _command(fig), **payload}


def _cli(cli: Any, argv: list[str]) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = cli.main(argv)
    if code:
        raise SystemExit(f"kvcache {' '.join(argv)} exited with {code}")
    return out.getvalue()


def _command(fig: Figure) -> str:
    replay = " ".join(a for a in fig.replay if "{out}" not in a and a != "--plot")
    replay = replay.replace("{lat70}", "lat70.json").replace("{trace}", "trace.jsonl")
    return (
        f"kvcache trace trace.jsonl {' '.join(fig.trace)} && " if fig.trace else ""
    ) + f"kvcache replay {replay}"


# ---- the record, as the docs show it ---------------------------------------------------------


def record() -> dict[str, Any]:
    return json.loads(RECORD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def rows(name: str, capacity: int | None = None, policies: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A figure's rows (one capacity of a sweep; only ``policies``, in the order given)."""
    at = [r for r in record()[name]["results"] if capacity is None or r["capacity_blocks"] == capacity]
    if policies:
        at = [next(r for r in at if r["policy"] == p) for p in policies]
    return at


def row(name: str, policy: str, capacity: int | None = None) -> dict[str, Any]:
    return rows(name, capacity, [policy])[0]


def bounds(name: str, capacity: int | None = None) -> dict[str, float]:
    b = record()[name]["upper_bounds"]
    return b[str(capacity)] if capacity is not None else next(iter(b.values()))


def replay_table(name: str, capacity: int | None = None, policies: Sequence[str] = ()) -> str:
    from kvcache.lab import report

    return report.markdown_table(rows(name, capacity, policies)) + "\n"


def tiers_table(name: str) -> str:
    from kvcache.lab import spill_report

    return spill_report.markdown_table(rows(name)) + "\n"


def versus_baselines(name: str, capacity: int | None = None, ours: str = "affinity") -> str:
    """'`affinity` reaches X% of the best baseline's token hit rate (P, Y%), p99 TTFT A ms against
    B ms (Q)': the best baseline by hit rate, and the best by p99 TTFT."""
    at = rows(name, capacity)
    me = next(r for r in at if r["policy"] == ours)
    base = [r for r in at if r["policy"] != ours]
    hit = max(base, key=lambda r: r["token_hit_rate"])
    tail = min(base, key=lambda r: r["p99_ttft_ms"])
    return (
        f"`{ours}` reaches {me['token_hit_rate'] / hit['token_hit_rate']:.1%} of the best baseline's token "
        f"hit rate ({hit['policy']}, {hit['token_hit_rate']:.1%}), p99 TTFT {me['p99_ttft_ms']:,.0f} ms "
        f"against {tail['p99_ttft_ms']:,.0f} ms ({tail['policy']})"
    )


def lowest_ttft(name: str, capacity: int | None = None, ours: str = "affinity") -> str:
    """', with the lowest mean and median TTFT' (those of the two where ``ours`` is lowest), or ''."""
    at = rows(name, capacity)
    me = next(r for r in at if r["policy"] == ours)
    won = [
        label
        for key, label in (("mean_ttft_ms", "mean"), ("median_ttft_ms", "median"))
        if all(me[key] <= r[key] for r in at)
    ]
    return f", with the lowest {' and '.join(won)} TTFT" if won else ""


def brief(name: str, policies: Sequence[str]) -> str:
    """'`affinity` 24.2% token hit, p99 TTFT 7,860 ms; sglang 23.9%, 8,033 ms; ...'."""
    parts = []
    for i, r in enumerate(rows(name, None, policies)):
        label = f"`{r['policy']}`" if r["policy"] == "affinity" else r["policy"]
        if i == 0:
            parts.append(f"{label} {r['token_hit_rate']:.1%} token hit, p99 TTFT {r['p99_ttft_ms']:,.0f} ms")
        else:
            parts.append(f"{label} {r['token_hit_rate']:.1%}, {r['p99_ttft_ms']:,.0f} ms")
    return "; ".join(parts)


def tier_share(r: dict[str, Any], tier: str) -> float:
    """Share of prompt tokens loaded from ``tier`` (g2, g3, icms), or served from G1 (``g1``)."""
    t = r["tiers"]
    return t["device_token_hit_rate"] if tier == "g1" else t[tier]["token_hit_rate"]  # type: ignore[no-any-return]


def change(before: float, after: float) -> float:
    return (after - before) / before


def tiers_by_spec_table() -> str:
    """docs/tiers.md: affinity with each combination of tiers, against G1-only."""
    g1 = row("mooncake", "affinity")

    def share(tier: str) -> Callable[[tuple[str, dict[str, Any]]], str]:
        return lambda s: f"{tier_share(s[1], tier):.1%}" if s[1]["tiers"]["sizes"][tier] else NONE

    columns = (  # one row per tier spec: (spec, affinity+tiers' row)
        Column("tiers", lambda s: f"`{s[0]}`", align="<"),
        Column(f"token hit (G1-only {g1['token_hit_rate']:.1%})", lambda s: s[1]["token_hit_rate"], ".1%"),
        Column("G2", share("g2")),
        Column("G3", share("g3")),
        Column("ICMS", share("icms")),
        Column(
            "ICMS cross-worker blocks",
            lambda s: s[1]["tiers"]["icms"]["cross_worker_hits"] if s[1]["tiers"]["sizes"]["icms"] else NONE,
        ),
        Column(
            f"p99 TTFT ms (G1-only {g1['p99_ttft_ms']:.0f})",
            lambda s: f"{s[1]['p99_ttft_ms']:.0f} ({change(g1['p99_ttft_ms'], s[1]['p99_ttft_ms']):+.0%})",
        ),
        Column("mean TTFT change", lambda s: change(g1["mean_ttft_ms"], s[1]["mean_ttft_ms"]), "+.0%"),
    )
    specs = ("g2=4x", "g2=4x,g3=16x", "icms=16x", TIERS, "g2=4x,g3=16x,icms=100x")
    rows = [(spec, row("tiers" if spec == TIERS else f"tiers_{spec}", "affinity+tiers")) for spec in specs]
    return tables.markdown(columns, rows) + "\n"


def tiers_demo() -> str:
    """``kvcache tiers`` run now (two seconds), in a fenced block, with what it measures (load rates
    and times, G1-G3 stall times) and its temporary folder shown as '...'."""
    import re

    from kvcache import cli

    lines = []
    for line in _cli(cli, ["tiers"]).splitlines():
        line = re.sub(r"G3 under \S+;", "G3 under a temporary folder;", line)
        line = re.sub(r"load time [0-9.]+ ms", "load time ... ms", line)
        if re.match(r"(worker \d, .+ pass|worker 1, same prompts)\s", line) or re.match(r"  G[123] ", line):
            line = re.sub(r"\s+[0-9.]+$", lambda m: "...".rjust(len(m.group(0))), line)
        lines.append(line)
    return "```\n$ kvcache tiers\n" + "\n".join(lines).strip() + "\n```\n"


# ---- the router matrix (docs/router_matrix.json, written by `kvcache matrix`) ----------------


def matrix(path: Path = MATRIX) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


SHAPE_NAMES = {"trace": "Mooncake"}


def matrix_counts() -> dict[str, Any]:
    cells = matrix()["cells"]
    shapes = list(dict.fromkeys(c["shape"] for c in cells))
    return {
        "cells": len(cells),
        "pareto": sum(c["pareto"] for c in cells),
        "p99_bar": sum(c["p99_bar"] for c in cells),
        "hit_bar": sum(c["hit_bar"] for c in cells),
        "ok": sum(c["ok"] for c in cells),
        "per_shape": ", ".join(
            f"{SHAPE_NAMES.get(s, s)} {sum(c['ok'] for c in cells if c['shape'] == s)}/"
            f"{sum(c['shape'] == s for c in cells)}"
            for s in shapes
        ),
    }


def matrix_rows(shape: str, workers: int, fraction: float) -> list[dict[str, Any]]:
    """One cell's rows, one per policy."""
    key = (shape, workers, fraction)
    return [r for r in matrix()["results"] if (r["shape"], r["num_workers"], r["fraction"]) == key]


def matrix_row(shape: str, workers: int, fraction: float, policy: str) -> dict[str, Any]:
    return next(r for r in matrix_rows(shape, workers, fraction) if r["policy"] == policy)


def matrix_cell(shape: str, workers: int, fraction: float) -> dict[str, Any]:
    """One cell's verdict on affinity."""
    key = (shape, workers, fraction)
    return next(c for c in matrix()["cells"] if (c["shape"], c["num_workers"], c["fraction"]) == key)


def best_baseline_p99(shape: str, workers: int, fraction: float, ours: str = "affinity") -> dict[str, Any]:
    """The cell's row with the lowest p99 TTFT among the other policies."""
    others = [r for r in matrix_rows(shape, workers, fraction) if r["policy"] != ours]
    return min(others, key=lambda r: r["p99_ttft_ms"])


def _ratio_and_bar(ratio: float, passed: bool, policy: str) -> str:
    """``0.87``, with the policy that sets the bar when the check fails: ``0.87 (dynamo)``."""
    return f"{ratio:.2f}" + ("" if passed else f" ({policy})")


MISSES_COLUMNS = (  # one row per matrix cell
    Column(
        "cell (workers x capacity, blocks per worker)",
        lambda c: (
            f"{SHAPE_NAMES.get(c['shape'], c['shape'])} {c['num_workers']} x {c['fraction']:.0%} "
            f"({c['capacity_blocks']})"
        ),
        align="<",
    ),
    Column("Pareto", lambda c: "yes" if c["pareto"] else "no: " + ", ".join(c["dominated_by"]), align="<"),
    Column("hit / bar", lambda c: _ratio_and_bar(c["hit_ratio"], c["hit_bar"], c["hit_bar_policy"])),
    Column(
        "p99 / best baseline",
        lambda c: _ratio_and_bar(c["p99_ratio"], c["p99_bar"], c["best_baseline_p99_policy"]),
    ),
)


def matrix_misses_table() -> str:
    """One row per cell where affinity misses a check: the verdict and the ratios behind it."""
    return tables.markdown(MISSES_COLUMNS, [c for c in matrix()["cells"] if not c["ok"]]) + "\n"


def lpm_balanced_lead() -> dict[str, Any]:
    """Over the cells where affinity misses a check: lpm_balanced's hits over affinity's at most
    (among cells where lpm_balanced's p99 is within the hit bar's 1.5x band), and the number of
    those cells where lpm_balanced's p99 is below affinity's."""
    from kvcache.lab.matrix import TAIL_BAND

    ratios, lower = [], 0
    for c in matrix()["cells"]:
        if c["ok"]:
            continue
        key = (c["shape"], c["num_workers"], c["fraction"])
        at = matrix_rows(*key)
        me, lb = matrix_row(*key, "affinity"), matrix_row(*key, "lpm_balanced")
        if lb["p99_ttft_ms"] <= TAIL_BAND * min(r["p99_ttft_ms"] for r in at):
            ratios.append(lb["token_hit_rate"] / me["token_hit_rate"])
        lower += lb["p99_ttft_ms"] < me["p99_ttft_ms"]
    return {"max_hit_ratio": max(ratios), "p99_below": lower}


def dominated_count(policy: str) -> int:
    """Matrix cells where ``policy`` has both a higher token hit rate and a lower p99 than affinity."""
    return sum(policy in c["dominated_by"] for c in matrix()["cells"])


def dynamo_on_long_agents(workers: Sequence[int] = (16, 64)) -> dict[str, Any]:
    """long_agent cells at these worker counts where affinity misses the p99 bar against dynamo:
    affinity's p99 over dynamo's, and dynamo's hit deficit, as ranges, and the worker counts
    (``where``, e.g. "16-64" or "16")."""
    p99, fewer, sizes = [], [], set()
    for c in matrix()["cells"]:
        if c["shape"] != "long_agent" or c["num_workers"] not in workers or c["p99_bar"]:
            continue
        if c["best_baseline_p99_policy"] != "dynamo":
            continue
        key = (c["shape"], c["num_workers"], c["fraction"])
        me, dyn = matrix_row(*key, "affinity"), matrix_row(*key, "dynamo")
        p99.append(c["p99_ratio"])
        fewer.append(1 - dyn["token_hit_rate"] / me["token_hit_rate"])
        sizes.add(c["num_workers"])
    where = "-".join(str(n) for n in sorted({min(sizes), max(sizes)}))
    return {
        "p99_lo": min(p99),
        "p99_hi": max(p99),
        "fewer_lo": min(fewer),
        "fewer_hi": max(fewer),
        "where": where,
    }


def ablation() -> dict[str, Any]:
    """docs/router_ablation.json, written by ``benches/router_ablation.py --json``."""
    return json.loads(ABLATION.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def ablation_table() -> str:
    return verdicts_table(ablation()["verdicts"])


def ablation_counts(label_start: str) -> dict[str, int]:
    """Cells passing each check for the variant whose label starts with ``label_start``."""
    label = next(k for k in ablation()["verdicts"] if k.startswith(label_start))
    vs = ablation()["verdicts"][label]
    return {k: sum(v[k] for v in vs) for k in ("ok", "pareto", "hit_bar", "p99_bar")}


# ---- the matrix at fleet scale (docs/router_matrix_fleet.json) and the held-out choice -------


def fleet_table() -> str:
    """Per shape and worker count of the fleet matrix: cells passing all three checks, affinity's
    token hit over dynamo's (lowest over the fractions) and its p99 over the best baseline's
    (highest over the fractions)."""
    payload = matrix(FLEET)

    def hit_over_dynamo(cells: list[dict[str, Any]]) -> float:
        hits = []
        for c in cells:
            rows = {r["policy"]: r for r in payload["results"] if same_cell(r, c)}
            hits.append(rows["affinity"]["token_hit_rate"] / max(rows["dynamo"]["token_hit_rate"], 1e-9))
        return min(hits)

    def worst_p99(cells: list[dict[str, Any]]) -> str:
        worst = max(cells, key=lambda c: c["p99_ratio"])
        return f"{worst['p99_ratio']:.2f} ({worst['best_baseline_p99_policy']})"

    columns = (  # one row per (shape, workers): (shape, workers, the cells at its fractions)
        Column("shape", lambda g: SHAPE_NAMES.get(g[0], g[0]), align="<"),
        Column("workers", 1, ","),
        Column("passing", lambda g: f"{sum(c['ok'] for c in g[2])}/{len(g[2])}"),
        Column("hit / dynamo's (lowest)", lambda g: hit_over_dynamo(g[2]), ".2f"),
        Column("p99 / best baseline (highest, policy)", lambda g: worst_p99(g[2])),
    )
    groups = [
        (shape, workers, [c for c in payload["cells"] if (c["shape"], c["num_workers"]) == (shape, workers)])
        for shape in payload["config"]["shapes"]
        for workers in payload["config"]["workers"]
    ]
    return tables.markdown(columns, groups) + "\n"


def fleet_counts() -> dict[str, Any]:
    cells = matrix(FLEET)["cells"]
    return {
        "cells": len(cells),
        "ok": sum(c["ok"] for c in cells),
        "requests": max(c["num_requests"] for c in cells),
    }


def same_cell(row: dict[str, Any], cell: dict[str, Any]) -> bool:
    return all(row[k] == cell[k] for k in ("shape", "num_workers", "fraction"))


def _bench_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benches" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def _heldout_module() -> Any:
    return _bench_module("router_heldout")


def heldout(fleet: bool = False) -> dict[str, Any]:
    """docs/router_heldout.json (or _fleet), written by ``benches/router_heldout.py --json``."""
    return json.loads((HELDOUT_FLEET if fleet else HELDOUT).read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def heldout_table(half: str, fleet: bool = False) -> str:
    """The table of one half ("tuning" or "held_out") of a held-out run."""
    return verdicts_table(heldout(fleet)[half])


def heldout_counts(half: str, label_start: str, fleet: bool = False) -> dict[str, Any]:
    """Cells passing each check and the median ratios for the variant whose label starts so."""
    verdicts = heldout(fleet)[half]
    vs = verdicts[next(k for k in verdicts if k.startswith(label_start))]
    counts: dict[str, Any] = {k: sum(v[k] for v in vs) for k in ("ok", "pareto", "hit_bar", "p99_bar")}
    counts.update(
        cells=len(vs),
        hit=statistics.median(v["hit_ratio"] for v in vs),
        p99=statistics.median(v["p99_ratio"] for v in vs),
    )
    return counts


def stays_table() -> str:
    return _heldout_module().stays_table(heldout()["stays"])  # type: ignore[no-any-return]


def stays_row(shape: str, workers: int, policy: str) -> dict[str, Any]:
    return next(
        r
        for r in heldout()["stays"]
        if (r["shape"], r["num_workers"], r["policy"]) == (shape, workers, policy)
    )


def count(n: int, noun: str = "") -> str:
    """3 -> 'three', (1, 'worker') -> 'one worker', (12, 'worker') -> '12 workers'."""
    words = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    text = words[n] if 0 <= n < len(words) else f"{n:,}"
    return f"{text} {noun}{'' if n == 1 else 's'}" if noun else text


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# ---- regeneration ------------------------------------------------------------------------------


def _excerpt(line: str, other: str, width: int = 90) -> str:
    """``line`` around its first difference from ``other``."""
    at = next(
        (i for i, (a, b) in enumerate(zip(line, other, strict=False)) if a != b), min(len(line), len(other))
    )
    start = max(0, at - width // 3)
    return (
        ("..." if start else "") + line[start : start + width] + ("..." if start + width < len(line) else "")
    )


def rewrite_docs(check: bool = False) -> list[str]:
    """Run every cog block of the docs against the record; rewrite them (or, with ``check``, only
    report). Returns one entry per stale block: file, line and the block's first line, then its first
    changed line as the doc has it and as the record gives it."""
    import difflib

    from cogapp import Cog

    stale = []
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        for path in DOCS:
            old = path.read_text(encoding="utf-8")
            if "[[[cog" not in old:
                continue
            new = Cog().process_string(old, fname=str(path))
            if new == old:
                continue
            old_lines, new_lines = old.splitlines(), new.splitlines()
            starts = [i for i, line in enumerate(old_lines) if "[[[cog" in line]
            seen = set()
            matcher = difflib.SequenceMatcher(a=old_lines, b=new_lines, autojunk=False)
            for tag, i1, i2, j1, j2 in matcher.get_opcodes():
                if tag == "equal":
                    continue
                begin = max((s for s in starts if s <= i1), default=0)
                if begin in seen:
                    continue
                seen.add(begin)
                code = " ".join(old_lines[begin].split())
                was = old_lines[i1] if i1 < i2 else ""
                now = new_lines[j1] if j1 < j2 else ""
                stale.append(
                    f"{path.relative_to(ROOT)}:{begin + 1}: {code}\n    line {i1 + 1} reads   "
                    f"{_excerpt(was, now)!r}\n    the record gives {_excerpt(now, was)!r}"
                )
            if not check:
                path.write_text(new, encoding="utf-8")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return stale


def forecast() -> dict[str, Any]:
    """docs/router_forecast.json, written by ``benches/router_forecast.py --json``."""
    return json.loads(FORECAST.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def forecast_table() -> str:
    return _bench_module("router_forecast").table(forecast()["rows"])  # type: ignore[no-any-return]


def forecast_row(cell: str) -> dict[str, Any]:
    return next(r for r in forecast()["rows"] if r["cell"] == cell)


def release() -> dict[str, list[dict[str, Any]]]:
    """The verdicts of docs/router_release.json (``benches/router_heldout.py --compare``)."""
    payload = json.loads(RELEASE.read_text(encoding="utf-8"))
    return {k: v for k, v in payload.items() if isinstance(v, list) and v and isinstance(v[0], dict)}


def release_table() -> str:
    return verdicts_table(release())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"figures to rerun (default all): {', '.join(FIGURES)}")
    parser.add_argument("--docs-only", action="store_true", help="only rewrite the docs from the record")
    args = parser.parse_args()
    for name in args.names:
        if name not in FIGURES:
            parser.error(f"unknown figure {name!r}; choose from {', '.join(FIGURES)}")
    if not args.docs_only:
        if not TRACE_PATH.exists():
            parser.error(f"the shared trace is missing: {TRACE_PATH}")
        data = record() if RECORD.exists() else {}
        for name in args.names or FIGURES:
            print(f"replaying {name}: {_command(FIGURES[name])}", flush=True)
            data[name] = run_figure(name, plots=True)
            RECORD.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    for line in rewrite_docs():
        print(f"rewrote {line}")


if __name__ == "__main__":
    main()
