"""Multi-tenant chat sessions through an ``Engine``: every turn re-sends the whole conversation.

Each tenant's sessions start with a system prompt (one published prompt for all tenants when
``shared_system_prompt``, else one private prompt per tenant); each turn appends a user message,
generates a reply with the engine (``concurrency`` sessions at a time in one continuous batch, so
with more than one a TTFT includes steps shared with the others), and the reply (the tokens the
model really produced) becomes part of the next turn's prompt, so the blocks filled during
decode are hit by the next turn.

With ``baseline=True`` every turn is also prefilled by the bare model without any cache, right
before the engine runs it, so TTFT with and without reuse are measured side by side under the same
machine load. Not here: printing (``commands/generate``), the model itself (``hf``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kvcache.cache.tenancy import Scope
from kvcache.engine import Engine, SamplingParams
from kvcache.lab.workloads import Draws
from kvcache.model import hf


@dataclass(frozen=True, slots=True)
class ChatConfig:
    num_tenants: int = 4
    num_sessions: int = 32  # in total, spread round-robin over the tenants
    turns: int = 3
    system_prompt_tokens: int = 512
    user_tokens: int = 64
    output_tokens: int = 16
    shared_system_prompt: bool = True
    seed: int = 0
    concurrency: int = 1  # sessions whose turns run together in one continuous batch


@dataclass(frozen=True, slots=True)
class TurnResult:
    tenant: str
    session: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float  # through the engine, reusing cached blocks, batched with up to ``concurrency`` others
    uncached_ttft_s: float | None  # the bare model prefilling the whole prompt; None without baseline


@torch.inference_mode()
def uncached_ttft(engine: Engine, tokens: Sequence[int]) -> float:
    """Seconds for the bare model to prefill ``tokens`` from scratch and pick the first token."""
    start = time.perf_counter()
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=engine.device)
    int(hf.forward(engine.model, ids, hf.new_cache(), 0)[0].argmax())
    return time.perf_counter() - start


def run_chat(engine: Engine, config: ChatConfig, *, baseline: bool = True) -> list[TurnResult]:
    """Run every session's turns, turn by turn, ``concurrency`` sessions at a time."""
    draws = Draws(config.seed)  # the workloads' one seeded stream, so the same seed draws the same tokens
    vocab = engine.vocab_size

    def draw(n: int) -> list[int]:
        return draws.tokens(n, vocab)

    tenants = [f"tenant{t}" for t in range(config.num_tenants)]
    if config.shared_system_prompt:
        common = draw(config.system_prompt_tokens)
        engine.publish(common)
        systems = {t: common for t in tenants}
    else:
        systems = {t: draw(config.system_prompt_tokens) for t in tenants}
    sessions = [(tenants[s % len(tenants)], s) for s in range(config.num_sessions)]
    histories = {s: list(systems[tenant]) for tenant, s in sessions}
    results: list[TurnResult] = []
    total = config.turns * len(sessions)
    with tqdm(total=total, desc="turns", unit="req", leave=False, disable=None) as bar:
        for turn in range(config.turns):
            for w in range(0, len(sessions), config.concurrency):
                wave = sessions[w : w + config.concurrency]
                for _, s in wave:
                    histories[s].extend(draw(config.user_tokens))
                base = {s: uncached_ttft(engine, histories[s]) if baseline else None for _, s in wave}
                gens = engine.generate_many(
                    [(histories[s], Scope(tenant)) for tenant, s in wave],
                    SamplingParams(max_tokens=config.output_tokens),
                )
                for (tenant, s), gen in zip(wave, gens, strict=True):
                    history = histories[s]
                    results.append(
                        TurnResult(tenant, s, turn, len(history), gen.cached_tokens, gen.ttft_s, base[s])
                    )
                    history.extend(gen.output_tokens)
                bar.update(len(wave))
    return results
