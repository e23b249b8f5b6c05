"""``kvcache calibrate``: time the engine's prefill and decode, write the router's latency JSON.

The JSON has exactly the fields of ``kvcache.router.latency.LatencyModel``; ``kvcache replay
--latency FILE`` reads it, so simulated workers run at this model's measured speed.
"""

from __future__ import annotations

import argparse
import os

from kvcache import argtypes

HELP = "measure a model's prefill and decode speed through the engine; write the router's latency JSON"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="tiny, tiny-<family>, a model name or a local path")
    parser.add_argument(
        "--out", type=argtypes.output_path, default="latency.json", help="where to write the JSON"
    )
    parser.add_argument(
        "--new-tokens", type=_ints, default=[32, 128, 512], help="prefill lengths, comma-separated"
    )
    parser.add_argument("--contexts", type=_ints, default=[0, 512, 2048], help="cached context lengths")
    parser.add_argument("--batches", type=_ints, default=[1, 4, 16], help="decode batch sizes")
    parser.add_argument("--decode-ctx", type=argtypes.positive_int, default=512)
    parser.add_argument("--repeats", type=argtypes.positive_int, default=3)
    parser.add_argument(
        "--max-num-seqs",
        type=argtypes.positive_int,
        default=128,
        help="written as-is: the worker's batch cap",
    )
    parser.add_argument(
        "--max-batched-tokens",
        type=argtypes.positive_int,
        default=8192,
        help="written as-is: tokens per step cap",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=argtypes.positive_int, default=1, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import torch

    from kvcache.calibration import fit, measure, write_latency_json
    from kvcache.engine import Engine, EngineConfig

    torch.set_num_threads(args.threads)
    longest = max(args.contexts) + max(args.new_tokens)
    num_blocks = 2 * (len(args.contexts) * len(args.new_tokens) * (args.repeats + 2)) * (longest // 16 + 1)
    engine = Engine.load(
        args.model, EngineConfig(num_blocks=num_blocks, device=args.device, dtype=args.dtype)
    )
    samples = measure(
        engine,
        new_tokens=args.new_tokens,
        contexts=args.contexts,
        batches=args.batches,
        decode_ctx=args.decode_ctx,
        repeats=args.repeats,
    )
    latency = fit(samples, max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens)
    print(
        f"model {engine.model_id} on {engine.device} {str(engine.dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'kind':<9}{'new/batch':>10}{'ctx':>7}{'measured ms':>13}{'fitted ms':>11}")
    for s in samples:
        if s.kind == "prefill":
            model = latency.prefill_base_ms + s.num_new * (
                latency.prefill_ms_per_token
                + latency.prefill_ms_per_token_per_ctx_token * (s.ctx + s.num_new / 2)
            )
        else:
            model = latency.decode_base_ms + latency.decode_ms_per_token_per_seq * s.num_new
        print(f"{s.kind:<9}{s.num_new:>10}{s.ctx:>7}{s.ms:>13.2f}{model:>11.2f}")
    write_latency_json(latency, args.out)
    print(f"wrote {args.out}: {latency}")
    return 0
