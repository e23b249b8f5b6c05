"""Seeded synthetic traces for the workloads where prefix-aware routing matters.

- ``chat``: multi-turn sessions; each turn re-sends the history plus a new user message, and
  the reply joins the history. Sessions open with one of a few system prompts shared by every
  tenant.
- ``agent``: agent loops re-sending a growing transcript of tool calls and tool outputs, a few
  seconds apart.
- ``docs``: questions over documents drawn from a Zipf popularity law (a few hot documents,
  a long tail).
- ``shared_prefix``: every request starts with the same system prompt and continues with a
  unique document-sized suffix (the workload that collapses pure prefix matching onto one
  worker).
- ``mix``: sessions drawn from chat, agent and docs at 50/25/25.

Sessions start as a Poisson process at ``session_rate_per_s``; a session's own requests follow
with think times. ``synthesize`` is a pure function of its arguments (numpy PCG64 from
``seed``) and returns token-level requests; ``trace.to_block_ids`` turns them into Mooncake
ones, and ``trace.write_trace`` writes either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvcache.errors import ConfigError
from kvcache.lab.trace import TraceRequest

WORKLOADS = ("mix", "chat", "agent", "docs", "shared_prefix")


@dataclass(frozen=True, slots=True)
class SynthConfig:
    """Shape of a synthetic trace (token counts are per message unless noted)."""

    workload: str = "mix"
    num_requests: int = 200
    num_tenants: int = 4
    session_rate_per_s: float = 1.0
    num_system_prompts: int = 3
    system_prompt_tokens: int = 1024
    user_tokens: int = 96
    output_tokens: int = 128
    turns: int = 4
    think_time_s: float = 20.0
    agent_steps: int = 6
    tool_output_tokens: int = 600
    num_documents: int = 50
    document_tokens: int = 3000
    zipf_exponent: float = 1.2
    vocab_size: int = 32_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ConfigError(f"workload={self.workload!r} is unknown; choose one of {list(WORKLOADS)}")
        for name in (
            "num_requests",
            "num_tenants",
            "num_system_prompts",
            "system_prompt_tokens",
            "user_tokens",
            "output_tokens",
            "turns",
            "agent_steps",
            "tool_output_tokens",
            "num_documents",
            "document_tokens",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.session_rate_per_s <= 0 or self.think_time_s < 0 or self.zipf_exponent <= 1.0:
            raise ConfigError("session_rate_per_s must be > 0, think_time_s >= 0 and zipf_exponent > 1")


class _Gen:
    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.systems = [self.draw(cfg.system_prompt_tokens) for _ in range(cfg.num_system_prompts)]
        self.docs: dict[int, list[int]] = {}
        self.out: list[tuple[float, int, TraceRequest]] = []

    def draw(self, n: int) -> list[int]:
        return self.rng.integers(1, self.cfg.vocab_size, size=max(1, n), dtype=np.int64).tolist()  # type: ignore[no-any-return]

    def length(self, mean: int) -> int:
        return max(1, int(self.rng.exponential(mean)) // 2 + mean // 2)

    def emit(self, t_s: float, tenant: str, session: str, tokens: list[int]) -> None:
        out = TraceRequest(
            round(t_s * 1000.0, 3),
            len(tokens),
            self.length(self.cfg.output_tokens),
            tenant,
            session,
            tokens=tuple(tokens),
        )
        self.out.append((out.timestamp_ms, len(self.out), out))

    def session(self, kind: str, number: int, t_s: float) -> None:
        cfg, rng = self.cfg, self.rng
        tenant = f"tenant{int(rng.integers(cfg.num_tenants))}"
        name = f"{kind}{number}"
        if kind == "shared_prefix":
            self.emit(t_s, tenant, name, [*self.systems[0], *self.draw(self.length(cfg.document_tokens))])
            return
        history = list(self.systems[int(rng.integers(cfg.num_system_prompts))])
        if kind == "docs":
            doc = int(rng.zipf(cfg.zipf_exponent)) % cfg.num_documents
            if doc not in self.docs:
                self.docs[doc] = self.draw(cfg.document_tokens)
            history += self.docs[doc]
            self.emit(t_s, tenant, name, history + self.draw(cfg.user_tokens))
            return
        steps = cfg.turns if kind == "chat" else cfg.agent_steps
        think = cfg.think_time_s if kind == "chat" else cfg.think_time_s / 10
        history += self.draw(self.length(cfg.user_tokens))
        for _ in range(steps):
            self.emit(t_s, tenant, name, history)
            grow = self.length(cfg.user_tokens if kind == "chat" else cfg.tool_output_tokens)
            history = history + self.draw(self.length(cfg.output_tokens)) + self.draw(grow)
            t_s += float(rng.exponential(think)) + 0.5


def synthesize(config: SynthConfig) -> list[TraceRequest]:
    """Token-level requests in timestamp order, exactly ``config.num_requests`` of them."""
    gen = _Gen(config)
    kinds = ("chat", "agent", "docs")
    t_s = 0.0
    number = 0
    # Sessions keep starting until the earliest ``num_requests`` requests are all generated:
    # every later session starts after the last of those.
    while True:
        t_s += float(gen.rng.exponential(1.0 / config.session_rate_per_s))
        if len(gen.out) >= config.num_requests:
            cutoff = sorted(gen.out)[config.num_requests - 1][0]
            if t_s * 1000.0 > cutoff:
                break
        kind = config.workload
        if kind == "mix":
            kind = kinds[int(gen.rng.choice(3, p=[0.5, 0.25, 0.25]))]
        gen.session(kind, number, t_s)
        number += 1
    return [req for _, _, req in sorted(gen.out)[: config.num_requests]]
