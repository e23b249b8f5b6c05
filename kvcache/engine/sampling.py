"""Sampling parameters of a request and the sampler that turns a step's logits into tokens.

Greedy (``temperature == 0``), or temperature with optional top-k and top-p (nucleus) filtering.
A request with a ``seed`` draws from its own generator, so its tokens depend only on its own logits
and seed, never on which other sequences share the step (reproducible across batch compositions).
A request without one draws from a generator the engine seeds from ``EngineConfig.seed``.

Stopping is the engine's job (``Sequence.check_stop``); these parameters say when: ``max_tokens``,
the model's end-of-sequence ids unless ``ignore_eos``, and ``stop`` token sequences (the matched
sequence is the end of the output, as vLLM does for ``stop_token_ids``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvcache.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    stop: tuple[tuple[int, ...], ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"temperature={t!r} must be a finite number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ConfigError(f"top_p={p!r} must lie in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed={self.seed!r} must be an integer or None")
        for s in self.stop:
            if not isinstance(s, tuple) or not s or not all(type(x) is int and x >= 0 for x in s):
                raise ConfigError(f"stop={self.stop!r}: each stop sequence is a non-empty tuple of token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``logits`` ``[vocab]`` scaled by temperature with top-k / top-p cut to -inf."""
    import torch  # here, not at the top: the parameters load without torch (see ``sample``)

    scores = logits / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cum = ordered.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = cum - ordered.softmax(-1) >= params.top_p
        scores = scores.index_fill(0, order[drop], float("-inf"))
    return scores


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits`` ``[rows, vocab]`` (float32)."""
    # torch is imported where tokens are drawn, so a sequence's parameters (and the scheduler that
    # reads them, which the replay's simulated workers run) load without it
    import torch

    tokens = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        rows = logits if len(greedy) == len(params) else logits[greedy]
        picked = rows.argmax(dim=-1).tolist()
        for i, t in zip(greedy, picked, strict=True):
            tokens[i] = int(t)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = _filter(logits[i].cpu(), p).softmax(-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return tokens
