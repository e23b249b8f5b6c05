"""The project's one step-cost model: how long a worker takes to prefill and decode, and its
batching limits. Everything that prices time reads it: the simulated workers of the replay, the
router's ``affinity`` policy (in the replay and in ``kvcache serve``), and the tier rule that
decides between loading a block and recomputing it (``tiers.policy``).

    compute_ms(new, cached) =
        new x prefill_ms_per_token                                          (linear layers)
      + new x (cached + new / 2) x prefill_ms_per_token_per_ctx_token        (attention over the context)
    prefill_ms(new, cached, running) =
        steps x (prefill_base_ms + decode_ms_per_token_per_seq x running)   (per forward step)
      + compute_ms(new, cached)
    steps = ceil(new / max_num_batched_tokens)
    decode_step_ms(seqs) = decode_base_ms + decode_ms_per_token_per_seq x seqs
    a served request's TTFT and end-to-end time also carry request_overhead_ms


Each prefill chunk shares its step with the ``running`` decoding sequences (chunked prefill, as
vLLM schedules it), which is how decode pressure slows a prefill down. ``max_num_seqs`` is the
worker's concurrency: 1 describes a worker that serves one request at a time. The defaults are
the rough shape of an 8B-parameter model in bf16 on one H100-class GPU; ``kvcache calibrate``
fits real ones from the engine's recorded steps and writes them with ``to_json``. ``prefill_ms``
and ``compute_ms`` take numpy arrays as well as numbers, elementwise and bit-identical to the
numbers' results, so the router prices every worker with them at once. This module only
computes times; queueing is the worker's job (simulated) and the router's estimate.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from kvcache.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

# Token counts (or times, which follow their type): a number, or a numpy array of them priced
# elementwise. Numbers are typed float so that ints bind to it; numpy is not imported at run time.
Counts = TypeVar("Counts", float, "np.ndarray")

_OPTIONAL = {"request_overhead_ms"}  # keys a file may omit (it then takes the default)
# The fields one engine step's time is linear in, in the order of ``step_terms``.
STEP_TERMS = (
    "prefill_base_ms",
    "prefill_ms_per_token",
    "prefill_ms_per_token_per_ctx_token",
    "decode_base_ms",
    "decode_ms_per_token_per_seq",
)


def step_terms(num_prefill_tokens: int, attention_work: float, num_decode_seqs: int) -> list[float]:
    """One step's values of the ``STEP_TERMS``: which base cost applies, then the linear terms."""
    prefill = num_prefill_tokens > 0
    return [
        1.0 if prefill else 0.0,
        float(num_prefill_tokens),
        float(attention_work),
        0.0 if prefill else 1.0,
        float(num_decode_seqs),
    ]


