"""bf16: cached-suffix logits stay within a documented tolerance of the full run.

Runs on CUDA when present (where kernels differ between the suffix and the full run), else on the
CPU. Tolerance: ``|delta logit| <= BF16_RTOL * max|logit|``, bf16's 8-bit mantissa with room for a
few layers of rounding; greedy tokens must agree wherever the full run's top-2 margin exceeds it.
Observed on CPU: 0 for every family.
"""

from __future__ import annotations

import pytest
import torch

from kvcache.engine import Engine, EngineConfig
from kvcache.model import hf

BF16_RTOL = 2e-2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-phi"])
def test_bf16_suffix_logits_within_tolerance(name: str) -> None:
    loaded = hf.load_model(name, device=DEVICE, dtype=torch.bfloat16)
    engine = Engine(loaded, EngineConfig(num_blocks=64))
    g = torch.Generator().manual_seed(1)
    p = torch.randint(1, 1024, (96,), generator=g).tolist()
    engine.generate(p[:80], "a", max_new_tokens=1)  # caches 5 blocks
    logits, cached = engine.score(p, "a")
    assert cached == 80
    with torch.inference_mode():
        full = loaded.model(input_ids=torch.tensor([p], device=DEVICE), use_cache=False).logits[0, -1].float()
    tolerance = BF16_RTOL * float(full.abs().max())
    assert float((logits - full).abs().max()) <= tolerance
    top2 = full.topk(2).values
    if float(top2[0] - top2[1]) > 2 * tolerance:
        assert int(logits.argmax()) == int(full.argmax())
