"""Plain-transformers reference runs (no cache of any kind), which cached runs must equal."""

from __future__ import annotations

import torch

from kvcache.engine import Engine


@torch.inference_mode()
def full_logits(engine: Engine, tokens: list[int]) -> torch.Tensor:
    """The last position's logits of the whole of ``tokens`` run by the bare model."""
    ids = torch.tensor([tokens])
    return engine.model(input_ids=ids, use_cache=False).logits[0, -1].float()  # type: ignore[no-any-return]


def full_greedy(engine: Engine, tokens: list[int], n: int) -> list[int]:
    """``n`` greedy tokens, each from a full uncached run of everything before it."""
    seq, out = list(tokens), []
    for _ in range(n):
        token = int(full_logits(engine, seq).argmax())
        out.append(token)
        seq.append(token)
    return out
