"""The deterministic figures of README.md and docs/*.md are what the current code produces.

Those figures sit in cog blocks generated from ``docs/figures.json`` (replays recorded by
``scripts/doc_figures.py``) and ``docs/router_matrix.json`` (``kvcache matrix``). Here: every
block matches its record (a stale block is named by file, line and generator), and the records
match fresh replays of the current code: the Mooncake table whole and `affinity`'s rows of every
other figure (about a minute on two busy cores; all of them take a few minutes), and one cell of
the matrix (the whole matrix takes ~10 minutes; its Mooncake 16-worker, 10% cell must equal the
recorded Mooncake table, which is replayed here, and the cost-term ablation's default variant must
equal the matrix's verdicts).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
REGENERATE = "run `.venv/bin/python scripts/doc_figures.py` (all replays) or `... --docs-only`"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("doc_figures", ROOT / "scripts" / "doc_figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["doc_figures"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


figures = _load()


def test_every_generated_block_matches_the_recorded_figures() -> None:
    stale = figures.rewrite_docs(check=True)
    assert not stale, f"stale generated blocks ({REGENERATE}):\n" + "\n".join(stale)


def test_a_changed_record_names_the_stale_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "intro\n<!-- [[[cog cog.outl(str(6 * 7)) ]]] -->\n41\n<!-- [[[end]]] -->\nafter\n", encoding="utf-8"
    )
    monkeypatch.setattr(figures, "ROOT", tmp_path)
    monkeypatch.setattr(figures, "DOCS", [doc])
    stale = [
        "doc.md:2: <!-- [[[cog cog.outl(str(6 * 7)) ]]] -->\n"
        "    line 3 reads   '41'\n"
        "    the record gives '42'"
    ]
    assert figures.rewrite_docs(check=True) == stale
    assert "41" in doc.read_text(encoding="utf-8")  # a check changes nothing
    assert figures.rewrite_docs() == stale
    assert doc.read_text(encoding="utf-8").splitlines()[2] == "42"
    assert figures.rewrite_docs(check=True) == []


# the Mooncake table whole (it is also the matrix's Mooncake 16 x 10% cell), affinity's rows of the rest
CHECKED = [("mooncake", ())] + [(name, ("affinity",)) for name in figures.FIGURES if name != "mooncake"]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "policies"), CHECKED, ids=[name for name, _ in CHECKED])
def test_recorded_replays_are_what_the_code_produces(name: str, policies: tuple[str, ...]) -> None:
    if figures.TRACE in figures.FIGURES[name].replay and not TRACE.exists():
        pytest.skip(f"the shared Mooncake trace is not at {TRACE}")
    fresh = figures.run_figure(name, TRACE, policies)
    recorded = figures.record()[name]
    assert fresh["command"] == recorded["command"]
    want = recorded["results"]
    if policies:
        want = [r for r in want if r["policy"].removesuffix("+tiers") in policies]
    assert [r["policy"] for r in fresh["results"]] == [r["policy"] for r in want]
    for got, expected in zip(fresh["results"], want, strict=True):
        assert got == expected, f"{name}: {got['policy']} differs from docs/figures.json ({REGENERATE})"
    assert fresh["upper_bounds"] == recorded["upper_bounds"], f"{name}: upper bounds ({REGENERATE})"


def test_the_matrix_mooncake_cell_is_the_recorded_mooncake_table() -> None:
    recorded = {r["policy"]: r for r in figures.record()["mooncake"]["results"]}
    cell = figures.matrix_rows("trace", 16, 0.1)
    assert [r["policy"] for r in cell] == list(recorded)
    for r in cell:
        same = {k: recorded[r["policy"]][k] for k in r if k in recorded[r["policy"]]}
        assert {k: r[k] for k in same} == same, f"matrix cell trace 16 x 10%: {r['policy']} ({REGENERATE})"


@pytest.mark.slow
def test_a_recorded_matrix_cell_is_what_the_code_produces() -> None:
    from kvcache.lab.matrix import MatrixConfig, run_cell

    # the smallest pool of the 4-worker RAG trace; requests_for() sizes the trace by the smallest fraction
    (fresh,) = run_cell(("rag", 4, MatrixConfig(fractions=(0.05,), policies=("affinity",))))
    recorded = figures.matrix_row("rag", 4, 0.05, "affinity")
    del fresh["wall_s"], recorded["wall_s"]
    assert fresh == recorded, (
        "docs/router_matrix.json is stale: rerun the `kvcache matrix` command (docs/router.md)"
    )


def test_the_ablation_default_variant_is_the_matrix_verdict() -> None:
    verdicts = figures.ablation()["verdicts"]
    default = next(v for label, v in verdicts.items() if label.startswith("affinity (default"))
    cells = {(c["shape"], c["num_workers"], c["fraction"]): c for c in figures.matrix()["cells"]}
    assert len(default) == 18
    for v in default:
        cell = cells[(v["shape"], v["num_workers"], v["fraction"])]
        for key in ("pareto", "hit_bar", "p99_bar", "ok", "hit_ratio", "p99_ratio"):
            assert v[key] == cell[key], (
                f"docs/router_ablation.json {v['shape']} {v['num_workers']} x {v['fraction']:.0%}: {key} "
                "differs from docs/router_matrix.json; rerun benches/router_ablation.py (docs/router.md)"
            )


@pytest.mark.parametrize("fleet", [False, True], ids=["4-64 workers", "256-1024 workers"])
def test_the_heldout_default_is_the_matrix_verdict(fleet: bool) -> None:
    """benches/router_heldout.py's affinity rows are the matrix's (the same cells, the same
    baselines), at the matrix's worker counts and at fleet scale."""
    payload = figures.heldout(fleet)
    matrix = figures.matrix(figures.FLEET if fleet else figures.MATRIX)
    cells = {(c["shape"], c["num_workers"], c["fraction"]): c for c in matrix["cells"]}
    default = [v for half in ("tuning", "held_out") for v in payload[half]["affinity (default)"]]
    assert len(default) == 5 * len(payload["workers"]) * len(payload["fractions"])
    for v in default:
        cell = cells[(v["shape"], v["num_workers"], v["fraction"])]
        for key in ("pareto", "hit_bar", "p99_bar", "ok", "hit_ratio", "p99_ratio"):
            assert v[key] == cell[key], (
                f"{'docs/router_heldout_fleet.json' if fleet else 'docs/router_heldout.json'} {v['shape']} "
                f"{v['num_workers']} x {v['fraction']:.0%}: {key} differs from the matrix; rerun "
                "benches/router_heldout.py (docs/router.md)"
            )
