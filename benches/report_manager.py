"""Every block-manager and hashing figure the README quotes, from one command.

    .venv/bin/python benches/report_manager.py [--runs 5]

Each figure is measured in ``--runs`` runs, baseline and kvcache interleaved within each run so
both see the same machine load; a run of a short operation is the mean of a fixed number of calls.
Printed: the median over runs, the min-max range, and the median of the per-run ratios. The
machine's load average is printed before and after. The side-by-side against vLLM's BlockPool is
``bench_vs_vllm.py`` (its ``main`` prints the same way and is called last).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_hashing
import bench_manager
import bench_vs_vllm

from kvcache import BlockManager, CacheConfig
from kvcache.cache.hashing import tokens_to_bytes


def per_call(fn: Callable[[], Any], calls: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def spread(xs: list[float]) -> str:
    lo, hi, med = min(xs), max(xs), statistics.median(xs)
    return f"{med * 1e3:8.3f} ms ({lo * 1e3:.3f}-{hi * 1e3:.3f})"


def report(
    name: str, base: Callable[[], Any] | None, ours: Callable[[], Any], calls: int, runs: int, tokens: int
) -> None:
    b_t: list[float] = []
    o_t: list[float] = []
    for r in range(runs):
        pair = [("o", ours)] + ([("b", base)] if base is not None else [])
        if r % 2:
            pair.reverse()
        for side, fn in pair:
            (b_t if side == "b" else o_t).append(per_call(fn, calls))
    o_rate = tokens / statistics.median(o_t) / 1e6
    line = f"{name:<58} kvcache {spread(o_t)} {o_rate:8.1f} Mtok/s"
    if b_t:
        ratios = [b / o for b, o in zip(b_t, o_t, strict=True)]
        b_rate = tokens / statistics.median(b_t) / 1e6
        line += (
            f" | baseline {spread(b_t)} {b_rate:7.1f} Mtok/s | ratio {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f})"
        )
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()
    runs = args.runs
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cpus")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 151_000, 128 * 1024).tolist()
    manager = BlockManager(CacheConfig(num_blocks=16, block_size=16, vocab_size=152_064))
    report(
        "hash 128k tokens (list); baseline sha256(pickle) per block",
        lambda: bench_hashing.sha256_pickle_chain(prompt, 16),
        lambda: manager.hash(prompt, "t"),
        5,
        runs,
        len(prompt),
    )
    arr = np.asarray(prompt, dtype=np.int64)
    report(
        "encode 128k tokens: int64 array; baseline a list",
        lambda: tokens_to_bytes(prompt, 152_064),
        lambda: tokens_to_bytes(arr, 152_064),
        50,
        runs,
        len(prompt),
    )
    chat = bench_manager.multi_turn_chat(
        num_tenants=8,
        sessions_per_tenant=8,
        turns=6,
        system_prompt_tokens=1024,
        user_tokens=256,
        output_tokens=128,
        vocab_size=bench_manager.VOCAB,
        seed=0,
    )
    salted = [dataclasses.replace(r, tenant=f"{r.tenant}/{i}") for i, r in enumerate(chat)]
    report(
        "replay 384 chat requests, 8 in flight; baseline no reuse",
        lambda: bench_manager.replay(bench_manager.fresh_manager(16_384), salted),
        lambda: bench_manager.replay(bench_manager.fresh_manager(16_384), chat),
        1,
        runs,
        sum(r.num_tokens for r in chat),
    )
    for frac in (0.5, 1.0):
        n = 32_768
        m = bench_manager.fresh_manager(2 * n // 16 + 8)
        p32 = rng.integers(0, bench_manager.VOCAB, n).tolist()
        cached = int(n * frac)
        m.allocate("warm", p32[:cached], "t")
        m.free("warm")
        tail = rng.integers(0, bench_manager.VOCAB, n - cached).tolist()
        ids = count()

        def alloc_free(
            m: BlockManager = m, p: list[int] = p32, c: int = cached, tail: list[int] = tail, ids: Any = ids
        ) -> None:
            rid = next(ids)
            toks = [*p[:c], (tail[0] + rid) % bench_manager.VOCAB, *tail[1:]] if tail else p
            m.allocate(rid, toks, "t")
            m.free(rid)

        base_m = bench_manager.fresh_manager(2 * n // 16 + 8)
        base_ids = count()

        def alloc_free_nohit(m: BlockManager = base_m, ids: Any = base_ids, p: list[int] = p32) -> None:
            rid = next(ids)
            m.allocate(rid, [(p[0] + rid) % bench_manager.VOCAB, *p[1:]], "t")
            m.free(rid)

        report(
            f"allocate+free 32k tokens, {int(frac * 100)}% cached; baseline 0% cached",
            alloc_free_nohit,
            alloc_free,
            5,
            runs,
            n,
        )
    m = bench_manager.fresh_manager(4096)
    p32 = rng.integers(0, bench_manager.VOCAB, 32_768).tolist()
    m.allocate("warm", p32, "t")
    hashed = m.hash(p32, "t")
    report("lookup a cached 32k-token prompt (pre-hashed)", None, lambda: m.lookup(hashed), 50, runs, 32_768)
    prompts = [rng.integers(0, bench_manager.VOCAB, 64 * 16).tolist() for _ in range(64)]
    q_no, q_yes = bench_manager.quota_manager(False), bench_manager.quota_manager(True)
    c_no, c_yes = count(), count()
    report(
        "allocate 64 evicting blocks, floor protects 16k; baseline no quotas",
        lambda: bench_manager.allocate_evicting(q_no, prompts, c_no),
        lambda: bench_manager.allocate_evicting(q_yes, prompts, c_yes),
        20,
        runs,
        64 * 16,
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if not args.skip_vllm:
        sys.argv = [sys.argv[0], "--rounds", str(max(runs, 5))]
        bench_vs_vllm.main()


if __name__ == "__main__":
    main()
