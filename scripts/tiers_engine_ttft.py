"""TTFT of a prompt whose prefix the device pool evicted: recomputed, or loaded from G2, G3 or ICMS.

    .venv/bin/python scripts/tiers_engine_ttft.py [--model small-qwen2] [--prompt-tokens 2048]

Each round: a fresh engine (pool of 160 blocks of 16 tokens) serves prompt A, then prompt B, which
evicts most of A's blocks, then A again; the TTFT of that last request is reported (median of
``--rounds``). With a tier, the evicted blocks were written down by the evict hook and come back in
one load; ICMS waits its modelled link time (``emulate_latency``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from kvcache.engine import Engine, EngineConfig
from kvcache.model import hf
from kvcache.tiers import DiskTier, Hierarchy, HostTier, IcmsTier, InProcessBackend, LayoutFingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-qwen2")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = hf.load_model(args.model)
    tmp = tempfile.TemporaryDirectory()
    gen = torch.Generator().manual_seed(0)

    def tiers(kind: str):  # type: ignore[no-untyped-def]
        def build(layout: LayoutFingerprint) -> Hierarchy:
            if kind == "G2":
                return Hierarchy(layout, [HostTier(layout, 512)])
            if kind == "G3":
                return Hierarchy(layout, [DiskTier(os.path.join(tmp.name, "g3"), 512)])
            return Hierarchy(layout, [IcmsTier(InProcessBackend(512), emulate_latency=True)])

        return None if kind == "none" else build

    print(f"{args.model} {loaded.shape}, prompt {args.prompt_tokens} tokens, torch threads {args.threads}")
    for kind in ("none", "G2", "G3", "ICMS"):
        ttfts, reused = [], 0
        for _ in range(args.rounds):
            engine = Engine(loaded, EngineConfig(num_blocks=160, block_size=16, tiers=tiers(kind)))
            a = torch.randint(1, 1000, (args.prompt_tokens,), generator=gen).tolist()
            b = torch.randint(1, 1000, (args.prompt_tokens,), generator=gen).tolist()
            engine.generate(a, "t", max_new_tokens=1)
            engine.generate(b, "t", max_new_tokens=1)  # evicts most of a's blocks
            if engine.tiers is not None:
                engine.tiers.flush()
            result = engine.generate(a, "t", max_new_tokens=1)
            ttfts.append(result.ttft_s * 1e3)
            reused = result.cached_tokens
        label = "recompute" if kind == "none" else f"load from {kind}"
        print(
            f"{label:<15} TTFT median {statistics.median(ttfts):8.1f} ms, min {min(ttfts):8.1f} ms; "
            f"{reused} of {args.prompt_tokens} prompt tokens reused"
        )
    print(f"load average {os.getloadavg()[0]:.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
