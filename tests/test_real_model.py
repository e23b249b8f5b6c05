"""The real default model (SmolLM2-135M-Instruct, float32 on CPU) through the engine.

Cached-prefix prefills give the logits of one plain forward over the whole prompt (max abs diff
<= 1e-4) and greedy replies with identical text, for prefix hits of 0%, partial and all but one
block and across tenants sharing a published system prompt. Chat turns rendered by the model's
template extend the previous turn's conversation token for token, so the next turn hits every full
block of the previous prompt and reply. Streamed text equals the text of the whole reply. Prompts
are short and replies a few tokens: the model is loaded once per session (``smollm2`` fixture).
"""

from __future__ import annotations

from typing import Any

import pytest
from reference import full_greedy, full_logits

from kvcache import Scope
from kvcache.cli import main
from kvcache.engine import Engine, EngineConfig
from kvcache.lab import chat
from kvcache.model.tokenize import HFTokenizer, IncrementalDecoder, load

BS = 16
ATOL = 1e-4
NEW_TOKENS = 6
SYSTEM = [("system", chat.SYSTEM_PROMPT)]
QUESTION = [*SYSTEM, ("user", "What is the capital of France?")]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]


def fresh(loaded: Any) -> tuple[Engine, HFTokenizer]:
    engine = Engine(loaded, EngineConfig(num_blocks=64, block_size=BS))
    tokenizer = chat.tokenizer_of(engine)
    assert isinstance(tokenizer, HFTokenizer)
    return engine, tokenizer


def test_logits_and_greedy_text_equal_across_hits_and_tenants(smollm2: Any) -> None:
    engine, tokenizer = fresh(smollm2)
    system = tokenizer.encode_chat(SYSTEM, add_generation_prompt=False)
    question = "What is the capital of France? Please answer in one short and simple sentence."
    prompt = tokenizer.encode_chat([*SYSTEM, ("user", question)])
    assert prompt[: len(system)] == system and len(system) == 80  # 5 full blocks
    assert len(prompt) == 105  # 6 full blocks and 9 tokens
    assert engine.publish(system) == 5
    ref_logits, ref_tokens = full_logits(engine, prompt), full_greedy(engine, prompt, NEW_TOKENS)
    ref_text = tokenizer.decode(ref_tokens)
    assert ref_text.startswith("The capital of France is")

    def check(scope: str, expect_cached: int) -> None:
        logits, cached = engine.score(prompt, Scope(scope))
        assert cached == expect_cached
        assert float((logits - ref_logits).abs().max()) <= ATOL
        gen = engine.generate(prompt, Scope(scope), max_new_tokens=NEW_TOKENS)
        assert gen.output_tokens == ref_tokens and tokenizer.decode(gen.output_tokens) == ref_text
        engine.manager.check_invariants()

    check("acme", expect_cached=0)  # 0%: nothing computed yet
    # partial: globex shares the 5 public system-prompt blocks acme computed, not acme's 6th block
    check("globex", expect_cached=80)
    check("acme", expect_cached=96)  # all but the last token's block


def test_chat_turn_extends_previous_conversation_and_hits_it(smollm2: Any) -> None:
    engine, tokenizer = fresh(smollm2)
    first = chat.reply(engine, tokenizer, QUESTION, "acme", max_new_tokens=24)
    assert first.stopped and first.text == "The capital of France is Paris."
    assert first.cached_tokens == 0
    turn1 = tokenizer.encode_chat(QUESTION)
    conversation = [*QUESTION, ("assistant", first.text)]
    done = tokenizer.encode_chat(conversation, add_generation_prompt=False)
    turn2_messages = [*conversation, ("user", "Which river flows through that city?")]
    turn2 = tokenizer.encode_chat(turn2_messages)
    # the reply re-tokenizes to the very tokens the model produced, and turn 2 starts with turn 1
    assert done[: len(turn1) + len(first.token_ids)] == turn1 + first.token_ids
    assert turn2[: len(done)] == done and len(turn2) > len(done)
    second = chat.reply(engine, tokenizer, turn2_messages, "acme", max_new_tokens=4)
    # every full block of turn 1's prompt and reply was cached (decode blocks included)
    assert second.cached_tokens == (len(turn1) + len(first.token_ids)) // BS * BS
    assert second.prompt_tokens == len(turn2)


def test_streamed_text_equals_whole_text(smollm2: Any) -> None:
    engine, tokenizer = fresh(smollm2)
    prompt = tokenizer.encode_chat([*SYSTEM, ("user", "Name a large planet.")])
    whole = engine.generate(prompt, "acme", max_new_tokens=12)
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(step.token_id) for step in engine.stream(prompt, "acme", max_new_tokens=12)]
    deltas.append(decoder.flush())
    assert decoder.ids == whole.output_tokens
    assert "".join(deltas) == tokenizer.decode(whole.output_tokens) != ""
    assert sum(1 for d in deltas if d) > 1  # text arrived in several pieces


def test_server_tokenizer_is_the_models_own(smollm2: Any) -> None:
    served = load("smollm2-135m")
    assert isinstance(served, HFTokenizer)
    assert served.stop_ids == frozenset({smollm2.tokenizer.eos_token_id})
    assert served.encode_chat(QUESTION) == HFTokenizer(smollm2.tokenizer, "x").encode_chat(QUESTION)


def test_models_command_lists_the_converted_model(smollm2: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("smollm2"))
    assert row[:3] == ["smollm2-135m", "installed", "yes"] and int(row[3]) > 400  # MiB of float32
