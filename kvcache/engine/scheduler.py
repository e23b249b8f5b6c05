"""The scheduler: which sequences run in the next step, and how many tokens each (policy).

FCFS over a waiting queue and a running list, with a per-step token budget
(``max_num_batched_tokens``) and a cap on running sequences (``max_num_seqs``):

1. running sequences first, oldest first: a decoding sequence gets one token (its last sampled
   token gets a slot through ``BlockManager.append``), a sequence still in prefill gets the next
   chunk of its prompt that fits the budget (chunked prefill: long prompts are spread over steps
   while the others keep decoding);
2. then waiting sequences in arrival order, while budget and seats last: admitted through the
   ``BlockManager`` (prefix hit first, then allocation of the rest; tenant scopes, k-anonymity
   and quotas are the manager's), plus blocks the engine loads from spill tiers (``load_prefix``).

When a decoding sequence needs a block and the pool has none, the newest running sequence is
preempted: its blocks are released through ``BlockManager.abort`` with its computed token count, so
blocks whose KV was written stay cached and indexed, and it goes back to the front of the waiting
queue to be recomputed (mostly from that cache). A request that cannot fit even alone, or meets
its tenant's quota, fails with the manager's typed error; nothing else is ever dropped.

A block is a hit only once its KV is written: a waiting sequence whose prefix hit includes a block
that a running sequence will not have written by the end of this step waits (in the same step is
fine: every layer writes the step's KV before it attends).

Decisions come back as a :class:`SchedulerOutput`, so tests assert them without a model; once the
step ran, ``complete`` moves every scheduled sequence's computed mark forward and names those that
sample a token. ``step_shape`` is what a step computes (prefill tokens, decoding sequences,
attention work): the runner records it and ``LatencyModel.step_ms`` prices it. A driver without a
model (the replay's ``SimWorker``) runs this same scheduler with placeholder output tokens; a
prompt hashed from block ids grows through ``BlockManager.append_unkeyed``, and a run of identical
decode steps (``is_steady``, ``decode_slack``) goes by at once through ``skip_decode_steps``.

Not here: running the model, sampling, streaming (``engine``); a step's time (``costs``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from kvcache.cache.config import CacheConfig
from kvcache.cache.hashing import KIND_BLOCK_IDS
from kvcache.cache.manager import Allocation, BlockManager, Prompt
from kvcache.costs import ENGINE_MAX_NUM_BATCHED_TOKENS, ENGINE_MAX_NUM_SEQS
from kvcache.engine.sequence import Sequence, Status
from kvcache.errors import CapacityError, ConfigError, QuotaError


def tiers_gated(config: CacheConfig, prompt: Prompt) -> bool:
    """Whether ``prompt`` must not use the spill tiers: a share group under k-anonymity (a tier
    cannot tell how many tenants wrote a block, so a load could reveal what one tenant sent)."""
    return config.k_anonymity > 1 and prompt.scope.is_shared


def loadable_blocks(prompt: Prompt, num_cached_tokens: int, block_size: int) -> range:
    """The prompt's blocks a load from the spill tiers may bring at admission, after a hit of
    ``num_cached_tokens``: full blocks, short of the one holding the last token (computed, for
    its logits). Here, beside the admission rules, so the simulated workers (which import no
    torch) load by the engine's rule (``prefix_load`` runs the load itself)."""
    last = min(len(prompt.keys), (prompt.num_tokens - 1) // block_size)
    return range(num_cached_tokens // block_size, last)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = ENGINE_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = ENGINE_MAX_NUM_SEQS

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")


@dataclass(slots=True)
class Scheduled:
    seq: Sequence
    num_new_tokens: int


@dataclass(slots=True)
class StepShape:
    """What one step computes. ``attention_work`` = sum over its prefill chunks of
    ``n x (context before + n / 2)``; ``num_context_tokens`` sums every scheduled sequence's context
    after the step."""

    num_prefill_tokens: int
    num_decode_seqs: int
    num_context_tokens: int
    attention_work: float


def is_decode(seq: Sequence, num_new_tokens: int) -> bool:
    """One token after the prompt: a decode (a recomputed preempted sequence is a prefill)."""
    return num_new_tokens == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens


def step_shape(scheduled: list[Scheduled]) -> StepShape:
    """The shape of a step, read before ``Scheduler.complete`` moves the computed marks."""
    prefill = decode = context = 0
    work = 0.0
    for s in scheduled:
        start, n = s.seq.num_computed_tokens, s.num_new_tokens
        context += start + n
        if is_decode(s.seq, n):
            decode += 1
        else:
            prefill += n
            work += n * (start + n / 2)
    return StepShape(prefill, decode, context, work)


@dataclass(slots=True)
class SchedulerOutput:
    """One step's decisions. ``scheduled`` is in running order (oldest first)."""

    scheduled: list[Scheduled] = field(default_factory=list)
    admitted: list[Hashable] = field(default_factory=list)
    preempted: list[Hashable] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # finished with an error this step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def plan(self) -> list[tuple[Hashable, int]]:
        return [(s.seq.request_id, s.num_new_tokens) for s in self.scheduled]


class Scheduler:
    def __init__(
        self,
        manager: BlockManager,
        config: SchedulerConfig,
        load_prefix: Callable[[Sequence, Allocation], int] | None = None,
    ) -> None:
        self.manager = manager
        self.config = config
        self.block_size = manager.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._load_prefix = load_prefix
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- releasing ---------------------------------------------------------------------------

    def finish(self, seq: Sequence, reason: str) -> None:
        """A running sequence is done: every token it holds blocks for has its KV written."""
        self.running.remove(seq)
        self.manager.free(seq.request_id)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def fail(self, seq: Sequence, error: BaseException) -> None:
        """End a waiting or running sequence with ``error``; its written blocks stay cached."""
        self._release(seq)
        seq.status, seq.finish_reason, seq.error = Status.FINISHED, "error", error

    def abort(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status, seq.finish_reason = Status.ABORTED, "abort"

    def _release(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.manager.abort(seq.request_id, min(seq.num_computed_tokens, seq.num_allocated_tokens))
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.num_allocated_tokens = 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self._release(seq)
        seq.status, seq.num_computed_tokens = Status.WAITING, 0
        prompt = seq.prompt
        if prompt is not None:  # keep its keys: only the blocks its outputs filled are new
            if prompt.kind == KIND_BLOCK_IDS:
                seq.prompt = self.manager.extend_unkeyed(prompt, seq.num_tokens - prompt.num_tokens)
            else:
                seq.prompt = self.manager.extend(prompt, seq.tokens_between(prompt.num_tokens))
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq.request_id)

    # ---- the step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled = out.scheduled
        budget = self.config.max_num_batched_tokens
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            num_tokens = seq.num_tokens
            if seq.num_allocated_tokens < num_tokens and not self._grow(seq, num_tokens, out):
                continue  # it left the running list (preempted or failed)
            computed = seq.num_computed_tokens
            n = num_tokens - computed
            if n > budget:
                n = budget
            scheduled.append(Scheduled(seq, n))
            budget -= n
            i += 1
        max_seqs = self.config.max_num_seqs
        waiting = self.waiting
        while waiting and budget > 0 and len(running) < max_seqs and not out.preempted:
            seq = waiting[0]
            admitted = self._admit(seq, out)
            if admitted is None:
                continue  # it failed; look at the next one
            if not admitted:
                break  # FCFS: nobody overtakes the head of the queue
            waiting.popleft()
            running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            scheduled.append(Scheduled(seq, n))
            budget -= n
        return out

    def complete(self, out: SchedulerOutput) -> list[Sequence]:
        """The step ran: the KV of every scheduled token is written. Returns the sequences that
        sample a token now (all their tokens computed), in scheduled order."""
        sampling = []
        for s in out.scheduled:
            seq = s.seq
            computed = seq.num_computed_tokens + s.num_new_tokens
            seq.num_computed_tokens = computed
            if computed == seq.num_tokens:
                sampling.append(seq)
        return sampling

    # ---- runs of identical decode steps (a driver without a model) ---------------------------

    def is_steady(self, out: SchedulerOutput) -> bool:
        """Whether the steps after ``out`` schedule what it did until a sequence finishes, a request
        arrives or a sequence needs a new block (``decode_slack``): every running sequence decodes,
        nothing was admitted, preempted or failed, so the head of the queue (if any) meets the same
        budget, seats and pool next step."""
        if out.admitted or out.preempted or out.failed or len(out.scheduled) != len(self.running):
            return False
        return all(is_decode(s.seq, s.num_new_tokens) for s in out.scheduled)

    def decode_slack(self) -> int:
        """Tokens every running sequence can still grow by without a new block."""
        bs = self.block_size
        # the free slots of a sequence's last block: ceil(a / bs) * bs - a == -a mod bs
        return min([-s.num_allocated_tokens % bs for s in self.running], default=0)

    def skip_decode_steps(self, num_steps: int, token: int) -> None:
        """``num_steps`` steady decode steps at once, after ``complete`` of the one that made them
        steady and the append of its sampled tokens: each running sequence's pending token gets
        its slot and is computed, and ``token`` (a placeholder) is sampled, every step. Only a
        driver whose sampled tokens do not matter (a simulation) may skip steps; the caller keeps
        ``num_steps <= decode_slack()`` and stops at the first step a sequence finishes."""
        assert num_steps >= 0
        if not num_steps:
            return
        filler = [token] * num_steps
        bs = self.block_size
        for seq in self.running:
            allocated = seq.num_allocated_tokens
            # within decode_slack(): no sequence needs a new block
            assert seq.num_computed_tokens == allocated == seq.num_tokens - 1 and -allocated % bs >= num_steps
            seq.tokens += filler
            self._append(seq, allocated, allocated + num_steps)
            seq.num_allocated_tokens = seq.num_computed_tokens = allocated + num_steps

    def _append(self, seq: Sequence, start: int, stop: int) -> None:
        """Give the tokens at ``start:stop`` slots (the manager holds ``start`` of them)."""
        prompt = seq.prompt
        if prompt is not None and prompt.kind == KIND_BLOCK_IDS:
            self.manager.append_unkeyed(seq.request_id, stop - start)  # no content to key
        else:
            self.manager.append(seq.request_id, seq.tokens_between(start, stop))

    def _grow(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Give a decoding sequence's last sampled token a slot (``num_tokens``: its length);
        preempt the newest on a full pool."""
        while True:
            try:
                self._append(seq, seq.num_allocated_tokens, num_tokens)
                seq.num_allocated_tokens = num_tokens
                return True
            except QuotaError as exc:
                self.fail(seq, exc)
                out.failed.append(seq)
                return False
            except CapacityError as exc:
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    self.fail(seq, exc)  # alone and still no room: it can never finish
                    out.failed.append(seq)
                    return False
                self._preempt(victim, out)
                if victim is seq:
                    return False

    def _admit(self, seq: Sequence, out: SchedulerOutput) -> bool | None:
        """True: admitted. False: must wait. None: failed (removed from the queue)."""
        manager, bs = self.manager, self.block_size
        if seq.prompt is None:  # a sequence queued without keys (the engine hashes at ``add``)
            seq.prompt = manager.hash(seq.tokens_between(0), seq.scope)
        if self.running and manager.still_refused(seq.request_id, seq.prompt):
            return False  # refused room at an earlier step, and nothing since could make room
        start = time.perf_counter()
        try:
            # matched once: a prefix block another sequence has not written by the end of this
            # step is not read; the sequence waits for it instead, as it waits for room while
            # others run (their blocks come back as they finish)
            running = bool(self.running)
            alloc = manager.admit(seq.request_id, seq.prompt, unwritten=self._pending(out), wait=running)
        except CapacityError as exc:
            too_big = -(-seq.num_tokens // bs) > manager.pool.num_blocks
            if not too_big and self.running:
                return False  # blocks come back as running sequences finish
            self.waiting.popleft()
            seq.status, seq.finish_reason, seq.error = Status.FINISHED, "error", exc
            out.failed.append(seq)
            return None
        if alloc is None:
            return False
        seq.timings.setdefault("lookup_s", time.perf_counter() - start)
        loaded = 0
        if self._load_prefix is not None:
            try:
                loaded = self._load_prefix(seq, alloc)
            except Exception as exc:  # the load wrote nothing usable: keep only the pool's hit
                manager.abort(seq.request_id, alloc.num_cached_tokens)
                self.waiting.popleft()
                seq.status, seq.finish_reason, seq.error = Status.FINISHED, "error", exc
                out.failed.append(seq)
                return None
        seq.status = Status.RUNNING
        seq.num_allocated_tokens = seq.num_tokens
        seq.num_computed_tokens = alloc.num_cached_tokens + loaded
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = seq.num_computed_tokens
        out.admitted.append(seq.request_id)
        return True

    def _pending(self, out: SchedulerOutput) -> set[bytes]:
        """Keys of prompt blocks whose KV will not be written by the end of this step (``out``)."""
        bs = self.block_size
        pending: set[bytes] = set()
        ends: dict[int, int] | None = None
        for seq in self.running:
            prompt = seq.prompt
            if prompt is None or seq.num_computed_tokens >= len(prompt.keys) * bs:
                continue  # every keyed block of it is written (a decoding sequence)
            if ends is None:
                ends = {id(s.seq): s.seq.num_computed_tokens + s.num_new_tokens for s in out.scheduled}
            end = ends.get(id(seq), seq.num_computed_tokens)
            pending.update(prompt.keys[end // bs :])
        return pending
