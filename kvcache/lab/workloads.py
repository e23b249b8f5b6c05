"""Seeded synthetic workloads: every request stream the benchmarks, demos, tests and ``kvcache trace`` use.

Every workload is a list of ``trace.TraceRequest``, the record a replay consumes, and every one is
built the same way: one seeded stream of draws (``Draws``, numpy's PCG64 from ``seed``, so a call
gives the same requests on every machine) feeds sessions, each a generator of requests, and one of
two schedules plays them:

- turn order (``_turn_order``): a fixed set of sessions, all at time 0, one request of each in turn
  (round robin) until their turns are done;
- arrivals (``_earliest``): sessions open at the times of an arrival process (Poisson, or Poisson
  with bursts) and play out whole with think times between their requests; the earliest
  ``num_requests`` requests are kept, in timestamp order.

The workloads:

- ``multi_turn_chat``: chat sessions in turn order; each turn re-sends the history plus a user
  message and the reply joins the history. Tokens are drawn from ``[1, vocab_size)``.
- ``persistent_agents``: agents in turn order whose prompts are text (a public system prompt of
  tools, the tenant's private document, the session's history, a question), stored as UTF-8 bytes
  the way a trace's ``text`` field is (``trace.prompt_text`` reads them back).
- ``synthesize(SynthConfig)``: token-level traces for prefix-aware routing. ``chat``; ``agent``
  (loops re-sending a growing transcript of tool calls and outputs, a few seconds apart); ``docs``
  (questions over documents of a Zipf popularity law); ``shared_prefix`` (one system prompt, then a
  unique document-sized suffix: the workload that collapses pure prefix matching onto one worker);
  ``mix`` (chat, agent, docs sessions at 50/25/25). Poisson session arrivals.
- ``synthesize_shape(ShapeConfig)``: the routing matrix's shapes in Mooncake format, built from
  16-token units (a unit stands for 16 prompt tokens of one content stream) and cut into
  ``block_tokens``-token blocks with prefix-chained ids. Tenants are not written (Mooncake has no
  tenant field); every tenant's prompts open with its own system prompt, so two tenants never share
  a prefix anyway. The shapes (``_ARRIVALS`` holds their arrival processes):

  - ``rag``: ``num_tenants`` (40) tenants with private system prompts of 1-4 blocks; a shared pool
    of ``num_documents`` (3,000) documents of 2-8 blocks drawn by a Zipf(1.1) law; a request is
    its tenant's system prompt, 2-4 documents in random order and a question (32-400 tokens).
    Arrivals 5x faster in 10% of 10 s windows;
  - ``bursty``: chat (20 system prompts of 2-6 blocks, 2-8 turns, user messages of 32-600 tokens,
    replies of ~300, think time ~15 s) whose session arrivals spike to 4x in 15% of the windows;
  - ``long_agent``: agents (8 tool suites with 4-16k-token system prompts; 10-40 steps, each adding
    a tool call and a 0.5-4k-token tool output, 1-5 s apart; transcripts up to 64k tokens);
  - ``fleet``: sessions of the three at 50/30/20 under ``rag``'s arrivals.

  Their clock is in arbitrary session-rate units: ``trace.scale_to_load`` rescales it to an
  offered load.

Not here: reading, writing and rescaling traces, block ids of token-level requests (``trace``);
replaying them (``replay``); chats whose replies come from a real model (``sessions``, ``chat``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from kvcache.errors import ConfigError
from kvcache.lab.trace import TraceRequest, prefix_chain, token_request

WORKLOADS = ("mix", "chat", "agent", "docs", "shared_prefix")
SHAPES = ("rag", "bursty", "long_agent", "fleet")
UNIT_TOKENS = 16
_WINDOW_S = 10.0
# Shape -> its session arrivals: (sessions per second of its clock, burst factor, bursting windows).
_ARRIVALS = {
    "rag": (1.0, 5.0, 0.1),
    "bursty": (0.25, 4.0, 0.15),
    "long_agent": (0.1, 1.0, 0.0),
    "fleet": (1.0, 5.0, 0.1),
}
# A mixed workload -> (the kinds of its sessions, their probabilities).
_MIXES = {
    "mix": (("chat", "agent", "docs"), (0.5, 0.25, 0.25)),
    "fleet": (("rag", "bursty", "long_agent"), (0.5, 0.3, 0.2)),
}

P = TypeVar("P")


class Draws:
    """The one seeded stream every workload draws from, in a fixed order."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.next_unit = 1

    def tokens(self, n: int, vocab_size: int) -> list[int]:
        """``n`` token ids from ``[1, vocab_size)``."""
        return self.rng.integers(1, vocab_size, size=n, dtype=np.int64).tolist()  # type: ignore[no-any-return]

    def length(self, mean: int) -> int:
        """A length around ``mean``: half of it fixed, half exponential (always >= 1)."""
        return max(1, int(self.rng.exponential(mean)) // 2 + mean // 2)

    def between(self, low: int, high: int) -> int:
        """An integer of ``[low, high]``."""
        return int(self.rng.integers(low, high + 1))

    def pick(self, kinds: tuple[str, ...], weights: tuple[float, ...]) -> str:
        return kinds[int(self.rng.choice(len(kinds), p=list(weights)))]

    def units(self, n: int) -> list[int]:
        """``n`` units never drawn before."""
        start = self.next_unit
        self.next_unit += n
        return list(range(start, start + n))

    def sentence(self, num_words: int) -> str:
        return " ".join(_WORDS[i] for i in self.rng.choice(len(_WORDS), size=num_words))

    def text(self, num_words: int, words_per_line: int = 12) -> str:
        """``num_words`` words in lines of at most ``words_per_line``, each ending with a period."""
        lines = []
        while num_words > 0:
            n = min(words_per_line, num_words)
            lines.append(self.sentence(n).capitalize() + ".")
            num_words -= n
        return "\n".join(lines)


# ---- schedules --------------------------------------------------------------------------------


def _turn_order(sessions: list[Iterator[TraceRequest]]) -> list[TraceRequest]:
    """One request of every session in turn until they end; sessions have equally many turns."""
    # zip advances session 0, then 1, ...: each session draws its turn when its request is due.
    return [req for turn in zip(*sessions, strict=True) for req in turn]


def _poisson(draws: Draws, rate_per_s: float) -> Iterator[float]:
    t_s = 0.0
    while True:
        t_s += float(draws.rng.exponential(1.0 / rate_per_s))
        yield t_s


def _bursty(draws: Draws, rate_per_s: float, factor: float, fraction: float) -> Iterator[float]:
    """Poisson arrivals at ``rate_per_s``, ``factor`` times faster in a ``fraction`` of the windows."""
    t_s, window_end, current = 0.0, 0.0, rate_per_s
    while True:
        gap = float(draws.rng.exponential(1.0 / current))
        if t_s + gap > window_end:  # memoryless: redraw from the window's end at its rate
            t_s = window_end
            window_end += _WINDOW_S
            current = rate_per_s * (factor if draws.rng.random() < fraction else 1.0)
            continue
        t_s += gap
        yield t_s


def _earliest(
    starts: Iterator[float],
    play: Callable[[float], Iterable[tuple[float, P]]],
    num_requests: int,
    keys_per_s: float,
) -> list[tuple[float, P]]:
    """The ``num_requests`` earliest of the sessions ``play(start_s)`` yields, as ``(key, payload)``
    sorted by key (a time in ``1 / keys_per_s`` seconds), then by order of generation.

    Sessions start at ``starts`` until one starts after the earliest ``num_requests`` requests.
    ``synthesize`` keys requests by their timestamp in milliseconds (rounded as written),
    ``synthesize_shape`` by the exact time in seconds: the orders their traces always had.
    """
    rows: list[tuple[float, int, P]] = []
    for start_s in starts:
        if len(rows) >= num_requests:
            cutoff = sorted(rows, key=_order)[num_requests - 1][0]
            if start_s * keys_per_s > cutoff:  # so does every later session
                break
        for key, payload in play(start_s):
            rows.append((key, len(rows), payload))
    return [(key, payload) for key, _, payload in sorted(rows, key=_order)[:num_requests]]


def _order(row: tuple[float, int, object]) -> tuple[float, int]:
    return row[0], row[1]


# ---- chat and agents in turn order -----------------------------------------------------------


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
) -> list[TraceRequest]:
    """Multi-turn chat sessions in turn order, all at time 0.

    Every session starts with a system prompt (one for all tenants when ``shared_system_prompt``,
    else one per tenant); each turn re-sends the whole history plus a new user message, and the
    model's reply becomes part of the next turn's prompt.
    """
    draws = Draws(seed)
    common = draws.tokens(system_prompt_tokens, vocab_size)
    systems = [
        common if shared_system_prompt else draws.tokens(system_prompt_tokens, vocab_size)
        for _ in range(num_tenants)
    ]

    def session(t: int, s: int) -> Iterator[TraceRequest]:
        history = list(systems[t])
        for _ in range(turns):
            history += draws.tokens(user_tokens, vocab_size)
            req = token_request(history, output_tokens, tenant=f"tenant{t}", session=f"t{t}s{s}")
            history += draws.tokens(output_tokens, vocab_size)
            yield req

    return _turn_order([session(t, s) for t in range(num_tenants) for s in range(sessions_per_tenant)])


