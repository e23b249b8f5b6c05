"""Block copies in GB/s beside torch.index_select/index_copy_ and the device's plain copy, in one run.

Each group is one operation on one workload; it holds three measurements of the same bytes:

- ``baseline_clone``: ``clone`` of a contiguous tensor as large as the blocks moved (the device's
  copy bandwidth, the ceiling for any gather);
- ``torch_index``: the bare torch primitive (``index_select`` for reads, ``index_copy_`` for writes)
  without the layout change the operation also does;
- ``ours``: the operation through :mod:`kvcache.kernels` (Triton on CUDA, the reference on CPU),
  given block ids on the CPU as the block manager hands them out. On CUDA the reference is measured
  too, as ``reference``.

GB/s count the payload once (the bytes of the blocks moved), so a clone at 1.5 TB/s reads and writes
3 TB. After the run a table gives ``ours`` over ``torch_index`` and over ``baseline_clone``, at the
median and at the fastest round (on a shared CPU the fastest is the steadier figure); with
``KVCACHE_BENCH_OUT=DIR`` it also writes ``DIR/bench_kernels.json`` and a bar chart
``DIR/bench_kernels.png``.

Workloads: on CPU a Qwen2.5-0.5B-shaped pool (24 layers, 2 KV heads, head_dim 64, 16-token blocks,
bf16; 192 KiB a block) moving 128 blocks (2k tokens, 24 MiB); on CUDA a Qwen2.5-7B-shaped pool
(28 layers, 4 KV heads, head_dim 128; 896 KiB a block) moving 32 blocks (a decode step's worth) and
1024 blocks (16k tokens, 896 MiB).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kvcache.kernels.dispatch import pack_blocks, select_backend, unpack_blocks
from kvcache.lab import tables
from kvcache.lab.tables import Column

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    num_layers: int
    kv_heads: int
    head_dim: int
    num_blocks: int  # in the pool
    num_moved: int  # blocks one call moves
    block_size: int = 16

    @property
    def moved_bytes(self) -> int:
        per_block = self.num_layers * 2 * self.block_size * self.kv_heads * self.head_dim
        return self.num_moved * per_block * DTYPE.itemsize


if DEVICE.type == "cuda":
    WORKLOADS = (
        Workload("7b-shape 32 blocks", 28, 4, 128, num_blocks=2048, num_moved=32),
        Workload("7b-shape 1024 blocks", 28, 4, 128, num_blocks=2048, num_moved=1024),
    )
else:
    WORKLOADS = (Workload("0.5b-shape 128 blocks", 24, 2, 64, num_blocks=256, num_moved=128),)

OPS = ("pack_blocks", "unpack_blocks")
IMPLS = ("baseline_clone", "torch_index", "ours") + (("reference",) if DEVICE.type == "cuda" else ())


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _make_call(op: str, impl: str, w: Workload) -> Callable[[], object]:
    """The timed call; every tensor it needs is built here, outside the timing."""
    gen = torch.Generator().manual_seed(0)
    shape = (w.num_layers, 2, w.num_blocks, w.block_size, w.kv_heads, w.head_dim)
    pool = torch.randn(shape, generator=gen).to(DTYPE).to(DEVICE)
    # Scattered ids, as a long-running cache holds them.
    ids_cpu = torch.randperm(w.num_blocks, generator=gen)[: w.num_moved]
    ids = ids_cpu.to(DEVICE)
    picked = pool.index_select(2, ids)  # [L, 2, n, bs, H, D]
    packed = pack_blocks(pool, ids, backend="reference")  # [n, L, 2, bs, H, D]
    backend = "reference" if impl == "reference" else "auto"

    if impl == "baseline_clone":
        flat = picked.reshape(-1)
        return flat.clone
    if impl == "torch_index":
        return {
            "pack_blocks": lambda: pool.index_select(2, ids),
            "unpack_blocks": lambda: pool.index_copy_(2, ids, picked),
        }[op]
    return {
        "pack_blocks": lambda: pack_blocks(pool, ids_cpu, backend=backend),
        "unpack_blocks": lambda: unpack_blocks(pool, ids_cpu, packed, backend=backend),
    }[op]


@pytest.fixture(scope="module", autouse=True)
def ratio_table(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: ours against torch's primitive and against the copy bound, per group.

    CPU runs use ``KVCACHE_BENCH_THREADS`` torch threads (default 1): on a shared 2-core machine a
    second thread mostly waits for a core, which makes copy timings swing by 10x.
    """
    threads_before = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(int(os.environ.get("KVCACHE_BENCH_THREADS", "1")))
    try:
        yield
        _report(request)
    finally:
        torch.set_num_threads(threads_before)


