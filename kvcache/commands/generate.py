"""``kvcache generate``: multi-tenant chat sessions on a real model, TTFT with and without reuse.

The default runs a tiny random-weight Llama on the CPU in well under a minute. Every turn is also
prefilled by the bare model without a cache, so both TTFTs come from the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics

from kvcache import argtypes

HELP = "run multi-tenant chat sessions on a model; print TTFT with and without KV reuse and hit rates"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="tiny, tiny-<family>, a model name or a local path")
    parser.add_argument("--tenants", type=argtypes.positive_int, default=4)
    parser.add_argument("--sessions", type=argtypes.positive_int, default=32, help="chat sessions in total")
    parser.add_argument("--turns", type=argtypes.positive_int, default=3)
    parser.add_argument("--system-prompt-tokens", type=argtypes.non_negative_int, default=512)
    parser.add_argument("--user-tokens", type=argtypes.positive_int, default=64)
    parser.add_argument("--output-tokens", type=argtypes.positive_int, default=16)
    parser.add_argument("--private-system-prompts", action="store_true", help="one per tenant, not shared")
    parser.add_argument("--num-blocks", type=argtypes.positive_int, default=4096)
    parser.add_argument("--block-size", type=argtypes.positive_int, default=16)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=argtypes.positive_int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)


def _ms(values: list[float]) -> float:
    return 1000 * statistics.median(values) if values else float("nan")


def run(args: argparse.Namespace) -> int:
    import torch

    from kvcache.engine import Engine, EngineConfig
    from kvcache.errors import ConfigError
    from kvcache.sessions import ChatConfig, run_chat

    if args.tenants < 1 or args.sessions < 1 or args.turns < 1:
        raise ConfigError("--tenants, --sessions and --turns must each be >= 1")
    torch.set_num_threads(args.threads)
    config = EngineConfig(
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
    )
    engine = Engine.load(args.model, config)
    chat = ChatConfig(
        num_tenants=args.tenants,
        num_sessions=args.sessions,
        turns=args.turns,
        system_prompt_tokens=args.system_prompt_tokens,
        user_tokens=args.user_tokens,
        output_tokens=args.output_tokens,
        shared_system_prompt=not args.private_system_prompts,
        seed=args.seed,
    )
    results = run_chat(engine, chat)

    stats = engine.manager.stats()
    print(
        f"model {engine.model_id} on {engine.device} {str(engine.dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f}; "
        f"{len(results)} requests, {args.system_prompt_tokens}-token "
        f"{'private' if args.private_system_prompts else 'shared'} system prompt"
    )
    header = f"{'tenant':<10}{'requests':>9}{'prompt tok':>12}{'hit tok':>10}{'hit rate':>10}"
    print(header + f"{'TTFT reuse ms':>15}{'TTFT no reuse ms':>18}{'speedup':>9}")
    rows = [*sorted({r.tenant for r in results}), "all"]
    for tenant in rows:
        mine = [r for r in results if tenant in ("all", r.tenant)]
        s = stats if tenant == "all" else stats.tenants[tenant]
        reuse = _ms([r.ttft_s for r in mine])
        bare = _ms([r.uncached_ttft_s for r in mine if r.uncached_ttft_s is not None])
        print(
            f"{tenant:<10}{s.requests:>9}{s.query_tokens:>12}{s.hit_tokens:>10}{s.hit_rate:>10.1%}"
            f"{reuse:>15.2f}{bare:>18.2f}{bare / reuse:>8.2f}x"
        )
    print("TTFT figures are medians per request; speedup = no reuse / reuse.")
    return 0
