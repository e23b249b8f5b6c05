"""``kvcache tiers``: push real KV blocks through G1 -> G2 -> G3 -> ICMS on this machine and measure.

Two simulated engines (workers) share one ICMS tier; each has a block manager over a small device
pool (G1), its own host tier (G2) and disk tier (G3). Worker 0 serves a set of prompts twice: the
first pass computes every block (random KV) and the device pool spills; the second pass loads the
spilled blocks back and checks every byte. Worker 1 then serves the same prompts and finds them in
the shared tier. Each load is the engine's own admission step (``engine.prefix_load``: the rules
on what is loaded are the engine's); only the forward is replaced by random blocks, so any KV
layout can be measured without a model. Prints each tier's counters and the measured load rates.

Not here: a model, scheduling (``kvcache generate`` runs the engine whole).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import textwrap
import time
from typing import Any

from kvcache.cache.config import DEFAULT_BLOCK_SIZE
from kvcache.commands import _argtypes as argtypes

HELP = "demo and measure the spill tiers (G1 device, G2 host, G3 disk, shared ICMS) on this machine"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=None, help="G3 directory (default: a temporary one)")
    parser.add_argument("--prompts", type=argtypes.positive_int, default=8)
    parser.add_argument(
        "--prompt-blocks", type=argtypes.positive_int, default=16, help="full blocks per prompt"
    )
    parser.add_argument(
        "--g1-blocks", type=argtypes.positive_int, default=32, help="device pool blocks per worker"
    )
    parser.add_argument("--g2-blocks", type=argtypes.positive_int, default=128)
    parser.add_argument("--g3-blocks", type=argtypes.positive_int, default=256)
    parser.add_argument("--icms-blocks", type=argtypes.positive_int, default=512)
    parser.add_argument("--layers", type=argtypes.positive_int, default=24)
    parser.add_argument("--kv-heads", type=argtypes.positive_int, default=2)
    parser.add_argument("--head-dim", type=argtypes.positive_int, default=64)
    parser.add_argument("--block-size", type=argtypes.positive_int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--redis", action="store_true", help="back ICMS with a private redis-server")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from kvcache.cache.config import CacheConfig
    from kvcache.cache.manager import BlockManager
    from kvcache.lab import tables
    from kvcache.lab.tables import Column
    from kvcache.tiers import DiskTier, Hierarchy, HostTier, IcmsTier, InProcessBackend, LayoutFingerprint

    torch.set_num_threads(1)
    layout = LayoutFingerprint("demo", args.dtype, args.layers, args.kv_heads, args.head_dim, args.block_size)
    server: Any = None
    if args.redis:
        from kvcache.redis_server import start_redis
        from kvcache.tiers import RedisBackend

        server = start_redis(stop_with_parent=True)
        backend: Any = RedisBackend(server.url, args.icms_blocks)
    else:
        backend = InProcessBackend(args.icms_blocks)
    tmp = tempfile.TemporaryDirectory(prefix="kvcache-g3-") if args.dir is None else None
    root = args.dir or (tmp.name if tmp else ".")
    gen = torch.Generator().manual_seed(args.seed)
    bs = args.block_size
    prompts = [
        torch.randint(0, 30_000, ((args.prompt_blocks * bs) + 1,), generator=gen).tolist()
        for _ in range(args.prompts)
    ]
    expected: dict[bytes, torch.Tensor] = {}
    workers = []
    for w in range(2):
        manager = BlockManager(CacheConfig(num_blocks=args.g1_blocks, block_size=bs, model_id="demo"))
        pool = torch.zeros(
            (layout.num_layers, 2, args.g1_blocks, bs, layout.kv_heads, layout.head_dim),
            dtype=layout.torch_dtype,
        )
        tiers = [
            HostTier(layout, args.g2_blocks),
            DiskTier(os.path.join(root, f"worker{w}"), args.g3_blocks),
            IcmsTier(backend, worker_id=w, write_behind_blocks=8),
        ]
        hierarchy = Hierarchy(layout, tiers)
        manager.set_evict_hook(hierarchy.evict_hook(pool))
        workers.append((manager, pool, hierarchy))

    def serve(w: int, tokens: list[int], rid: str) -> tuple[int, int, float]:
        from kvcache.engine.prefix_load import load_prefix
        from kvcache.kernels.dispatch import unpack_blocks

        manager, pool, hierarchy = workers[w]
        prompt = manager.hash(tokens)
        alloc = manager.allocate(rid, prompt)
        t0 = time.perf_counter()
        loaded = load_prefix(hierarchy, pool, manager.config, prompt, alloc)  # as the engine admits it
        load_s = time.perf_counter() - t0
        start, n = loaded.first_block, loaded.num_blocks
        keys, ids = prompt.keys, alloc.block_ids
        for i in range(start, start + n):
            if not torch.equal(pool[:, :, ids[i]].view(torch.uint8), expected[keys[i]].view(torch.uint8)):
                raise AssertionError(f"block {i} of {rid} came back different")
        # What a forward would compute: the rest of the prompt's full blocks.
        fresh = [expected.setdefault(k, _random_block(layout, gen)) for k in keys[start + n :]]
        if fresh:
            unpack_blocks(pool, torch.tensor(ids[start + n : len(keys)]), torch.stack(fresh))
        manager.free(rid)
        hierarchy.flush()
        return start, n, load_s

    rows = []
    for label, w in (
        ("worker 0, first pass", 0),
        ("worker 0, second pass", 0),
        ("worker 1, same prompts", 1),
    ):
        device = loaded = 0
        load_s = 0.0
        for i, tokens in enumerate(tqdm(prompts, desc=label, leave=False, disable=None)):
            d, n, secs = serve(w, tokens, f"{label}-{i}")
            device, loaded, load_s = device + d, loaded + n, load_s + secs
        rows.append((label, device, loaded, load_s))

    mib = layout.block_nbytes / 2**20
    print(
        f"layout {layout.num_layers} layers x {layout.kv_heads} kv heads x {layout.head_dim} x "
        f"{bs} tokens {layout.dtype}: {layout.block_nbytes / 1024:.0f} KiB per block; G3 under {root}; "
        f"ICMS {'redis ' + server.url if server else 'in-process'}; every loaded block verified bit-exact"
    )
    pass_columns = (
        Column("pass", 0, align="<"),
        Column("device hit", 1),
        Column("tier loads", 2),
        Column("load MiB/s", lambda r: f"{r[2] * mib / r[3]:.0f}" if r[2] and r[3] else "-"),
    )
    print(tables.plain(pass_columns, rows))
    tier_columns = (
        Column("tier", 0, align="<"),
        Column("hits", lambda r: r[1].hits),
        Column("misses", lambda r: r[1].misses),
        Column("in", lambda r: r[1].blocks_in),
        Column("out", lambda r: r[1].blocks_out),
        Column("MiB in", lambda r: r[1].bytes_in / 2**20, ".1f"),
        Column("MiB out", lambda r: r[1].bytes_out / 2**20, ".1f"),
        Column("evict", lambda r: r[1].evictions),
        Column("held", lambda r: r[1].occupancy_blocks),
        Column("cap", lambda r: r[1].capacity_blocks),
        Column("corrupt", lambda r: r[1].corrupt),
        Column("errors", lambda r: r[1].errors),
        Column("x-worker", lambda r: r[1].cross_worker_hits),
        Column("stall ms", lambda r: r[1].stall_ms, ".2f"),
    )
    for w, (_, _, hierarchy) in enumerate(workers):
        hs = hierarchy.stats()
        print(
            f"\nworker {w}: offloaded {hs.blocks_offloaded}, loaded {hs.blocks_loaded}, promoted "
            f"{hs.blocks_promoted}, prefill tokens saved {hs.prefill_tokens_saved}, "
            f"load time {hs.stall_ms:.1f} ms"
        )
        print(textwrap.indent(tables.plain(tier_columns, hs.tiers.items()), "  "))
    if server is not None:
        server.stop()
    if tmp is not None:
        tmp.cleanup()
    return 0


def _random_block(layout: Any, gen: Any) -> Any:
    import torch

    return torch.randn(layout.block_shape, generator=gen).to(layout.torch_dtype)
