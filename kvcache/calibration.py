"""Measure an engine's prefill and decode speed and fit the router's latency model to it.

Prefill is timed through the engine itself (``Engine.score``: hashing, block gather, model), for
``num_new`` new tokens after ``ctx`` cached tokens, and fitted by least squares to

    prefill_ms = prefill_base_ms + prefill_ms_per_token * num_new
                 + prefill_ms_per_token_per_ctx_token * num_new * (ctx + num_new / 2)

(the last term: attention of each new token over the cached context and the new tokens before it).
Decode is timed as one forward of ``batch`` single-token sequences over a ``ctx``-token cache:

    decode_step_ms = decode_base_ms + decode_ms_per_token_per_seq * batch

The formulas match ``LatencyModel.prefill_ms``/``decode_step_ms`` for one request, and the fitted fields are
those of ``kvcache.router.latency.LatencyModel``: the JSON written by :func:`write_latency_json`
has exactly its keys. Not here: how the router uses them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kvcache import hf
from kvcache.engine import Engine
from kvcache.router.latency import LatencyModel


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


@dataclass(frozen=True, slots=True)
class Sample:
    kind: str  # "prefill" or "decode"
    num_new: int  # new tokens (prefill) or sequences in the batch (decode)
    ctx: int
    ms: float


def _median_ms(fn: Callable[[int], None], repeats: int) -> float:
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        fn(r)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(
    engine: Engine,
    *,
    new_tokens: Sequence[int] = (32, 128, 512),
    contexts: Sequence[int] = (0, 512, 2048),
    batches: Sequence[int] = (1, 4, 16),
    decode_ctx: int = 512,
    repeats: int = 3,
    seed: int = 0,
) -> list[Sample]:
    """Time prefill over ``new_tokens`` x ``contexts`` and decode over ``batches``."""
    rng = np.random.default_rng(seed)
    bs = engine.block_size
    samples: list[Sample] = []
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

        def run(r: int, tokens: list[int] = tokens, ctx: int = ctx, i: int = i) -> None:
            _, cached = engine.score(tokens, f"calibrate-{i}-{r}")
            assert cached == ctx, (cached, ctx)

        samples.append(Sample("prefill", num_new, ctx, _median_ms(run, repeats)))
    shape = engine.shape
    with torch.inference_mode():
        kv = torch.randn(
            (shape.num_layers, 2, shape.kv_heads, decode_ctx, shape.head_dim),
            dtype=engine.dtype,
            device=engine.device,
        )
        for batch in tqdm(batches, desc="decode", leave=False, disable=None):
            ids = torch.ones((batch, 1), dtype=torch.long, device=engine.device)
            times = []
            for _ in range(repeats + 1):  # the first run warms up
                cache = hf.batch_cache(kv, batch)  # forward grows it: a fresh one per step
                start = time.perf_counter()
                int(hf.forward(engine.model, ids, cache, decode_ctx)[0].argmax())
                times.append((time.perf_counter() - start) * 1000)
            samples.append(Sample("decode", batch, decode_ctx, statistics.median(times[1:])))
    return samples


def fit(samples: Sequence[Sample], *, max_num_seqs: int, max_batched_tokens: int) -> LatencyFit:
    """Least-squares fit of both formulas; coefficients are clamped at 0 (time never shrinks)."""
    pre = [s for s in samples if s.kind == "prefill"]
    a = np.array([[1.0, s.num_new, s.num_new * (s.ctx + s.num_new / 2)] for s in pre])
    p = np.clip(np.linalg.lstsq(a, np.array([s.ms for s in pre]), rcond=None)[0], 0.0, None)
    dec = [s for s in samples if s.kind == "decode"]
    b = np.array([[1.0, s.num_new] for s in dec])
    d = np.clip(np.linalg.lstsq(b, np.array([s.ms for s in dec]), rcond=None)[0], 0.0, None)
    return LatencyFit(
        prefill_base_ms=float(p[0]),
        prefill_ms_per_token=float(p[1]),
        prefill_ms_per_token_per_ctx_token=float(p[2]),
        decode_base_ms=float(d[0]),
        decode_ms_per_token_per_seq=float(d[1]),
        max_num_seqs=max_num_seqs,
        max_batched_tokens=max_batched_tokens,
    )


def write_latency_json(latency: LatencyFit, path: str | Path) -> None:
    """Write through ``LatencyModel.to_json``, so the file is exactly what the replay reads."""
    LatencyModel(**asdict(latency)).to_json(path)
