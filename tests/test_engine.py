"""Engine behaviour around the model: block bookkeeping, decode sharing, failures, loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvcache import BlockRemoved, BlockStored, ConfigError, Scope
from kvcache import engine as engine_module
from kvcache.engine import Engine, EngineConfig
from kvcache.errors import ModelError
from kvcache.model import hf

BS = 16


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def loaded() -> hf.LoadedModel:
    return hf.load_model("tiny-qwen2", device="cpu", dtype=torch.float32)


@pytest.fixture
def engine(loaded: hf.LoadedModel) -> Engine:
    return Engine(loaded, EngineConfig(num_blocks=32, block_size=BS))


def toks(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1024, (n,), generator=g).tolist()  # type: ignore[no-any-return]


def test_pool_layout_follows_the_kernels_contract(engine: Engine) -> None:
    s = engine.shape
    assert engine.pool.shape == (s.num_layers, 2, 32, BS, s.kv_heads, s.head_dim)
    assert (engine.vocab_size, engine.model_id, engine.tokenizer) == (1024, "tiny-qwen2", None)


def test_blocks_filled_during_decode_become_shareable(engine: Engine) -> None:
    p = toks(1, 40)  # 2 full blocks + 8 tokens
    gen = engine.generate(p, "a", max_new_tokens=30)
    # 40 prompt + 29 decoded tokens have KV (the 30th output was never fed back): 4 full blocks
    stored = [e for e in engine.drain_events() if isinstance(e, BlockStored)]
    assert len(stored) == 4
    follow_up = p + gen.output_tokens + toks(2, 5)
    assert engine.generate(follow_up, "a", max_new_tokens=2).cached_tokens == 64
    assert engine.manager.lookup(follow_up, "b") == 0  # another tenant never sees them
    engine.manager.check_invariants()
    assert engine.manager.num_running == 0


def test_a_cached_prefix_is_read_in_place_not_recomputed(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens_per_forward: list[int] = []
    real = hf.paged_forward

    def counting(model: Any, input_ids: torch.Tensor, *args: Any) -> torch.Tensor:
        tokens_per_forward.append(input_ids.numel())
        return real(model, input_ids, *args)

    monkeypatch.setattr(hf, "paged_forward", counting)
    p = toks(3, 100)
    engine.generate(p, max_new_tokens=3)
    assert tokens_per_forward == [100, 1, 1]  # the whole prompt, then one token per decode step
    tokens_per_forward.clear()
    engine.generate(p, max_new_tokens=3)
    assert tokens_per_forward == [4, 1, 1]  # 6 full blocks (96 tokens) hit: only the tail runs
    assert not hasattr(engine_module, "gather_kv")  # no copy of the prefix into a cache object


def test_failed_request_leaves_no_unwritten_block_indexed(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = toks(4, 50)
    engine.generate(p[:20], "a", max_new_tokens=1)  # block 0 cached and written
    engine.drain_events()
    real = hf.paged_forward

    def failing(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("device lost")

    monkeypatch.setattr(hf, "paged_forward", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate(p, "a", max_new_tokens=4)
    removed = [e for e in engine.drain_events() if isinstance(e, BlockRemoved)]
    assert len(removed) == 2  # blocks 1 and 2 were indexed at allocation, never written
    assert engine.manager.lookup(p, "a") == 16  # the earlier, written block is still a hit
    assert engine.manager.num_running == 0
    engine.manager.check_invariants()
    monkeypatch.setattr(hf, "paged_forward", real)
    assert engine.generate(p, "a", max_new_tokens=1).cached_tokens == 16


def test_closing_a_stream_early_frees_its_blocks(engine: Engine) -> None:
    p = toks(5, 33)
    stream = engine.stream(p, Scope("a"), max_new_tokens=50)
    first = next(stream)
    assert (first.index, first.prompt_tokens, first.cached_tokens) == (0, 33, 0)
    assert first.timings is not None and first.elapsed_s >= first.timings.model_s
    assert engine.manager.num_running == 1
    stream.close()
    assert engine.manager.num_running == 0
    assert engine.manager.lookup(p, "a") == 32
    engine.manager.check_invariants()


def test_generation_counts_steps_and_times(engine: Engine) -> None:
    gen = engine.generate(toks(6, 20), max_new_tokens=5)
    assert len(gen.output_tokens) == 5 and all(0 <= t < 1024 for t in gen.output_tokens)
    assert 0 < gen.ttft_s <= gen.total_s
    assert (gen.prompt_tokens, gen.cached_tokens) == (20, 0)


def test_bad_arguments_raise_typed_errors(engine: Engine) -> None:
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        engine.stream([1, 2], max_new_tokens=0)
    with pytest.raises(ConfigError, match="dtype='fp8'"):
        EngineConfig(dtype="fp8")
    with pytest.raises(ModelError, match="tiny-llama"):
        Engine.load("no-such-org/no-such-model")
    with pytest.raises(ModelError, match="no tiny config named 'tiny-bert'"):
        hf.tiny_config("tiny-bert")
    assert engine.manager.num_running == 0


def test_local_checkpoint_loads_through_from_pretrained(loaded: hf.LoadedModel, tmp_path: Path) -> None:
    loaded.model.save_pretrained(tmp_path / "ckpt")
    engine = Engine.load(
        str(tmp_path / "ckpt"), EngineConfig(num_blocks=16, block_size=BS, device="cpu", dtype="float32")
    )
    assert (engine.model_id, engine.tokenizer, engine.shape) == (str(tmp_path / "ckpt"), None, loaded.shape)
    p = toks(7, 40)
    with torch.inference_mode():
        expected = loaded.model(input_ids=torch.tensor([p]), use_cache=False).logits[0, -1]
    logits, cached = engine.score(p)
    assert cached == 0
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_tokenizer_is_loaded_only_where_one_is_stored(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    tokenizer = hf.load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer is not None and tokenizer.encode("hello world") == [1, 2]
    (tmp_path / "empty").mkdir()
    assert hf.load_tokenizer(str(tmp_path / "empty")) is None
    assert hf.load_tokenizer("tiny") is None
