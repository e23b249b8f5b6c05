"""The batched engine on the real default model (SmolLM2-135M-Instruct, float32 on CPU): every
sequence of one mixed batch yields the greedy tokens and logits (max abs diff <= 1e-4) of that
sequence run alone through plain transformers.

The batch mixes prompt lengths, prefix hits of 0%, partial and all but one block, two tenants (one
reading a published system prompt), and a prompt longer than the step's token budget, so it is
prefilled in chunks while the others decode. Prompts are short and replies a few tokens: the model
is loaded once per session (``smollm2`` fixture) and each solo run is one forward.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvcache.engine import Engine, EngineConfig, SamplingParams

BS = 16
ATOL = 1e-4
NUM_NEW = 4

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]


def toks(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 4096, (n,), generator=g).tolist()  # type: ignore[no-any-return]


@torch.inference_mode()
def solo_logits(model: Any, tokens: list[int], num_new: int) -> torch.Tensor:
    """Logits after each of the last ``num_new`` prefixes of ``tokens``, from one plain forward."""
    logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float()
    return logits[len(tokens) - num_new :]  # type: ignore[no-any-return]


def test_mixed_batch_on_the_real_model_equals_solo_runs(smollm2: Any) -> None:
    engine = Engine(smollm2, EngineConfig(num_blocks=64, block_size=BS, max_num_batched_tokens=40))
    system = toks(0, 32)
    engine.publish(system)
    warm = toks(1, 48)
    engine.generate(warm, "a", max_new_tokens=1)  # caches warm's 3 full blocks for tenant a
    engine.generate(system + toks(9, 3), "b", max_new_tokens=1)  # computes the public blocks
    cases = [
        (warm + toks(2, 5), "a", 48),  # all but the last (partial) block cached
        (warm[:20] + toks(3, 14), "a", 16),  # partial hit
        (toks(4, 11), "a", 0),  # nothing cached
        (warm + toks(2, 5), "b", 0),  # the same tokens for another tenant: nothing visible
        (system + toks(5, 50), "b", 32),  # the public prefix, then a private prompt in chunks
    ]
    rids = [
        engine.add_request(p, scope, SamplingParams(max_tokens=NUM_NEW), keep_logits=True)
        for p, scope, _ in cases
    ]
    seqs = [engine.sequence(r) for r in rids]
    engine.step_records.clear()
    while engine.has_unfinished():
        engine.step()
        engine.manager.check_invariants()
    assert any(r.num_prefill_tokens and r.num_decode_seqs for r in engine.step_records)  # mixed steps
    assert sum(1 for r in engine.step_records if r.num_prefill_tokens) >= 2  # the budget chunked it
    for seq, (prompt, _, cached) in zip(seqs, cases, strict=True):
        assert seq.num_cached_tokens == cached
        assert len(seq.output_tokens) == NUM_NEW and len(seq.logits) == NUM_NEW
        expected = solo_logits(engine.model, prompt + seq.output_tokens[:-1], NUM_NEW)
        torch.testing.assert_close(torch.stack(seq.logits), expected, atol=ATOL, rtol=0)
        assert seq.output_tokens == expected.argmax(-1).tolist()
    assert engine.manager.num_running == 0
    engine.manager.check_invariants()