def _report(request: pytest.FixtureRequest) -> None:
    session = getattr(request.config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rates: dict[str, dict[str, float]] = {}  # group -> impl -> GB/s at the median
    best: dict[str, dict[str, float]] = {}  # group -> impl -> GB/s at the fastest round
    for bench in session.benchmarks:
        if not bench.name.startswith("test_block_copy") or bench.stats is None:
            continue
        impl = bench.name.split("[")[1].split("-")[0]
        payload = bench.extra_info["bytes"] / 1e9
        rates.setdefault(bench.group, {})[impl] = payload / bench.stats.median
        best.setdefault(bench.group, {})[impl] = payload / bench.stats.min
    backend = select_backend(DEVICE)
    lines = [
        f"block copies on {_device_name()} ({backend} backend), GB/s of payload, median (best); "
        "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
    ]
    impls = ("ours", "torch_index", "baseline_clone")

    def rate(impl: str) -> Callable[[str], str]:  # median (best) GB/s
        return lambda g: f"{rates[g][impl]:.2f} ({best[g][impl]:.2f})"

    def ratio(impl: str) -> Callable[[str], str]:  # ours over impl, median (best)
        return lambda g: f"{rates[g]['ours'] / rates[g][impl]:.2f} ({best[g]['ours'] / best[g][impl]:.2f})"

    columns = (
        Column("group", lambda g: g, align="<"),
        Column("ours", rate("ours")),
        Column("index", rate("torch_index")),
        Column("clone", rate("baseline_clone")),
        Column("ours/index", ratio("torch_index")),
        Column("ours/clone", ratio("baseline_clone")),
    )
    groups = [g for g in sorted(rates) if set(impls) <= rates[g].keys()]
    lines += textwrap.indent(tables.plain(columns, groups), "  ").splitlines()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))
    out_dir = os.environ.get("KVCACHE_BENCH_OUT")
    if out_dir:
        _write_outputs(Path(out_dir), rates, lines)


def _device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"CPU ({torch.get_num_threads()} torch threads)"


def _write_outputs(out_dir: Path, rates: dict[str, dict[str, float]], lines: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"device": _device_name(), "backend": select_backend(DEVICE), "gb_per_s": rates}
    (out_dir / "bench_kernels.json").write_text(json.dumps(payload, indent=2))
    (out_dir / "bench_kernels.txt").write_text("\n".join(lines) + "\n")
    groups = sorted(rates)
    impls = [i for i in IMPLS if any(i in rates[g] for g in groups)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.0))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        xs = [g + k * width for g in range(len(groups))]
        ax.bar(xs, [rates[g].get(impl, 0.0) for g in groups], width, label=impl)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([g.replace(" ", "\n", 1) for g in groups], fontsize=7)
    ax.set_ylabel("GB/s (payload)")
    ax.set_title(f"kvcache block copies on {_device_name()}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "bench_kernels.png", dpi=120)
    plt.close(fig)


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.name for w in WORKLOADS])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", IMPLS)
def test_block_copy(benchmark: Any, impl: str, op: str, workload: Workload) -> None:
    benchmark.group = f"{op} {workload.name}"
    call = _make_call(op, impl, workload)

    def run() -> None:
        call()
        _sync()

    benchmark.extra_info["bytes"] = workload.moved_bytes
    benchmark.pedantic(run, warmup_rounds=2, rounds=20 if DEVICE.type == "cpu" else 50, iterations=1)
