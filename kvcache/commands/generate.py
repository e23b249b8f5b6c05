"""``kvcache generate``: multi-tenant chat sessions on a model, TTFT with and without reuse.

The default model, SmolLM2-135M-Instruct (``smollm2-135m``, converted on first use), holds real
conversations (``kvcache.lab.chat``): two tenants share a public system prompt and ask follow-up
questions; each turn prints the question, the model's answer, its cached tokens and both TTFTs.
A model without a tokenizer (``--model tiny``: random weights, well under a minute on a CPU) runs
random-token sessions instead (``kvcache.lab.sessions``) on the batched engine: ``--concurrency``
sessions per turn run as one continuous batch (default 1, so both TTFT columns time a request
alone; with more, a reuse TTFT includes steps shared with the others). Every turn is also
prefilled by the bare model without a cache, so both TTFTs come from the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

from kvcache.cache.config import DEFAULT_BLOCK_SIZE
from kvcache.commands import _argtypes as argtypes
from kvcache.model.registry import DEFAULT_MODEL

HELP = "run multi-tenant chat sessions on a model; print TTFT with and without KV reuse and hit rates"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL} (default), tiny, tiny-<family>, a local path"
    )
    parser.add_argument("--tenants", type=argtypes.positive_int, default=4)
    parser.add_argument("--sessions", type=argtypes.positive_int, default=32, help="chat sessions in total")
    parser.add_argument("--turns", type=argtypes.positive_int, default=3)
    parser.add_argument("--system-prompt-tokens", type=argtypes.non_negative_int, default=512)
    parser.add_argument("--user-tokens", type=argtypes.positive_int, default=64)
    parser.add_argument(
        "--output-tokens",
        type=argtypes.positive_int,
        default=None,
        help="per reply (default: 48 for text chats, else 16)",
    )
    parser.add_argument(
        "--concurrency",
        type=argtypes.positive_int,
        default=1,
        help="random-token sessions batched together per turn (1: TTFT columns time one request alone)",
    )
    parser.add_argument("--private-system-prompts", action="store_true", help="one per tenant, not shared")
    parser.add_argument("--num-blocks", type=argtypes.positive_int, default=4096)
    parser.add_argument("--block-size", type=argtypes.positive_int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=argtypes.positive_int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)


def chat(model: str, sessions: int, turns: int, seed: int) -> None:
    """What ``run`` prints for these options, every other one at its default (``kvcache demo``)."""
    parser = argparse.ArgumentParser()
    add_parser(parser)
    args = parser.parse_args([])
    args.model, args.sessions, args.turns, args.seed = model, sessions, turns, seed
    run(args)


def _ms(values: list[float]) -> float:
    return 1000 * statistics.median(values) if values else float("nan")


def run(args: argparse.Namespace) -> int:
    import torch

    from kvcache.engine import Engine, EngineConfig
    from kvcache.errors import ConfigError

    if args.tenants < 1 or args.sessions < 1 or args.turns < 1 or args.concurrency < 1:
        raise ConfigError("--tenants, --sessions, --turns and --concurrency must each be >= 1")
    torch.set_num_threads(args.threads)
    config = EngineConfig(
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
    )
    engine = Engine.load(args.model, config)
    # A model with a tokenizer holds a real conversation; random weights get random tokens.
    rows = _text_chat(engine, args) if engine.tokenizer is not None else _token_sessions(engine, args)
    _print_table(engine, rows)
    return 0


@dataclass(frozen=True, slots=True)
class _Row:
    tenant: str
    ttft_s: float
    uncached_ttft_s: float | None


def _header(engine: Any, what: str) -> None:
    import torch

    print(
        f"model {engine.model_id} on {engine.device} {str(engine.dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f}; {what}"
    )


def _text_chat(engine: Any, args: argparse.Namespace) -> list[_Row]:
    from kvcache.lab import chat

    tokenizer = chat.tokenizer_of(engine)
    system = tokenizer.encode_chat([("system", chat.SYSTEM_PROMPT)], add_generation_prompt=False)
    _header(engine, f"{len(chat.SCRIPT)} tenants share a {len(system)}-token public system prompt")
    turns = chat.run_script(engine, tokenizer, max_new_tokens=args.output_tokens or 48)
    for t in turns:
        r = t.reply
        bare = f"{1000 * r.uncached_ttft_s:.0f}" if r.uncached_ttft_s is not None else "-"
        print(f"[{t.tenant} turn {t.turn + 1}] {t.question}")
        print(f"    {r.text.strip()}")
        print(
            f"    prompt {r.prompt_tokens} tokens, {r.cached_tokens} cached "
            f"({r.cached_tokens / r.prompt_tokens:.0%}); TTFT {1000 * r.ttft_s:.0f} ms with reuse, "
            f"{bare} ms without"
        )
    return [_Row(t.tenant, t.reply.ttft_s, t.reply.uncached_ttft_s) for t in turns]


def _token_sessions(engine: Any, args: argparse.Namespace) -> list[_Row]:
    from kvcache.lab.sessions import ChatConfig, run_chat

    chat = ChatConfig(
        num_tenants=args.tenants,
        num_sessions=args.sessions,
        turns=args.turns,
        system_prompt_tokens=args.system_prompt_tokens,
        user_tokens=args.user_tokens,
        output_tokens=args.output_tokens or 16,
        shared_system_prompt=not args.private_system_prompts,
        seed=args.seed,
        concurrency=args.concurrency,
    )
    start = time.perf_counter()
    results = run_chat(engine, chat)
    wall_s = time.perf_counter() - start
    kind = "private" if args.private_system_prompts else "shared"
    _header(
        engine,
        f"{len(results)} requests, {args.system_prompt_tokens}-token {kind} system prompt, "
        f"{args.concurrency} session(s) batched per turn; {chat.output_tokens * len(results)} output "
        f"tokens in {wall_s:.1f} s including the no-reuse baseline prefills",
    )
    return [_Row(r.tenant, r.ttft_s, r.uncached_ttft_s) for r in results]


def _print_table(engine: Any, results: list[_Row]) -> None:
    from kvcache.lab import tables
    from kvcache.lab.tables import Column

    stats = engine.manager.stats()

    def ttfts(tenant: str) -> tuple[float, float]:  # medians in ms: with reuse, without
        mine = [r for r in results if tenant in ("all", r.tenant)]
        bare = [r.uncached_ttft_s for r in mine if r.uncached_ttft_s is not None]
        return _ms([r.ttft_s for r in mine]), _ms(bare)

    columns = (
        Column("tenant", 0, align="<"),
        Column("requests", lambda r: r[1].requests),
        Column("prompt tok", lambda r: r[1].query_tokens),
        Column("hit tok", lambda r: r[1].hit_tokens),
        Column("hit rate", lambda r: r[1].hit_rate, ".1%"),
        Column("TTFT reuse ms", lambda r: r[2][0], ".2f"),
        Column("TTFT no reuse ms", lambda r: r[2][1], ".2f"),
        Column("speedup", lambda r: f"{r[2][1] / r[2][0]:.2f}x"),
    )
    tenants = sorted({r.tenant for r in results})
    rows = [(t, stats.tenants[t], ttfts(t)) for t in tenants] + [("all", stats, ttfts("all"))]
    print(tables.plain(columns, rows))
    print("TTFT figures are medians per request; speedup = no reuse / reuse.")
