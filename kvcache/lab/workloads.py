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


@dataclass(frozen=True, slots=True)
class TextRequest:
    """One request of a text workload, for servers that take prompts as text only."""

    tenant: str
    session: str
    turn: int
    prompt: str
    output_tokens: int


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


def _sentence(rng: np.random.Generator, num_words: int) -> str:
    words = rng.choice(len(_WORDS), size=num_words)
    return " ".join(_WORDS[i] for i in words)


def _text(rng: np.random.Generator, num_words: int, words_per_line: int = 12) -> str:
    """``num_words`` seeded words in lines of at most ``words_per_line``, each ending with a period."""
    lines = []
    while num_words > 0:
        n = min(words_per_line, num_words)
        lines.append(_sentence(rng, n).capitalize() + ".")
        num_words -= n
    return "\n".join(lines)


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
) -> list[TextRequest]:
    """Agents that keep their context: every request is one public system prompt (tool
    descriptions, the same for all tenants), the tenant's private document, the session's history
    and a new question, as text.

    Each tenant's document has between ``document_words[0]`` and ``document_words[1]`` words
    (drawn once per tenant). A session's history is its earlier questions each followed by a
    scripted answer of ``answer_words`` words (not the model's answer, so every server sees the
    same prompts). Requests come in turn order, round robin over all sessions, so a session's next
    turn is far behind its previous one in the stream.
    """
    lo, hi = document_words
    if not 0 < lo <= hi:
        raise ValueError(f"document_words={document_words}: need 0 < low <= high")
    rng = np.random.default_rng(seed)
    tools = []
    for k in range(max(1, system_words // 16)):
        tools.append(f"- tool_{k}(query, limit): {_sentence(rng, 13)}.")
    system = "You are an agent. Answer with one tool call. Tools:\n" + "\n".join(tools)
    documents = [
        f"Private document of tenant{t}:\n" + _text(rng, int(rng.integers(lo, hi + 1)))
        for t in range(num_tenants)
    ]
    histories = {(t, s): "" for t in range(num_tenants) for s in range(sessions_per_tenant)}
    requests: list[TextRequest] = []
    for turn in range(turns):
        for (t, s), history in histories.items():
            question = _sentence(rng, question_words).capitalize() + "?"
            prompt = f"{system}\n\n{documents[t]}\n\n{history}User: {question}\nAssistant:"
            requests.append(TextRequest(f"tenant{t}", f"t{t}s{s}", turn, prompt, output_tokens))
            answer = _sentence(rng, answer_words)
            histories[(t, s)] = f"{history}User: {question}\nAssistant: {answer}\n"
    return requests
