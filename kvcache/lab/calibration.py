"""Fit the router's latency model to the engine's real batched steps.

The engine records every step (``StepRecord``: prompt tokens computed, decoding sequences,
attention work, seconds). :func:`measure` drives prefills over a grid of new and cached lengths and
concurrent decode batches through the engine; :func:`fit` solves, by least squares over all
recorded steps,

    step_ms = (prefill_base_ms if the step computes prompt tokens else decode_base_ms)
              + prefill_ms_per_token * prompt_tokens
              + prefill_ms_per_token_per_ctx_token * sum(n * (ctx + n / 2))  (per prefill chunk)
              + decode_ms_per_token_per_seq * decoding_sequences

which is ``LatencyModel.prefill_ms`` / ``decode_step_ms`` per step. The fitted fields are those of
``kvcache.costs.LatencyModel``: the JSON written by :func:`write_latency_json` has exactly
its keys. Not here: how the router uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvcache.costs import LatencyModel
from kvcache.engine import Engine, SamplingParams, StepRecord


@dataclass(frozen=True, slots=True)
class LatencyFit:
    """The router's ``LatencyModel`` fields, in its order."""

    prefill_base_ms: float
    prefill_ms_per_token: float
    prefill_ms_per_token_per_ctx_token: float
    decode_base_ms: float
    decode_ms_per_token_per_seq: float
    max_num_seqs: int
    max_batched_tokens: int


def measure(
    engine: Engine,
    *,
    new_tokens: Sequence[int] = (32, 128, 512),
    contexts: Sequence[int] = (0, 512, 2048),
    batches: Sequence[int] = (1, 4, 16),
    decode_ctx: int = 512,
    repeats: int = 3,
    seed: int = 0,
) -> list[StepRecord]:
    """Real engine steps: prefills of ``new_tokens`` after ``contexts`` cached tokens (``repeats``
    each, one request per step), then ``batches`` of concurrent requests with ``decode_ctx``-token
    prompts decoding ``repeats + 1`` tokens (their prefill and mixed steps are kept too)."""
    rng = np.random.default_rng(seed)
    bs = engine.block_size
    records: list[StepRecord] = []
    grid = [(n, c) for c in contexts for n in new_tokens]
    for i, (num_new, ctx) in enumerate(tqdm(grid, desc="prefill", leave=False, disable=None)):
        ctx = ctx // bs * bs
        tokens = rng.integers(1, engine.vocab_size, size=ctx + num_new).tolist()
        if ctx:
            # A public context: every timed run, each in a fresh scope, hits exactly these blocks
            # and none of the suffix blocks an earlier run cached.
            engine.publish(tokens[:ctx])
            engine.score(tokens[: ctx + 1], f"calibrate-{i}-fill")
        engine.score(tokens, f"calibrate-{i}-warm")
        for r in range(repeats):
            before = len(engine.step_records)
            _, cached = engine.score(tokens, f"calibrate-{i}-{r}")
            assert cached == ctx, (cached, ctx)
            records += list(engine.step_records)[before:]
    for j, batch in enumerate(tqdm(batches, desc="decode", leave=False, disable=None)):
        prompts = [(rng.integers(1, engine.vocab_size, size=decode_ctx).tolist(), f"calibrate-d{j}-{k}")
                   for k in range(batch)]  # fmt: skip
        before = len(engine.step_records)
        engine.generate_many(prompts, SamplingParams(max_tokens=repeats + 1))
        records += list(engine.step_records)[before:]
    return records


def step_features(record: StepRecord) -> list[float]:
    """The latency model's terms for one step: which base cost applies, then the linear terms."""
    prefill = record.num_prefill_tokens > 0
    return [
        1.0 if prefill else 0.0,  # prefill_base_ms
        float(record.num_prefill_tokens),  # prefill_ms_per_token
        record.attention_work,  # prefill_ms_per_token_per_ctx_token
        0.0 if prefill else 1.0,  # decode_base_ms
        float(record.num_decode_seqs),  # decode_ms_per_token_per_seq
    ]


def predict_ms(latency: LatencyFit, record: StepRecord) -> float:
    coef = [
        latency.prefill_base_ms,
        latency.prefill_ms_per_token,
        latency.prefill_ms_per_token_per_ctx_token,
        latency.decode_base_ms,
        latency.decode_ms_per_token_per_seq,
    ]
    return sum(c * x for c, x in zip(coef, step_features(record), strict=True))


def fit(records: Sequence[StepRecord], *, max_num_seqs: int, max_batched_tokens: int) -> LatencyFit:
    """Least-squares fit of every step's seconds to the latency model's terms (clamped at 0: time
    never shrinks). A step's base is ``prefill_base_ms`` when it computes any prompt token, else
    ``decode_base_ms``; each decoding sequence adds ``decode_ms_per_token_per_seq`` in both, as
    ``LatencyModel.prefill_ms`` charges running sequences to a prefill's steps."""
    a = np.array([step_features(r) for r in records])
    y = np.array([r.seconds * 1000 for r in records])
    c = np.clip(np.linalg.lstsq(a, y, rcond=None)[0], 0.0, None)
    return LatencyFit(
        prefill_base_ms=float(c[0]),
        prefill_ms_per_token=float(c[1]),
        prefill_ms_per_token_per_ctx_token=float(c[2]),
        decode_base_ms=float(c[3]),
        decode_ms_per_token_per_seq=float(c[4]),
        max_num_seqs=max_num_seqs,
        max_batched_tokens=max_batched_tokens,
    )


def write_latency_json(latency: LatencyFit, path: str | Path) -> None:
    """Write through ``LatencyModel.to_json``, so the file is exactly what the replay reads."""
    LatencyModel(**asdict(latency)).to_json(path)
