"""Tier prefetch on the real engine: TTFT of requests whose prefix sits in G3 or the pod tier and
that arrive while the engine is busy, prefetch on against off, in one run.

    .venv/bin/python benches/bench_prefetch.py          # prints the table (medians of ROUNDS rounds)
    .venv/bin/pytest benches/bench_prefetch.py --benchmark-only   # the same table, under pytest

Each round, for each tier (``disk``: G3, ``pod``: ICMS over a private ``redis-server``) and each
setting (prefetch off / on, the order alternating between rounds), on the same loaded model:

1. ``BUSY`` requests of 64 tokens decode ``BUSY_TOKENS`` tokens each; with ``max_num_seqs = BUSY``
   they hold every seat, so later arrivals wait in the queue;
2. one step later, ``TARGETS`` requests arrive, each a fresh ``PREFIX``-token prompt whose full
   blocks the chosen tier holds (computed beforehand by another engine, written with a keyed MAC;
   G3 files fsync'd and dropped from the page cache, so reads come from the device) plus 16 new
   tokens;
3. the engine steps until all finish. Reported per setting: the targets' TTFT (from arrival), its
   part after admission (TTFT less queueing and hashing: the loads and the prefill step, which
   prefetch changes; the queueing before it is the busy requests' decode, noise on a shared
   machine), the load at admission (``PrefillTimings.tier_s``) and the tokens it brought.

The pod tier is real Redis on loopback plus the modelled ICMS link (``IcmsLink`` defaults, waited
for when Redis answers faster). Offload on eviction is off in these hierarchies, so each setting
sees only the blocks seeded for it. Model ``BENCH_PREFETCH_MODEL`` (default ``smollm2-135m``),
float32 on CPU, torch threads ``BENCH_PREFETCH_THREADS`` (1). Machine load printed with the table.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvcache.engine import Engine, EngineConfig, SamplingParams
from kvcache.kernels.dispatch import pack_blocks
from kvcache.lab import tables
from kvcache.lab.tables import Column
from kvcache.model import registry as models
from kvcache.redis_server import start_redis
from kvcache.tiers import (
    DiskTier,
    Hierarchy,
    HostTier,
    IcmsTier,
    LayoutFingerprint,
    RedisBackend,
    Seal,
    TierKey,
    TierPolicy,
)

MODEL = os.environ.get("BENCH_PREFETCH_MODEL", "smollm2-135m")
ROUNDS = int(os.environ.get("BENCH_PREFETCH_ROUNDS", "7"))
THREADS = int(os.environ.get("BENCH_PREFETCH_THREADS", "1"))
PREFIX = int(os.environ.get("BENCH_PREFETCH_PREFIX", "1536"))
TARGETS = int(os.environ.get("BENCH_PREFETCH_TARGETS", "1"))
BUSY = int(os.environ.get("BENCH_PREFETCH_BUSY", "2"))
BUSY_TOKENS = int(os.environ.get("BENCH_PREFETCH_BUSY_TOKENS", "8"))
BS = 16
POLICY = TierPolicy(offload_on_evict=False)
COUNTS = ("TTFT ms", "admitted ms", "load ms", "loaded tok", "prefetched", "hits", "wasted", "errors")
COLUMNS = (  # rows of cell texts by title
    Column("tier", "tier", align="<"),
    Column("prefetch", "prefetch"),
    *(Column(title, title) for title in COUNTS),
)


def toks(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(100, vocab, (n,), generator=g).tolist())


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Bench:
    def __init__(self) -> None:
        self.loaded = models.load(MODEL, device="cpu", dtype=torch.float32)
        self.vocab = self.loaded.shape.vocab_size
        self.writer = Engine(self.loaded, EngineConfig(num_blocks=(PREFIX // BS + 2) * TARGETS + 8))
        self.layout = self.writer.layout
        self.seal = Seal.keyed(secrets.token_bytes(32))
        self.root = Path(tempfile.mkdtemp(prefix="kvcache-bench-prefetch-"))
        self.redis = start_redis(maxmemory="2gb")
        self.backend = RedisBackend(self.redis.url, capacity_blocks=100_000)
        self.seed = 0

    def close(self) -> None:
        self.redis.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def blocks(self, prompts: list[list[int]]) -> list[tuple[TierKey, torch.Tensor]]:
        """The full blocks of each prompt's prefix, computed by the writer engine."""
        out = []
        for tokens in prompts:
            self.writer.generate(tokens, "bench", max_new_tokens=1)
            keys = self.writer.manager.hash(tokens, "bench").keys
            ids = torch.tensor([self.writer.manager.pool.index[k] for k in keys])
            packed = pack_blocks(self.writer.pool, ids)  # [n, L, 2, bs, H, D]
            out += [(TierKey(k, self.layout), b.clone()) for k, b in zip(keys, packed, strict=True)]
        return out

    def engine(self, tier: str, prefetch: bool) -> Engine:
        def build(layout: LayoutFingerprint) -> Hierarchy:
            host = HostTier(layout, 4 * (PREFIX // BS) * TARGETS)
            if tier == "disk":
                return Hierarchy(layout, [host, DiskTier(self.root / "g3", 100_000, seal=self.seal)], POLICY)
            icms = IcmsTier(self.backend, worker_id=0, emulate_latency=True, seal=self.seal)
            return Hierarchy(layout, [host, icms], POLICY)

        blocks_needed = BUSY * (64 + BUSY_TOKENS) // BS + TARGETS * (PREFIX // BS + 3) + 8
        config = EngineConfig(num_blocks=blocks_needed, tiers=build, prefetch=prefetch, max_num_seqs=BUSY)
        return Engine(self.loaded, config)

    def seed_tier(self, tier: str, pairs: list[tuple[TierKey, torch.Tensor]]) -> None:
        if tier == "disk":
            disk = DiskTier(self.root / "g3", 100_000, fsync=True, seal=self.seal)
            for key, block in pairs:
                disk.store(key, block)
                drop_page_cache(disk.path(key))
        else:
            icms = IcmsTier(self.backend, worker_id=1, seal=self.seal)
            for key, block in pairs:
                icms.store(key, block)
            icms.flush()

    def round(self, engine: Engine, tier: str) -> list[tuple[float, float, float, int]]:
        """(TTFT s, TTFT after admission s, load at admission s, tokens loaded) per target."""
        self.seed += 1
        prefixes = [toks(1000 * self.seed + i, PREFIX, self.vocab) for i in range(TARGETS)]
        self.seed_tier(tier, self.blocks(prefixes))
        busy = SamplingParams(max_tokens=BUSY_TOKENS, ignore_eos=True)
        for i in range(BUSY):
            engine.add_request(toks(7_000_000 + 100 * self.seed + i, 64, self.vocab), "bench", busy)
        engine.step()
        rids = [
            engine.add_request(
                p + toks(9_000_000 + 100 * self.seed + i, 16, self.vocab),
                "bench",
                SamplingParams(max_tokens=1),
            )
            for i, p in enumerate(prefixes)
        ]
        first: dict[object, tuple[float, float, float, int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id in rids and out.step is not None and out.step.index == 0:
                    t = out.step.timings
                    assert t is not None
                    after = out.step.elapsed_s - t.queue_s - t.hash_s
                    first[out.request_id] = (out.step.elapsed_s, after, t.tier_s, t.tier_tokens)
        return [first[r] for r in rids]


def main() -> None:
    torch.set_num_threads(THREADS)
    bench = Bench()
    try:
        engines = {(tier, on): bench.engine(tier, on) for tier in ("disk", "pod") for on in (False, True)}
        for (tier, _), engine in engines.items():  # warm-up: first steps pay one-time costs
            bench.round(engine, tier)
        results: dict[tuple[str, bool], list[tuple[float, float, float, int]]] = {k: [] for k in engines}
        for r in range(ROUNDS):
            for tier in ("disk", "pod"):
                for on in (r % 2 == 0, r % 2 == 1):  # interleaved, order alternating
                    results[(tier, on)] += bench.round(engines[(tier, on)], tier)
        load = os.getloadavg()
        print(
            f"\nmodel {MODEL} float32 CPU, torch threads {THREADS}; {ROUNDS} rounds x {TARGETS} requests "
            f"with a {PREFIX}-token prefix in the tier, {BUSY} busy requests; load average "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        )
        table: list[dict[str, str]] = []  # cell texts by title
        for tier in ("disk", "pod"):
            med = {}
            for on in (False, True):
                rows = results[(tier, on)]
                ttft = statistics.median(x[0] for x in rows) * 1e3
                after = statistics.median(x[1] for x in rows) * 1e3
                stall = statistics.median(x[2] for x in rows) * 1e3
                loaded = statistics.median(x[3] for x in rows)
                med[on] = (ttft, after, stall)
                p = engines[(tier, on)].prefetch_stats()
                table.append(
                    {
                        "tier": tier,
                        "prefetch": "on" if on else "off",
                        "TTFT ms": f"{ttft:.1f}",
                        "admitted ms": f"{after:.1f}",
                        "load ms": f"{stall:.2f}",
                        "loaded tok": f"{loaded:.0f}",
                        "prefetched": str(p.blocks),
                        "hits": str(p.hits),
                        "wasted": str(p.wasted),
                        "errors": str(p.errors),
                    }
                )
            table.append(  # the ratios of the medians; the counts left blank
                dict.fromkeys(COUNTS, "")
                | {
                    "tier": tier,
                    "prefetch": "off/on",
                    "TTFT ms": f"{med[False][0] / med[True][0]:.2f}x",
                    "admitted ms": f"{med[False][1] / med[True][1]:.2f}x",
                    "load ms": f"{med[False][2] / max(med[True][2], 1e-9):.1f}x",
                }
            )
        print(tables.plain(COLUMNS, table))
        for engine in engines.values():
            engine.close()
    finally:
        bench.close()


def test_prefetch_benchmark(benchmark: Any) -> None:
    """Under pytest-benchmark: the whole interleaved run once (it prints the table)."""
    benchmark.pedantic(main, rounds=1, warmup_rounds=0)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"({time.perf_counter() - started:.0f} s)")
