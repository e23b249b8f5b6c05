"""``kvcache demo``: the main job on embedded defaults, a tour of the engine in three parts.

1. manager: multi-tenant chat sessions through one block manager, hit rates per tenant. Tenants
   share a published system prompt; two of them also form a share group. Requests run
   ``--in-flight`` at a time (allocate, decode ``output_tokens`` with ``append``, free).
2. router: a seeded synthetic trace (chat, agent loops, Zipf documents) replayed over simulated
   workers under every routing policy (``kvcache trace`` + ``kvcache replay --policy all``).
3. model: a real conversation on SmolLM2-135M-Instruct (converted from its package on first use):
   two tenants share a public system prompt and ask follow-ups; the real answers, cached tokens
   per turn and TTFT with and without KV reuse (``kvcache generate``; ``--model tiny`` for random
   weights).

``--parts`` picks a subset; the whole tour takes one to two minutes on two CPU cores (plus about
half a minute the first time, to convert the model).
"""

from __future__ import annotations

import argparse
from collections import deque

from tqdm import tqdm

from kvcache.cache.config import DEFAULT_BLOCK_SIZE, CacheConfig
from kvcache.cache.manager import BlockManager
from kvcache.cache.tenancy import Scope
from kvcache.commands import _argtypes as argtypes
from kvcache.lab import tables
from kvcache.lab.tables import Column
from kvcache.lab.workloads import SynthConfig, multi_turn_chat, synthesize, system_prompt
from kvcache.model.registry import DEFAULT_MODEL

HELP = "a tour on embedded defaults: block manager hit rates, routing policies, a real model's chat and TTFT"
PARTS = ("manager", "router", "model")


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenants", type=argtypes.positive_int, default=4)
    parser.add_argument("--sessions", type=argtypes.positive_int, default=8, help="sessions per tenant")
    parser.add_argument("--turns", type=argtypes.positive_int, default=4)
    parser.add_argument("--system-prompt-tokens", type=argtypes.non_negative_int, default=512)
    parser.add_argument("--num-blocks", type=argtypes.positive_int, default=2048)
    parser.add_argument("--block-size", type=argtypes.positive_int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--in-flight", type=argtypes.positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model of part 3 (tiny: random weights)")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )


def run(args: argparse.Namespace) -> int:
    from kvcache.errors import ConfigError

    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ConfigError(f"--parts {args.parts!r}: choose a comma-separated subset of {','.join(PARTS)}")
    if "manager" in parts:
        _banner("1. block manager: tenants sharing a system prompt, isolated otherwise")
        _manager(args)
    if "router" in parts:
        _banner("2. router: a synthetic trace over 8 simulated workers, every policy")
        _router(args.seed)
    if "model" in parts:
        _banner(f"3. model: {args.model} chatting with two tenants, with and without KV reuse")
        _model(args.model, args.seed)
    return 0


def _banner(title: str) -> None:
    print(f"\n== {title}")


def _router(seed: int) -> None:
    """What ``kvcache trace --workload mix`` and ``kvcache replay --policy all`` print, on 8 workers."""
    from kvcache.lab import report
    from kvcache.lab.replay import ReplayConfig, prepare, replay
    from kvcache.lab.trace import Trace, to_block_ids
    from kvcache.router.policies import POLICIES

    block_tokens, workers = 512, 8
    synthetic = synthesize(SynthConfig(workload="mix", num_requests=1500, seed=seed))
    requests = to_block_ids(synthetic, block_tokens)
    trace = Trace(requests, "mooncake", block_tokens)
    unique = trace.unique_blocks(block_tokens)
    capacity = max(1, int(0.1 * unique / workers))
    prompts = prepare(trace, block_tokens)
    print(
        f"synthetic mix trace: {len(requests)} requests over {trace.duration_ms / 1000:.0f} s, "
        f"{unique} unique blocks of {block_tokens} tokens; {workers} workers, mode precise"
    )
    rows = [
        report.metrics(
            replay(trace, ReplayConfig(workers, capacity, name), block_size=block_tokens, prompts=prompts)
        )
        for name in POLICIES
    ]
    bounds = report.upper_bounds(trace, prompts, block_tokens, capacity * workers)
    print(f"\n{capacity} blocks per worker ({capacity * workers} in all)")
    print(report.table(rows))
    print(
        "upper bounds (one cache, no queueing): same total capacity "
        f"{bounds['shared_cache_token_hit_rate']:.1%}, "
        f"infinite {bounds['infinite_cache_token_hit_rate']:.1%} token hit rate"
    )


def _model(model: str, seed: int) -> None:
    """What ``kvcache generate --model MODEL --sessions 8 --turns 2`` prints."""
    from kvcache.commands import generate

    generate.chat(model, sessions=8, turns=2, seed=seed)


def _manager(args: argparse.Namespace) -> None:
    vocab = 32_000
    config = CacheConfig(num_blocks=args.num_blocks, block_size=args.block_size, vocab_size=vocab)
    manager = BlockManager(config)
    published = manager.publish(
        system_prompt(system_prompt_tokens=args.system_prompt_tokens, vocab_size=vocab, seed=args.seed)
    )
    requests = multi_turn_chat(
        num_tenants=args.tenants,
        sessions_per_tenant=args.sessions,
        turns=args.turns,
        system_prompt_tokens=args.system_prompt_tokens,
        vocab_size=vocab,
        seed=args.seed,
    )
    # tenant0 and tenant1 trust each other: their non-public blocks live in one share group.
    scopes = {f"tenant{t}": Scope(f"tenant{t}", group="team" if t < 2 else None) for t in range(args.tenants)}
    running: deque[int] = deque()
    for i, req in enumerate(tqdm(requests, desc="requests", unit="req", leave=False, disable=None)):
        if len(running) >= args.in_flight:
            manager.free(running.popleft())
        manager.allocate(i, req.tokens, scopes[req.tenant])
        manager.append(i, [1] * req.output_tokens)
        running.append(i)
    while running:
        manager.free(running.popleft())
    manager.check_invariants()

    stats = manager.stats()
    print(f"published system prompt: {published} blocks of {args.block_size} tokens")
    columns = (
        Column("tenant", 0, align="<"),
        Column("scope", 1, align="<"),
        Column("requests", lambda r: r[2].requests),
        Column("prompt tok", lambda r: r[2].query_tokens),
        Column("hit tok", lambda r: r[2].hit_tokens),
        Column("hit rate", lambda r: r[2].hit_rate, ".1%"),
    )
    per_tenant = [(t, scopes[t].chain_scope, s) for t, s in sorted(stats.tenants.items())]
    print(tables.plain(columns, [*per_tenant, ("all", "", stats)]))
    print(f"evictions {stats.evictions}, blocks cached {stats.cached_free_blocks} of {stats.num_blocks}")
    probe = requests[-1]
    outsiders = [t for t in scopes if scopes[t].chain_scope != scopes[probe.tenant].chain_scope]
    if not outsiders:
        return  # every tenant shares one scope: there is no isolation to show
    other = outsiders[-1]
    assert probe.tokens is not None, "multi_turn_chat requests are token-level"
    own = manager.lookup(probe.tokens, scopes[probe.tenant])
    probed = manager.lookup(probe.tokens, scopes[other])
    print(
        f"isolation: {probe.tenant} sees {own} cached tokens of its last prompt; {other} probing the "
        f"same tokens sees {probed} (the public system prompt, {published * args.block_size} tokens)"
    )
