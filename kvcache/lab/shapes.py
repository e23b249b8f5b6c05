"""Seeded workload shapes for the routing benchmark matrix, written as Mooncake-format traces.

Each shape is built from 16-token units (a unit stands for 16 prompt tokens of one content
stream), cut into ``block_tokens``-token blocks, and given Mooncake block ids chained by prefix
(equal ids at the same position are the same prefix block), so a replay sees exactly the reuse
the shape promises. Tenants are not written (Mooncake has no tenant field): every tenant's
prompts open with its own private system prompt, so two tenants never share a prefix anyway.

- ``rag``: retrieval-augmented QA. ``num_tenants`` (40) tenants, each with a private system
  prompt of 1-4 blocks; a shared pool of ``num_documents`` (3,000) documents of 2-8 blocks
  drawn by a Zipf(1.1) popularity law; each request is its tenant's system prompt, 2-4
  documents in random order, then a fresh question (32-400 tokens). Poisson arrivals whose
  rate is 5x for 10% of the time (10 s windows).
- ``bursty``: multi-turn chat (20 tenants' system prompts of 2-6 blocks, 2-8 turns, each
  turn re-sends the history plus a user message of 32-600 tokens; replies of ~300 tokens;
  think time ~15 s) whose session arrivals spike to 4x for 15% of the time.
- ``long_agent``: long-context agents (8 tool suites with 4-16 k-token system prompts;
  10-40 steps, each adding a tool call and a 0.5-4 k-token tool output, 1-5 s apart;
  transcripts up to 64 k tokens).
- ``fleet``: one fleet serving all three (sessions drawn rag/bursty/long_agent at 50/30/20)
  under the rag burst pattern.

``generate`` is a pure function of its config (numpy PCG64 from ``seed``). Its clock is in
arbitrary session-rate units; ``scale_to_load`` stretches or squeezes the timestamps so the
trace offers a given prefill load to a given number of workers under a ``LatencyModel``
(load 1.0 keeps every worker's prefill engine busy if nothing were cached). Token-level
shapes (chat, agent, docs, shared_prefix) are ``synth``'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kvcache.costs import LatencyModel
from kvcache.errors import ConfigError
from kvcache.lab.trace import TraceRequest

SHAPES = ("rag", "bursty", "long_agent", "fleet")
UNIT_TOKENS = 16
_WINDOW_S = 10.0


@dataclass(frozen=True, slots=True)
class ShapeConfig:
    """One shape's size; the proportions inside a shape are fixed (see the module docstring)."""

    shape: str = "rag"
    num_requests: int = 1500
    block_tokens: int = 512
    num_tenants: int = 40
    num_documents: int = 3000
    zipf_exponent: float = 1.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ConfigError(f"shape={self.shape!r} is unknown; choose one of {list(SHAPES)}")
        for name in ("num_requests", "num_tenants", "num_documents"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.block_tokens < UNIT_TOKENS or self.block_tokens % UNIT_TOKENS:
            raise ConfigError(
                f"block_tokens={self.block_tokens} must be a positive multiple of {UNIT_TOKENS}"
            )
        if self.zipf_exponent <= 0:
            raise ConfigError(f"zipf_exponent={self.zipf_exponent} must be > 0")


Request = tuple[float, list[int], int]  # (seconds, units, output tokens)


class _Gen:
    def __init__(self, cfg: ShapeConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.next_unit = 1
        bu = cfg.block_tokens // UNIT_TOKENS
        self.block_units = bu
        # Tenant system prompts per sub-shape, drawn lazily so every shape uses the same stream.
        self.rag_systems = [self.fresh(bu * int(self.rng.integers(1, 5))) for _ in range(cfg.num_tenants)]
        self.chat_systems = [self.fresh(bu * int(self.rng.integers(2, 7))) for _ in range(20)]
        self.agent_systems = [self.fresh(int(self.rng.integers(256, 1025))) for _ in range(8)]
        self.docs: dict[int, list[int]] = {}
        ranks = np.arange(1, cfg.num_documents + 1, dtype=np.float64)
        weights = ranks**-cfg.zipf_exponent
        self.doc_p = weights / weights.sum()

    def fresh(self, n: int) -> list[int]:
        """``n`` units never seen before."""
        start = self.next_unit
        self.next_unit += n
        return list(range(start, start + n))

    def units(self, lo_tokens: int, hi_tokens: int) -> int:
        return max(1, int(self.rng.integers(lo_tokens, hi_tokens + 1)) // UNIT_TOKENS)

    def output(self, mean: int) -> int:
        return max(1, int(self.rng.exponential(mean)) // 2 + mean // 2)

    def doc(self, d: int) -> list[int]:
        if d not in self.docs:
            self.docs[d] = self.fresh(self.block_units * int(self.rng.integers(2, 9)))
        return self.docs[d]

    def rag(self, t: float) -> Iterator[Request]:
        tenant = int(self.rng.integers(self.cfg.num_tenants))
        k = int(self.rng.integers(2, 5))
        picks = self.rng.choice(self.cfg.num_documents, size=k, replace=False, p=self.doc_p)
        units = list(self.rag_systems[tenant])
        for d in self.rng.permutation(picks):
            units += self.doc(int(d))
        yield t, units + self.fresh(self.units(32, 400)), self.output(200)

    def chat(self, t: float) -> Iterator[Request]:
        history = list(self.chat_systems[int(self.rng.integers(len(self.chat_systems)))])
        for _ in range(int(self.rng.integers(2, 9))):
            history += self.fresh(self.units(32, 600))
            out = self.output(300)
            yield t, list(history), out
            history += self.fresh(max(1, out // UNIT_TOKENS))
            t += float(self.rng.exponential(15.0)) + 1.0

    def agent(self, t: float) -> Iterator[Request]:
        history = list(self.agent_systems[int(self.rng.integers(len(self.agent_systems)))])
        history += self.fresh(self.units(64, 800))
        limit = 64 * 1024 // UNIT_TOKENS
        for _ in range(int(self.rng.integers(10, 41))):
            if len(history) > limit:
                return
            out = self.output(120)
            yield t, list(history), out
            history += self.fresh(max(1, out // UNIT_TOKENS)) + self.fresh(self.units(500, 4000))
            t += float(self.rng.uniform(1.0, 5.0))

    def arrivals(self, rate: float, factor: float, fraction: float) -> Iterator[float]:
        """Poisson arrivals at ``rate``, ``factor`` times faster in a ``fraction`` of windows."""
        t, window_end, current = 0.0, 0.0, rate
        while True:
            gap = float(self.rng.exponential(1.0 / current))
            if t + gap > window_end:  # memoryless: redraw from the window's end at its rate
                t = window_end
                window_end += _WINDOW_S
                current = rate * (factor if self.rng.random() < fraction else 1.0)
                continue
            t += gap
            yield t


def generate(cfg: ShapeConfig) -> list[TraceRequest]:
    """Exactly ``cfg.num_requests`` Mooncake-format requests in timestamp order."""
    gen = _Gen(cfg)
    kinds = {"rag": gen.rag, "bursty": gen.chat, "long_agent": gen.agent}
    if cfg.shape == "bursty":
        starts = gen.arrivals(0.25, 4.0, 0.15)
    elif cfg.shape == "long_agent":
        starts = gen.arrivals(0.1, 1.0, 0.0)
    else:
        starts = gen.arrivals(1.0, 5.0, 0.1)
    out: list[tuple[float, int, list[int], int]] = []
    for t in starts:
        if len(out) >= cfg.num_requests:
            cutoff = sorted(out)[cfg.num_requests - 1][0]
            if t > cutoff:  # every later session starts after the earliest num_requests
                break
        kind = cfg.shape
        if kind == "fleet":
            kind = ("rag", "bursty", "long_agent")[int(gen.rng.choice(3, p=[0.5, 0.3, 0.2]))]
        for when, units, output in kinds[kind](t):
            out.append((when, len(out), units, output))
    out.sort()
    return _to_block_ids(out[: cfg.num_requests], gen.block_units)


def _to_block_ids(rows: list[tuple[float, int, list[int], int]], block_units: int) -> list[TraceRequest]:
    ids: dict[tuple[int, tuple[int, ...]], int] = {}
    requests = []
    for t, _, units, output in rows:
        parent, chain = -1, []
        for start in range(0, len(units), block_units):
            parent = ids.setdefault((parent, tuple(units[start : start + block_units])), len(ids))
            chain.append(parent)
        num_tokens = len(units) * UNIT_TOKENS
        requests.append(TraceRequest(round(t * 1000.0, 3), num_tokens, output, block_ids=tuple(chain)))
    return requests


def offered_load(requests: list[TraceRequest], num_workers: int, latency: LatencyModel) -> float:
    """Fraction of the workers' prefill time the trace asks for if nothing were cached."""
    if len(requests) < 2:
        return 0.0
    work_ms = sum(latency.prefill_ms(r.num_tokens, 0, 0) for r in requests)
    span_ms = requests[-1].timestamp_ms - requests[0].timestamp_ms
    return work_ms / (num_workers * max(span_ms, 1e-9))


def scale_to_load(
    requests: list[TraceRequest], num_workers: int, load: float, latency: LatencyModel | None = None
) -> list[TraceRequest]:
    """The same requests on a clock stretched so that ``offered_load`` is ``load``."""
    if load <= 0:
        raise ConfigError(f"load={load} must be > 0 (1.0 = every prefill engine busy without caching)")
    if num_workers < 1:
        raise ConfigError(f"num_workers={num_workers} must be >= 1")
    now = offered_load(requests, num_workers, latency or LatencyModel())
    if now == 0.0:
        return list(requests)
    factor = now / load
    return [
        TraceRequest(round(r.timestamp_ms * factor, 3), r.num_tokens, r.output_tokens, block_ids=r.block_ids)
        for r in requests
    ]
