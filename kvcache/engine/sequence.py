"""One request's state inside the batched engine: its tokens, blocks, progress and outputs.

``tokens`` is the prompt followed by the outputs so far. KV exists (in the pool) for the first
``num_computed_tokens`` of them; the scheduler moves that mark forward, the engine appends
sampled tokens. The scheduler reads a sequence's length through ``num_tokens`` and its tokens
through ``tokens_between`` only, so a driver that never reads prompt tokens may hold them
otherwise (the replay's simulated sequences, ``lab.sim_worker.SimSequence``, hold only their
outputs). The block manager's request of the same id holds blocks for every token whose
KV is being or has been computed (``num_allocated_tokens``); it alone owns the block table.

Not here: who runs when (``scheduler``), the model (``runner``), token choice (``sampling``).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvcache.cache.manager import Prompt
from kvcache.cache.tenancy import Scope
from kvcache.engine.sampling import SamplingParams

if TYPE_CHECKING:  # annotations only: the scheduler loads without torch
    import torch


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(slots=True, eq=False)  # a request's state: equal only to itself (list.remove, ``in``)
class Sequence:
    request_id: Hashable
    tokens: list[int]
    num_prompt_tokens: int
    scope: Scope
    params: SamplingParams
    generator: torch.Generator | None  # None: no draws of its own (greedy, or a simulation)
    arrival_s: float
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    # Tokens the manager holds blocks for (0 while waiting): the manager's own count for this
    # request, mirrored because the scheduler changes it (admit, append, abort, free) and it
    # reads it for every running sequence each step, where a lookup by request id costs more.
    num_allocated_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens not recomputed at first admission; -1 before it
    prompt: Prompt | None = None  # the tokens' keys: hashed once, extended on preemption
    finish_reason: str | None = None  # "length", "eos", "stop", "abort", "error"
    error: BaseException | None = None
    num_preemptions: int = 0
    keep_logits: bool = False
    logits: list[torch.Tensor] = field(default_factory=list)
    outbox: deque[Any] = field(default_factory=deque)  # GenerationStep records not yet consumed
    token_times_s: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # admission and prefill costs

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]

    def tokens_between(self, start: int, stop: int | None = None) -> list[int]:
        """The tokens at positions ``start:stop`` of the sequence (prompt first), as a new list."""
        return self.tokens[start:stop]

    @property
    def is_finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.ABORTED)

    def check_stop(self, token: int, eos_ids: tuple[int, ...]) -> str | None:
        """Why generation ends after ``token`` (already appended), or None."""
        if not self.params.ignore_eos and token in eos_ids:
            return "eos"
        outputs = self.num_tokens - self.num_prompt_tokens
        for stop in self.params.stop:
            if outputs >= len(stop) and tuple(self.tokens[-len(stop) :]) == stop:
                return "stop"
        if outputs >= self.params.max_tokens:
            return "length"
        return None
