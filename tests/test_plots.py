"""Every plot kvcache writes, rendered and read back: titles, axis labels, tick labels that do not
overlap, nothing drawn outside the figure, and a legend naming kvcache's own policy.

The figures are caught as they are saved (``Figure.savefig`` is wrapped), so each test runs the
same code path a user's command or benchmark script runs. Benchmark-script plots are fed small
made-up measurements: what is checked is the drawing, not the numbers.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from kvcache import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ["round_robin", "random", "least_loaded", "lpm", "dynamo", "sglang", "lpm_balanced", "affinity"]


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Figure]]:
    """File name -> the figure saved under it, for everything saved during the test."""
    figures: dict[str, Figure] = {}
    original = Figure.savefig

    def savefig(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        figures[Path(fname).name] = self
        original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    yield figures


def _tick_labels(axis: Any) -> list[Any]:
    """The tick labels drawn: visible, not empty, at a tick inside the view."""
    lo, hi = sorted(axis.get_view_interval())
    slack = 1e-9 * max(1.0, abs(hi - lo))
    return [
        t.label1
        for t in axis.get_major_ticks()
        if lo - slack <= t.get_loc() <= hi + slack and t.label1.get_visible() and t.label1.get_text().strip()
    ]


def _overlap(a: Bbox, b: Bbox) -> bool:
    pad = 1.0  # pixels: touching is fine, overlapping glyphs are not
    return a.x0 + pad < b.x1 and b.x0 + pad < a.x1 and a.y0 + pad < b.y1 and b.y0 + pad < a.y1


def check_figure(fig: Figure) -> dict[str, Any]:
    """Assert the figure is readable; return its texts for test-specific checks."""
    canvas = FigureCanvasAgg(fig)  # the plot closed its figure: give it a canvas again
    canvas.draw()
    renderer = canvas.get_renderer()
    frame = fig.bbox.padded(1.0)
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    out: dict[str, Any] = {"suptitle": suptitle, "axes": [], "legend": []}
    labelled: list[Bbox] = []  # every tick label and axis label: legends must not cover them
    for ax in fig.axes:
        if not ax.get_visible() or not (ax.patches or ax.lines or ax.collections):
            continue
        title = ax.get_title()
        assert title or suptitle, "an axes without a title under a figure without one"
        assert ax.get_xlabel() or ax.get_ylabel(), f"axes {title!r} has no axis label"
        ticks = {}
        for axis in ("x", "y"):
            texts = _tick_labels(ax.xaxis if axis == "x" else ax.yaxis)
            boxes = [t.get_window_extent(renderer) for t in texts]
            for i, a in enumerate(boxes):
                for b, t in zip(boxes[i + 1 :], texts[i + 1 :], strict=True):
                    assert not _overlap(a, b), f"{title!r}: {axis} tick labels overlap at {t.get_text()!r}"
            ticks[axis] = [t.get_text() for t in texts]
            labelled += boxes
        for label in (ax.xaxis.label, ax.yaxis.label):
            if label.get_text():
                labelled.append(label.get_window_extent(renderer))
        out["axes"].append({"title": title, "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), **ticks})
    assert out["axes"], "no axes with data"
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert all(not _overlap(box, other) for other in labelled), "a legend covers tick or axis labels"
        out["legend"] += [t.get_text() for t in legend.get_texts()]
    drawn = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        drawn += [ax.title, ax.xaxis.label, ax.yaxis.label, *_tick_labels(ax.xaxis), *_tick_labels(ax.yaxis)]
    for legend in legends:
        drawn += legend.get_texts()
    for text in drawn:
        if text.get_visible() and text.get_text().strip():
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            assert inside, f"text {text.get_text()!r} is cut off at the figure's edge"
    for title in [suptitle, *(a["title"] for a in out["axes"])]:
        assert "{" not in title and "'" not in title, f"title looks like a Python repr: {title!r}"
    return out


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plots") / "t.jsonl"
    assert cli.main(["trace", str(path), "--requests", "60", "--seed", "1"]) == 0
    return path


def test_replay_every_policy_with_tiers(trace: Path, tmp_path: Path, saved: dict[str, Figure]) -> None:
    png = tmp_path / "replay.png"
    argv = ["replay", str(trace), "--policy", "all", "--tiers", "g2=4x,g3=16x,icms=16x", "--plot", str(png)]
    assert cli.main([*argv, "--quiet", "--no-bounds", "--workers", "4"]) == 0
    assert set(saved) == {"replay.png", "replay-tiers.png"}
    assert png.stat().st_size > 0 and (tmp_path / "replay-tiers.png").stat().st_size > 0

    replay = check_figure(saved["replay.png"])
    hit, ttft = replay["axes"]
    assert hit["y"] == [n for p in POLICIES for n in (p, f"{p}+tiers")]  # all 16, top to bottom
    assert (hit["xlabel"], ttft["xlabel"]) == ("token hit rate (%)", "p99 TTFT (s, modelled)")
    assert replay["legend"] == ["affinity (kvcache)", "baselines", "with spill tiers"]
    assert replay["suptitle"].startswith("4 workers x ")

    tiers = check_figure(saved["replay-tiers.png"])
    assert tiers["axes"][0]["y"] == [*POLICIES[:-1], "affinity (kvcache)"]
    assert tiers["axes"][0]["xlabel"] == "token hit rate (%)"
    assert "G2" in tiers["suptitle"] and "ICMS" in tiers["suptitle"] and "shared" in tiers["suptitle"]
    assert tiers["legend"][:5] == ["G1-only", "tiers: G1", "tiers: G2", "tiers: G3", "tiers: ICMS"]


def test_capacity_sweep_ticks_at_the_capacities(
    trace: Path, tmp_path: Path, saved: dict[str, Figure]
) -> None:
    png = tmp_path / "sweep.png"
    argv = ["replay", str(trace), "--capacity-blocks", "13,27,55", "--policy", "round_robin,lpm,affinity"]
    assert cli.main([*argv, "--plot", str(png), "--quiet", "--no-bounds", "--workers", "4"]) == 0
    sweep = check_figure(saved["sweep.png"])
    hit, _, curve = sweep["axes"]
    assert hit["y"] == ["round_robin", "lpm", "affinity"]
    assert curve["x"] == ["13", "27", "55"]
    assert curve["xlabel"] == "capacity per worker (blocks)" and curve["ylabel"] == "token hit rate (%)"
    assert "affinity (kvcache)" in sweep["legend"] and "lpm" in sweep["legend"]
    assert "27 blocks per worker" in sweep["suptitle"]


def _load_bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_plots_{name}", ROOT / "benches" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_serve_compare_plot(tmp_path: Path, saved: dict[str, Figure]) -> None:
    serve_compare = _load_bench("serve_compare")
    names = [f"{p}:{pod}" for pod in ("pod", "nopod") for p in ("affinity", "round_robin", "least_loaded")]
    results = {
        n: {"mean_ttft_ms": 20.0 + i, "output_throughput": 100.0 + i, "cache_hit_rate": 0.5 + i / 20}
        for i, n in enumerate(names)
    }
    serve_compare._plot(results, str(tmp_path / "serve_compare.png"))
    fig = check_figure(saved["serve_compare.png"])
    assert [a["xlabel"] for a in fig["axes"]] == ["mean TTFT (ms)", "output tokens/s", "hit rate (%)"]
    assert fig["axes"][0]["y"][:2] == ["affinity, pod tier on", "round_robin, pod tier on"]
    assert fig["legend"][0] == "affinity (kvcache, serve's default)"
    assert "round_robin (baseline)" in fig["legend"]


def test_hf_ttft_plot(tmp_path: Path, saved: dict[str, Figure], monkeypatch: pytest.MonkeyPatch) -> None:
    bench_hf = _load_bench("bench_hf")
    monkeypatch.setattr(bench_hf, "engine", lambda: type("E", (), {"model_id": "small-qwen2"})())
    monkeypatch.setattr(bench_hf, "device_name", lambda: "CPU")
    for length in (1024, 2048):
        for hit in (0.5, 0.9, 0.99):
            bench_hf._results[(length, hit)] = {"engine": 0.03, "hand": 0.03, "uncached": length / 1e4}
    bench_hf.write_plot(str(tmp_path / "hf.png"))
    fig = check_figure(saved["hf.png"])
    (ax,) = fig["axes"]
    assert ax["xlabel"] == "prefix hit (% of prompt tokens)" and ax["ylabel"] == "TTFT (ms)"
    assert ax["title"] == "TTFT vs prefix hit, small-qwen2 on CPU"
    assert "1024 engine" in fig["legend"] and "2048 uncached" in fig["legend"]


def test_kernel_bandwidth_plot(tmp_path: Path, saved: dict[str, Figure]) -> None:
    bench_kernels = _load_bench("bench_kernels")
    groups = [f"{op} {w.name}" for op in bench_kernels.OPS for w in bench_kernels.WORKLOADS]
    rates = {g: {impl: 1.0 + k for k, impl in enumerate(bench_kernels.IMPLS)} for g in groups}
    bench_kernels._write_outputs(tmp_path, rates, ["a line"])
    fig = check_figure(saved["bench_kernels.png"])
    (ax,) = fig["axes"]
    assert ax["ylabel"] == "GB/s (payload)" and ax["title"].startswith("kvcache block copies on ")
    assert len(ax["x"]) == len(groups)


def test_the_check_catches_what_made_plots_unreadable() -> None:
    import matplotlib.pyplot as plt

    names = [f"{p}+tiers" for p in POLICIES] + POLICIES
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(names, range(len(names)))
    ax.set_ylabel("token hit rate (%)")
    ax.set_title("crowded")
    with pytest.raises(AssertionError, match="x tick labels overlap"):
        check_figure(fig)
    ax.tick_params(axis="x", rotation=90)
    fig.suptitle(str({"g2": 1100}))
    with pytest.raises(AssertionError, match=r"cut off|Python repr"):
        check_figure(fig)
    plt.close(fig)
