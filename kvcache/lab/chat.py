"""Real multi-turn chats through an ``Engine``: messages -> chat template -> tokens -> engine -> text.

Every turn re-sends the whole conversation, rendered by the model's chat template. The reply is
decoded from the tokens the model produced, up to its end-of-sequence token, and joins the
conversation as the assistant's message, so the next turn's tokens start with this turn's prompt
and reply and hit the blocks this turn filled. :func:`run_script` runs several tenants' chats that
share one published system prompt, turn by turn, and can time each turn's prefill by the bare
model too (TTFT without reuse, measured right before the engine's turn).

Not here: the tokenizer itself (``kvcache.model.tokenize``), printing (``commands/generate``).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import cast

from kvcache.cache.tenancy import Scope
from kvcache.engine import Engine, GenerationStep
from kvcache.lab.sessions import uncached_ttft
from kvcache.model.tokenize import ByteTokenizer, HFTokenizer, Tokenizer

Message = tuple[str, str]  # (role, content)

SYSTEM_PROMPT = (
    "You are a helpful assistant for a travel agency. You answer questions about geography, "
    "history and science for travellers planning a trip. Keep every answer short: one or two "
    "sentences, plain words, no lists. If a question is unclear, answer the most likely meaning. "
    "Never invent prices or opening hours; say that the traveller should check locally instead. "
    "Be friendly and precise."
)

# Two tenants, each asking follow-up questions in one conversation.
SCRIPT: dict[str, list[str]] = {
    "acme": [
        "What is the capital of France?",
        "Which river flows through that city?",
        "Name one famous museum there.",
    ],
    "globex": [
        "What is the largest planet in the solar system?",
        "Is it bigger than the Sun?",
        "What is the name of its largest moon?",
    ],
}


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    token_ids: list[int]  # the reply as generated, without the stop token
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    uncached_ttft_s: float | None  # the bare model prefilling the whole prompt; None without baseline
    stopped: bool  # ended by a stop token (else by max_new_tokens)


@dataclass(frozen=True, slots=True)
class ChatTurn:
    tenant: str
    turn: int
    question: str
    reply: Reply


def tokenizer_of(engine: Engine) -> Tokenizer:
    """The engine's model tokenizer, or bytes for random-weight models."""
    if engine.tokenizer is None:
        return ByteTokenizer(engine.vocab_size)
    return HFTokenizer(engine.tokenizer, engine.model_id)


def reply(
    engine: Engine,
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    scope: Scope | str | None = None,
    *,
    max_new_tokens: int = 48,
    baseline: bool = False,
) -> Reply:
    """Greedy reply to ``messages`` (the last is the user's), stopping at a stop token."""
    prompt = tokenizer.encode_chat(list(messages))
    base = uncached_ttft(engine, prompt) if baseline else None
    out: list[int] = []
    stopped, cached, ttft = False, 0, 0.0
    # The stream is a generator: closing it frees the request's blocks.
    steps = cast(
        Generator[GenerationStep, None, None], engine.stream(prompt, scope, max_new_tokens=max_new_tokens)
    )
    try:
        for step in steps:
            if step.index == 0:
                cached, ttft = step.cached_tokens, step.elapsed_s
            if step.token_id in tokenizer.stop_ids:
                stopped = True
                break
            out.append(step.token_id)
    finally:
        steps.close()  # every block filled so far stays cached
    return Reply(tokenizer.decode(out), out, len(prompt), cached, ttft, base, stopped)


def run_script(
    engine: Engine,
    tokenizer: Tokenizer,
    script: dict[str, list[str]] | None = None,
    system_prompt: str = SYSTEM_PROMPT,
    *,
    max_new_tokens: int = 48,
    baseline: bool = True,
) -> list[ChatTurn]:
    """Each tenant's questions as one conversation, turns interleaved across tenants. The system
    prompt's rendered tokens are published, so every tenant shares their blocks."""
    script = SCRIPT if script is None else script
    system: list[Message] = [("system", system_prompt)]
    engine.publish(tokenizer.encode_chat(system, add_generation_prompt=False))
    histories = {tenant: list(system) for tenant in script}
    turns: list[ChatTurn] = []
    for turn in range(max(len(q) for q in script.values())):
        for tenant, questions in script.items():
            if turn >= len(questions):
                continue
            history = histories[tenant]
            history.append(("user", questions[turn]))
            answer = reply(
                engine, tokenizer, history, Scope(tenant), max_new_tokens=max_new_tokens, baseline=baseline
            )
            history.append(("assistant", answer.text))
            turns.append(ChatTurn(tenant, turn, questions[turn], answer))
    return turns
