"""Fit the router's latency model to the engine's real batched steps.

The engine records every step (``StepRecord``: prompt tokens computed, decoding sequences,
attention work, seconds). :func:`measure` drives prefills over a grid of new and cached lengths and
concurrent decode batches through the engine; :func:`fit` solves, by least squares over all
recorded steps,

    step_ms = (prefill_base_ms if the step computes prompt tokens else decode_base_ms)
              + prefill_ms_per_token * prompt_tokens
              + prefill_ms_per_token_per_ctx_token * sum(n * (ctx + n / 2))  (per prefill chunk)
              + decode_ms_per_token_per_seq * decoding_sequences

which is ``LatencyModel.step_ms`` (``prefill_ms`` / ``decode_step_ms`` per step): the fit is a
``kvcache.costs.LatencyModel``, written with its ``to_json``. Not here: the formula itself
(``kvcache.costs``), how the router uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from kvcache.costs import STEP_TERMS, LatencyModel, step_terms
from kvcache.engine import Engine, SamplingParams, StepRecord


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
        prompts = [
            (rng.integers(1, engine.vocab_size, size=decode_ctx).tolist(), f"calibrate-d{j}-{k}")
            for k in range(batch)
        ]
        before = len(engine.step_records)
        engine.generate_many(prompts, SamplingParams(max_tokens=repeats + 1))
        records += list(engine.step_records)[before:]
    return records


def predict_ms(latency: LatencyModel, record: StepRecord) -> float:
    """What ``latency`` says ``record``'s step takes (``LatencyModel.step_ms``)."""
    return latency.step_ms(record.num_prefill_tokens, record.attention_work, record.num_decode_seqs)


def fit(records: Sequence[StepRecord], *, max_num_seqs: int, max_num_batched_tokens: int) -> LatencyModel:
    """Least-squares fit of every step's seconds to the latency model's terms (clamped at 0: time
    never shrinks). A step's base is ``prefill_base_ms`` when it computes any prompt token, else
    ``decode_base_ms``; each decoding sequence adds ``decode_ms_per_token_per_seq`` in both, as
    ``LatencyModel.prefill_ms`` charges running sequences to a prefill's steps."""
    a = np.array([step_terms(r.num_prefill_tokens, r.attention_work, r.num_decode_seqs) for r in records])
    y = np.array([r.seconds * 1000 for r in records])
    c = np.clip(np.linalg.lstsq(a, y, rcond=None)[0], 0.0, None)
    fitted = {name: float(x) for name, x in zip(STEP_TERMS, c, strict=True)}
    return LatencyModel(**fitted, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
