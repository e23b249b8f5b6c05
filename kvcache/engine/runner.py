"""The model runner: one forward over every token a step scheduled, KV read and written in the pool.

All scheduled tokens of all sequences are flattened into one list with per-token positions; the
step's attention metadata (block tables, context lengths, slots) is built once and handed to the
model as an explicit argument (``hf.PagedStep``), so the unchanged transformers model code runs a
ragged batch. Logits come back only where a sequence's chunk ends at its last token (it samples).

Not here: which tokens run (``scheduler``), which token is chosen (``sampling``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from kvcache.engine.scheduler import Scheduled, step_shape
from kvcache.kernels.dispatch import Backend
from kvcache.kernels.paged import PagedMetadata
from kvcache.model import hf


@dataclass(frozen=True, slots=True)
class StepBatch:
    """What a step computed. ``sample_rows[j]`` is the index in ``scheduled`` whose logits are row
    ``j``; ``num_context_tokens`` sums every scheduled sequence's context after the step."""

    logits: torch.Tensor  # [len(sample_rows), vocab] float32
    sample_rows: list[int]
    num_prefill_tokens: int
    num_decode_seqs: int
    num_context_tokens: int
    attention_work: float  # sum over prefill chunks of n * (context before + n / 2)
    forward_s: float  # the model forward alone (metadata and inputs built before it)


class ModelRunner:
    def __init__(
        self,
        model: object,
        pool: torch.Tensor,
        device: torch.device,
        block_table: Callable[[Hashable], list[int]],
        backend: Backend = "auto",
    ) -> None:
        self.model = model
        self.block_table = block_table  # request id -> its block ids (the block manager's)
        self.pool = pool  # [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]
        self.device = device
        self.block_size = pool.shape[3]
        self.backend = backend

    def execute(self, scheduled: list[Scheduled]) -> StepBatch:
        ids: list[int] = []
        positions: list[int] = []
        tables, lens, qlens, logits_at, rows = [], [], [], [], []
        shape = step_shape(scheduled)
        for j, s in enumerate(scheduled):
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            ids += seq.tokens[start : start + n]
            positions += range(start, start + n)
            tables.append(self.block_table(seq.request_id))
            lens.append(start + n)
            qlens.append(n)
            if start + n == seq.num_tokens:
                logits_at.append(len(ids) - 1)
                rows.append(j)
        dev = self.device
        metadata = PagedMetadata.build(tables, lens, qlens, self.block_size, dev)
        step = hf.PagedStep(self.pool, metadata, self.backend)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        position_ids = torch.tensor(positions, dtype=torch.long, device=dev)
        logits_indices = torch.tensor(logits_at, dtype=torch.long, device=dev)
        t0 = time.perf_counter()
        logits = hf.paged_forward(self.model, input_ids, position_ids, step, logits_indices)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return StepBatch(
            logits,
            rows,
            shape.num_prefill_tokens,
            shape.num_decode_seqs,
            shape.num_context_tokens,
            shape.attention_work,
            time.perf_counter() - t0,
        )