# The batched engine's step limits by default (``engine.EngineConfig``): defined here, below the
# engine, so that the front (which does not import torch) prices the workers ``kvcache serve``
# starts with the limits they run. ``LatencyModel``'s own defaults describe a modelled GPU worker.
ENGINE_MAX_NUM_SEQS = 64
ENGINE_MAX_NUM_BATCHED_TOKENS = 2048


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Latency parameters of one simulated worker (all times in milliseconds).

    - ``prefill_base_ms``: fixed cost of one forward step (launches, sampling).
    - ``prefill_ms_per_token``: linear-layer cost per prompt token computed.
    - ``prefill_ms_per_token_per_ctx_token``: attention cost per computed token per token of
      context before it (cached context included: a cache hit saves the linear work, not the
      attention of the new tokens over it).
    - ``decode_base_ms``: one decode step with a batch of one (weights read once per step).
    - ``decode_ms_per_token_per_seq``: extra step time per sequence in the batch.
    - ``max_num_seqs``: sequences a worker runs at once (prefilling or decoding); more wait.
    - ``max_num_batched_tokens``: prompt tokens per forward step (the chunked-prefill budget).
    - ``request_overhead_ms``: time a served request spends outside the engine before its first
      token (HTTP hops, tokenizing, routing, streaming back); it never occupies a worker's steps.
      0 describes the engine alone (what ``kvcache calibrate`` measures); ``benches/sim_vs_real.py``
      measures it on an idle server. Optional in JSON (default 0).
    """

    prefill_base_ms: float = 5.0
    prefill_ms_per_token: float = 0.08
    prefill_ms_per_token_per_ctx_token: float = 1.5e-6
    decode_base_ms: float = 8.0
    decode_ms_per_token_per_seq: float = 0.15
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 8192
    request_overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{f.name}={value!r} must be a finite number")
            if value < 0:
                raise ConfigError(f"{f.name}={value!r} must be >= 0")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")

    # prefill_ms and compute_ms take Python numbers or numpy arrays, elementwise with broadcasting
    # (the router prices every worker in one call): the same operations in the same order, so each
    # element of an array's result is bit-identical to the number's. A count <= 0 costs 0, clamped
    # by ``n * (n > 0)``, which both take, rather than by a branch, which an array cannot take.

    def prefill_ms(
        self, num_new_tokens: Counts, num_cached_tokens: Counts | int = 0, num_running: Counts | int = 0
    ) -> Counts:
        """Time to compute ``num_new_tokens`` after ``num_cached_tokens`` of reused context,
        sharing steps with ``num_running`` decoding sequences; numbers, or arrays elementwise."""
        n = num_new_tokens * (num_new_tokens > 0)
        steps = -(-n // self.max_num_batched_tokens)
        ms: Counts = steps * (
            self.prefill_base_ms + self.decode_ms_per_token_per_seq * num_running
        ) + self.compute_ms(n, num_cached_tokens)
        return ms

    def compute_ms(self, num_new_tokens: Counts, num_cached_tokens: Counts | int = 0) -> Counts:
        """The per-token part of a prefill: the time computing ``num_new_tokens`` after
        ``num_cached_tokens`` adds to the steps it runs in. It is what a cached block saves, so
        the tier rule weighs it against a block's transfer time. Numbers, or arrays elementwise."""
        n = num_new_tokens * (num_new_tokens > 0)
        return (
            n * self.prefill_ms_per_token
            + n * (num_cached_tokens + n / 2) * self.prefill_ms_per_token_per_ctx_token
        )

    def decode_step_ms(self, num_seqs: int) -> float:
        """One decode step producing a token for each of ``num_seqs`` sequences."""
        return self.decode_base_ms + self.decode_ms_per_token_per_seq * max(1, num_seqs)

    def step_ms(self, num_prefill_tokens: int, attention_work: float, num_decode_seqs: int) -> float:
        """One engine step as the engine records it: ``num_prefill_tokens`` prompt tokens computed
        with ``attention_work`` = sum over its prefill chunks of ``n x (ctx + n / 2)``, next to
        ``num_decode_seqs`` decoding sequences. The base is ``prefill_base_ms`` when the step computes
        any prompt token, else ``decode_base_ms``; the terms are those of ``prefill_ms`` and
        ``decode_step_ms`` (what ``kvcache calibrate`` fits, ``STEP_TERMS`` in order)."""
        # sum(coefficient x term) over ``STEP_TERMS`` and ``step_terms``, written out (a replay prices
        # every step): the same products added in the same order from 0, so the same float
        prefill, decode = (1.0, 0.0) if num_prefill_tokens > 0 else (0.0, 1.0)
        return (
            0.0
            + self.prefill_base_ms * prefill
            + self.prefill_ms_per_token * float(num_prefill_tokens)
            + self.prefill_ms_per_token_per_ctx_token * float(attention_work)
            + self.decode_base_ms * decode
            + self.decode_ms_per_token_per_seq * float(num_decode_seqs)
        )

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> LatencyModel:
        """Read a model written by ``to_json``; every field must be present, no other keys."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read a latency model from {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a latency model is a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data) - _OPTIONAL)
        if "max_batched_tokens" in unknown:
            raise ConfigError(
                f"{path}: the key max_batched_tokens was renamed max_num_batched_tokens (the engine's name "
                "for the chunk budget); rename it in the file"
            )
        if unknown or missing:
            raise ConfigError(
                f"{path}: unknown keys {unknown}, missing keys {missing}; expected exactly {sorted(names)}"
            )
        return cls(**data)
