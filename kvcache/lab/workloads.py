"""Seeded synthetic workloads: the request streams the benchmarks, demos and tests replay.

Each generator is a pure function of its arguments and ``seed`` (numpy's PCG64), so the same call
gives the same requests on every machine. Token ids are drawn from ``[1, vocab_size)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload: who sends it, what prompt, how many tokens it decodes."""

    tenant: str
    session: str
    tokens: list[int]
    output_tokens: int
    timestamp_ms: float = 0.0


def multi_turn_chat(
    *,
    num_tenants: int = 4,
    sessions_per_tenant: int = 4,
    turns: int = 4,
    system_prompt_tokens: int = 256,
    user_tokens: int = 64,
    output_tokens: int = 32,
    shared_system_prompt: bool = True,
    vocab_size: int = 32_000,
    seed: int = 0,
) -> list[Request]:
    """Multi-turn chat sessions, interleaved across tenants in round-robin turn order.

    Every session starts with a system prompt (one for all tenants when ``shared_system_prompt``,
    else one per tenant); each turn re-sends the whole history plus a new user message, and the
    model's reply becomes part of the next turn's prompt.
    """
    rng = np.random.default_rng(seed)

    def draw(n: int) -> list[int]:
        return rng.integers(1, vocab_size, size=n, dtype=np.int64).tolist()  # type: ignore[no-any-return]

    common = draw(system_prompt_tokens)
    system = {t: common if shared_system_prompt else draw(system_prompt_tokens) for t in range(num_tenants)}
    histories = {(t, s): list(system[t]) for t in range(num_tenants) for s in range(sessions_per_tenant)}
    requests: list[Request] = []
    for _turn in range(turns):
        for (t, s), history in histories.items():
            history.extend(draw(user_tokens))
            requests.append(Request(f"tenant{t}", f"t{t}s{s}", list(history), output_tokens))
            history.extend(draw(output_tokens))
    return requests


def system_prompt(*, system_prompt_tokens: int = 256, vocab_size: int = 32_000, seed: int = 0) -> list[int]:
    """The shared system prompt ``multi_turn_chat`` uses for the same seed and vocabulary."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab_size, size=system_prompt_tokens, dtype=np.int64).tolist()  # type: ignore[no-any-return]