def system_prompt(*, system_prompt_tokens: int = 256, vocab_size: int = 32_000, seed: int = 0) -> list[int]:
    """The shared system prompt ``multi_turn_chat`` uses for the same seed and vocabulary."""
    return Draws(seed).tokens(system_prompt_tokens, vocab_size)


# Common English words: with a BPE tokenizer (SmolLM2's, Llama's, Qwen's) each is one token after a
# space; with capitals, periods and line breaks a text costs about 1.3 tokens per word (SmolLM2), a
# tool line about 1.5.
_WORD_TEXT = (
    "the of and to in is for on with as by at from that this it be are was or an not but can all "
    "one new data file user time report list page value order price cost team plan task code test "
    "build run check find send read write open close start stop call query search fetch update "
    "delete create record account project status result error message event item table field key "
    "name date city market product service client server model system sales region week month year "
    "total number count rate share level score risk policy rule note text line word term range limit "
    "first last next good high low big small main other same each more most less only also very "
    "quickly often never always today before after during within about against between across under"
)
_WORDS = tuple(_WORD_TEXT.split())


def persistent_agents(
    *,
    num_tenants: int = 4,
    sessions_per_tenant: int = 3,
    turns: int = 4,
    system_words: int = 600,
    document_words: tuple[int, int] = (300, 300),
    question_words: int = 30,
    answer_words: int = 32,
    output_tokens: int = 32,
    seed: int = 0,
) -> list[TraceRequest]:
    """Agents that keep their context, in turn order: every prompt is one public system prompt (tool
    descriptions, the same for all tenants), the tenant's private document, the session's history
    and a new question, as text (UTF-8 bytes; ``trace.prompt_text`` gives the text back).

    Each tenant's document has between ``document_words[0]`` and ``document_words[1]`` words
    (drawn once per tenant). A session's history is its earlier questions each followed by a
    scripted answer of ``answer_words`` words (not the model's answer, so every server sees the
    same prompts). Round robin over all sessions puts a session's next turn far behind its
    previous one in the stream.
    """
    low, high = document_words
    if not 0 < low <= high:
        raise ConfigError(f"document_words={document_words}: need 0 < low <= high")
    draws = Draws(seed)
    tools = [f"- tool_{k}(query, limit): {draws.sentence(13)}." for k in range(max(1, system_words // 16))]
    system = "You are an agent. Answer with one tool call. Tools:\n" + "\n".join(tools)
    documents = [
        f"Private document of tenant{t}:\n" + draws.text(draws.between(low, high)) for t in range(num_tenants)
    ]

    def session(t: int, s: int) -> Iterator[TraceRequest]:
        history = ""
        for _ in range(turns):
            question = draws.sentence(question_words).capitalize() + "?"
            prompt = f"{system}\n\n{documents[t]}\n\n{history}User: {question}\nAssistant:"
            req = token_request(
                prompt.encode("utf-8"), output_tokens, tenant=f"tenant{t}", session=f"t{t}s{s}"
            )
            history = f"{history}User: {question}\nAssistant: {draws.sentence(answer_words)}\n"
            yield req

    return _turn_order([session(t, s) for t in range(num_tenants) for s in range(sessions_per_tenant)])


# ---- token-level traces -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SynthConfig:
    """Shape of a token-level trace (token counts are per message unless noted)."""

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


def synthesize(config: SynthConfig) -> list[TraceRequest]:
    """Token-level requests in timestamp order, exactly ``config.num_requests`` of them."""
    cfg = config
    draws = Draws(cfg.seed)
    systems = [draws.tokens(cfg.system_prompt_tokens, cfg.vocab_size) for _ in range(cfg.num_system_prompts)]
    documents: dict[int, list[int]] = {}
    numbers = itertools.count()

    def tokens(n: int) -> list[int]:
        return draws.tokens(n, cfg.vocab_size)

    def play(t_s: float) -> Iterator[tuple[float, TraceRequest]]:
        kind = draws.pick(*_MIXES[cfg.workload]) if cfg.workload in _MIXES else cfg.workload
        tenant = f"tenant{int(draws.rng.integers(cfg.num_tenants))}"
        name = f"{kind}{next(numbers)}"

        def emit(history: list[int]) -> tuple[float, TraceRequest]:
            ms = round(t_s * 1000.0, 3)
            req = token_request(
                history, draws.length(cfg.output_tokens), tenant=tenant, session=name, timestamp_ms=ms
            )
            return ms, req

        if kind == "shared_prefix":
            yield emit([*systems[0], *tokens(draws.length(cfg.document_tokens))])
            return
        history = list(systems[int(draws.rng.integers(cfg.num_system_prompts))])
        if kind == "docs":
            doc = int(draws.rng.zipf(cfg.zipf_exponent)) % cfg.num_documents
            if doc not in documents:
                documents[doc] = tokens(cfg.document_tokens)
            yield emit(history + documents[doc] + tokens(cfg.user_tokens))
            return
        chat = kind == "chat"
        think_s = cfg.think_time_s if chat else cfg.think_time_s / 10
        history += tokens(draws.length(cfg.user_tokens))
        for _ in range(cfg.turns if chat else cfg.agent_steps):
            yield emit(history)
            grow = draws.length(cfg.user_tokens if chat else cfg.tool_output_tokens)
            history = history + tokens(draws.length(cfg.output_tokens)) + tokens(grow)
            t_s += float(draws.rng.exponential(think_s)) + 0.5

    rows = _earliest(_poisson(draws, cfg.session_rate_per_s), play, cfg.num_requests, keys_per_s=1000.0)
    return [req for _, req in rows]


# ---- the routing matrix's shapes --------------------------------------------------------------


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


_Units = tuple[list[int], int]  # a request's prompt in units, its output tokens


def synthesize_shape(config: ShapeConfig) -> list[TraceRequest]:
    """Exactly ``config.num_requests`` Mooncake-format requests in timestamp order."""
    cfg = config
    draws = Draws(cfg.seed)
    block_units = cfg.block_tokens // UNIT_TOKENS
    rag_systems = [draws.units(block_units * draws.between(1, 4)) for _ in range(cfg.num_tenants)]
    chat_systems = [draws.units(block_units * draws.between(2, 6)) for _ in range(20)]
    agent_systems = [draws.units(draws.between(256, 1024)) for _ in range(8)]
    documents: dict[int, list[int]] = {}
    weights = np.arange(1, cfg.num_documents + 1, dtype=np.float64) ** -cfg.zipf_exponent
    document_p = weights / weights.sum()

    def fresh(low_tokens: int, high_tokens: int) -> list[int]:
        """New units for a message of ``low_tokens`` to ``high_tokens`` tokens."""
        return draws.units(max(1, draws.between(low_tokens, high_tokens) // UNIT_TOKENS))

    def rag(t_s: float) -> Iterator[tuple[float, _Units]]:
        tenant = int(draws.rng.integers(cfg.num_tenants))
        k = draws.between(2, 4)
        picks = draws.rng.choice(cfg.num_documents, size=k, replace=False, p=document_p)
        units = list(rag_systems[tenant])
        for d in draws.rng.permutation(picks):
            if int(d) not in documents:
                documents[int(d)] = draws.units(block_units * draws.between(2, 8))
            units += documents[int(d)]
        yield t_s, (units + fresh(32, 400), draws.length(200))

    def chat(t_s: float) -> Iterator[tuple[float, _Units]]:
        history = list(chat_systems[int(draws.rng.integers(len(chat_systems)))])
        for _ in range(draws.between(2, 8)):
            history += fresh(32, 600)
            output = draws.length(300)
            yield t_s, (list(history), output)
            history += draws.units(max(1, output // UNIT_TOKENS))
            t_s += float(draws.rng.exponential(15.0)) + 1.0

    def agent(t_s: float) -> Iterator[tuple[float, _Units]]:
        history = list(agent_systems[int(draws.rng.integers(len(agent_systems)))])
        history += fresh(64, 800)
        for _ in range(draws.between(10, 40)):
            if len(history) > 64 * 1024 // UNIT_TOKENS:
                return
            output = draws.length(120)
            yield t_s, (list(history), output)
            history += draws.units(max(1, output // UNIT_TOKENS)) + fresh(500, 4000)
            t_s += float(draws.rng.uniform(1.0, 5.0))

    kinds = {"rag": rag, "bursty": chat, "long_agent": agent}

    def play(t_s: float) -> Iterator[tuple[float, _Units]]:
        kind = draws.pick(*_MIXES[cfg.shape]) if cfg.shape in _MIXES else cfg.shape
        return kinds[kind](t_s)

    starts = _bursty(draws, *_ARRIVALS[cfg.shape])
    ids: dict[tuple[int, tuple[int, ...]], int] = {}
    return [
        TraceRequest(
            round(t_s * 1000.0, 3),
            len(units) * UNIT_TOKENS,
            output,
            block_ids=prefix_chain(units, block_units, ids),
        )
        for t_s, (units, output) in _earliest(starts, play, cfg.num_requests, keys_per_s=1.0)
    ]
