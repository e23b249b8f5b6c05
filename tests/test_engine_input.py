"""Bad prompts reach the engine as typed errors and leave nothing cached behind them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvcache import InvalidTokensError
from kvcache.engine import Engine, EngineConfig
from kvcache.model import hf

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def loaded() -> hf.LoadedModel:
    return hf.load_model("tiny-qwen2", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize(
    "bad", [b"\x01\x00\x00\x00" * 4, b"\x01\x02\x03", bytearray(16), "hello", [1, True, 3]]
)
def test_bad_prompt_is_typed_and_changes_no_later_answer(loaded: hf.LoadedModel, bad: Any) -> None:
    engine = Engine(loaded, EngineConfig(num_blocks=32, block_size=4))
    with pytest.raises(InvalidTokensError):
        engine.generate(bad, "t", max_new_tokens=2)
    assert engine.manager.stats().requests == 0 and engine.manager.pool.index == {}
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    fresh = Engine(loaded, EngineConfig(num_blocks=32, block_size=4))
    got = engine.generate(prompt, "t", max_new_tokens=4)
    want = fresh.generate(prompt, "t", max_new_tokens=4)
    assert (got.output_tokens, got.cached_tokens) == (want.output_tokens, want.cached_tokens)
