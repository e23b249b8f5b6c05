"""The router's side of vLLM's KV event stream: one engine's batches, in order, into the
router's index (``router.index.PreciseIndex``), each key as ``events.index_key`` keys it.

``EventSubscriber`` applies batches in sequence, asks the replay socket for a gap, and whenever
the engine's view is unknown (a gap the replay cannot fill, a batch over its bounds, a sequence
that restarts or jumps absurdly) clears that engine's entries, as on ``AllBlocksCleared``: the
index then under-reports until new events arrive, never over-reports. It can receive on its own
thread and leave the applying to its owner in bounded slices, so a publisher's volume never
stalls a router's requests.

Not here: the index and its per-engine bound (``router.index``: the router's one index, which
this fills), the wire schema and the publisher (``vllm.events``), keys (``vllm.keys``), CURVE
(``curve``), routing (``router``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator

import zmq

from kvcache.errors import ConfigError
from kvcache.router.index import IndexChange, PreciseIndex
from kvcache.router.policies import WorkerId
from kvcache.vllm.curve import CurveClient, is_loopback
from kvcache.vllm.events import (
    DEFAULT_TOPIC,
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventStreamError,
    KVEventBatch,
    decode_batch,
    index_key,
)

log = logging.getLogger(__name__)

# One engine step stores at most max_num_batched_tokens / block_size blocks and evicts as many;
# these bounds leave room for the largest steps vLLM runs and keep one batch's cost small.
DEFAULT_MAX_BATCH_HASHES = 16_384
DEFAULT_MAX_BATCH_BYTES = 4 * 2**20
DEFAULT_MAX_GAP_BATCHES = 10_000  # vLLM's replay buffer (``buffer_steps``): a longer gap cannot be filled
RESET = None  # in a subscriber's queue: forget the engine's blocks (its view restarts)


def num_hashes(batch: KVEventBatch) -> int:
    """Block keys a batch names (what applying it costs)."""
    return sum(len(e.block_hashes) for e in batch.events if not isinstance(e, AllBlocksCleared))


def apply_batch(index: PreciseIndex, engine: WorkerId, batch: KVEventBatch) -> IndexChange:
    """One batch into ``index`` as worker ``engine``, each key as ``index_key`` keys it, then the
    engine's bound; what the engine gained and lost there. The batch has no ``AllBlocksCleared``:
    a subscriber splits those out as resets, to apply them in slices."""
    return index.apply_keys(engine, _runs(batch))


def _runs(batch: KVEventBatch) -> Iterator[tuple[bool, Iterable[bytes]]]:
    for event in batch.events:
        if isinstance(event, AllBlocksCleared):
            raise EventStreamError("AllBlocksCleared is applied as a reset of the engine, not in a batch")
        yield isinstance(event, BlockStored), map(index_key, event.block_hashes)


class EventSubscriber:
    """The router's side for one engine: receive its batches in order, fill gaps by replay, apply
    them to the index as worker ``engine`` (the id the router knows the engine by).

    Receiving (socket reads, sequence checks, decoding, replay requests) and applying (to the
    index) are apart, so a router can receive on a thread of its own (``start``) and
    apply on its event loop in bounded slices (``drain``); ``poll`` does both on the caller's
    thread. Every bound is a count of what one message or one call may cost: a payload over
    ``max_batch_bytes`` or a batch over ``max_batch_hashes`` keys is dropped (``num_oversize``),
    at most ``max_pending_batches`` wait for the applier (past that, batches are lost,
    ``num_overflow``, so the index is never more than that far behind the stream), and a replay
    gets ``replay_timeout_ms`` in all.

    A batch that cannot be applied (dropped, undecodable, lost for good) leaves the engine's view
    unknown, so the engine is cleared (``RESET``) and rebuilt from the events that follow: the
    index under-reports, never over-reports. A sequence number below the next one expected, or
    more than ``max_gap_batches`` past it, means the engine restarted (vLLM numbers from 0 again)
    or the stream is not the one we followed: it is a reset too (``num_resets``), and the batch
    then starts the new sequence.
    """

    def __init__(
        self,
        engine: WorkerId,
        index: PreciseIndex,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = DEFAULT_TOPIC,
        replay_timeout_ms: int = 500,
        *,
        curve: CurveClient | None = None,
        max_batch_hashes: int = DEFAULT_MAX_BATCH_HASHES,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_gap_batches: int = DEFAULT_MAX_GAP_BATCHES,
        max_pending_batches: int = 64,
    ) -> None:
        bounds = {
            "max_batch_hashes": max_batch_hashes,
            "max_batch_bytes": max_batch_bytes,
            "max_gap_batches": max_gap_batches,
            "max_pending_batches": max_pending_batches,
            "replay_timeout_ms": replay_timeout_ms,
        }
        for name, value in bounds.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name, url in (("events", endpoint), ("replay", replay_endpoint)):
            if url and curve is None and not is_loopback(url):
                log.warning(
                    "engine %s: %s endpoint %s leaves this host without CURVE: anyone on the "
                    "path reads and can forge its KV events",
                    engine,
                    name,
                    url,
                )
        self.engine = engine
        self.index = index
        self.curve = curve
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sub = self.ctx.socket(zmq.SUB)
        if curve is not None:
            curve.secure(self.sub)
        self.sub.connect(endpoint)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.replay_endpoint = replay_endpoint
        self.replay_timeout_ms = replay_timeout_ms
        self.max_batch_hashes = max_batch_hashes
        self.max_batch_bytes = max_batch_bytes
        self.max_gap_batches = max_gap_batches
        self.next_seq: int | None = None
        self.num_gaps = self.num_resyncs = self.num_bad = self.num_oversize = self.num_resets = 0
        self.num_overflow = 0  # batches lost because the applier was behind
        self.lost = False  # a batch was lost since the last reset queued: the next one resets first
        self.pending: queue.Queue[KVEventBatch | None] = queue.Queue(max_pending_batches)
        self._clearing = False  # ``drain`` is part-way through a reset
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    # ---- receiving (the caller of ``poll``, or the thread of ``start``) --------------------

    def start(self) -> None:
        """Receive on a thread of this subscriber's own; the owner applies with ``drain``."""
        assert self.thread is None, "already started"
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"kv-events-{self.engine}")
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.sub.poll(50):
                self._receive(self.sub.recv_multipart())
            self._flush()

    def _room(self) -> int:
        return self.pending.maxsize - self.pending.qsize()

    def _flush(self) -> None:
        """Queue the reset a lost batch owes, once there is room."""
        if self.lost and self._room() >= 1:
            self.pending.put_nowait(RESET)
            self.lost = False

    def _push(self, op: KVEventBatch | None) -> None:
        """Hand one batch (or ``RESET``) to the applier: at once without a thread, else through
        the bounded queue. A batch that finds the queue full is lost (the applier is behind):
        the engine is reset before the next batch that fits."""
        if self.thread is None:
            self._apply_op(op)
        elif op is RESET:
            self.lost = True
        elif self._room() < 1 + self.lost:
            self.lost = True
            self.num_overflow += 1
        else:
            self._flush()
            self.pending.put_nowait(op)

    def _offer(self, payload: bytes) -> None:
        if self.thread is not None and self._room() < 1 + self.lost:
            self.lost = True  # behind: not worth decoding
            self.num_overflow += 1
            return
        for op in self._checked(payload):
            self._push(op)

    def _receive(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.num_bad += 1
            return
        seq = int.from_bytes(frames[1], "big")
        if self.next_seq is not None:
            if seq < self.next_seq or seq - self.next_seq > self.max_gap_batches:
                self.num_resets += 1  # a restarted engine, or not the sequence we followed
                self._push(RESET)
            elif seq > self.next_seq:
                self.num_gaps += 1
                self._fill(self.next_seq, seq)
        self.next_seq = seq + 1
        self._offer(frames[2])

    def _checked(self, payload: bytes) -> list[KVEventBatch | None]:
        """What applying the payload takes: its batch, split at each ``AllBlocksCleared`` into a
        ``RESET`` (so a clear is applied in slices too); only ``RESET`` when the payload is too
        large or off the schema."""
        if len(payload) > self.max_batch_bytes:
            self.num_oversize += 1
            return [RESET]
        try:
            batch = decode_batch(payload)
        except EventStreamError:
            self.num_bad += 1
            return [RESET]
        if num_hashes(batch) > self.max_batch_hashes:
            self.num_oversize += 1
            return [RESET]
        ops: list[KVEventBatch | None] = []
        run: list[BlockStored | BlockRemoved | AllBlocksCleared] = []
        for event in batch.events:
            if isinstance(event, AllBlocksCleared):
                if run:
                    ops.append(KVEventBatch(batch.ts, run, batch.data_parallel_rank))
                    run = []
                ops.append(RESET)
            else:
                run.append(event)
        if run or not ops:
            ops.append(KVEventBatch(batch.ts, run, batch.data_parallel_rank))
        return ops

    def _fill(self, first: int, upto: int) -> None:
        """Replay ``[first, upto)`` within ``replay_timeout_ms``; without it, reset this engine."""
        got: dict[int, bytes] = {}
        if self.replay_endpoint:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                self.curve.secure(sock)
            sock.connect(self.replay_endpoint)
            deadline = time.monotonic() + self.replay_timeout_ms / 1000
            # the request waits for the connection, within the same deadline
            asked = sock.poll(self.replay_timeout_ms, zmq.POLLOUT) != 0
            if asked:
                sock.send_multipart([b"", first.to_bytes(8, "big")], flags=zmq.NOBLOCK)
            while asked and len(got) < upto - first and not self.stop.is_set():
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0 or not sock.poll(left_ms):
                    break
                frames = sock.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8 or frames[1] == END_SEQ:
                    break
                seq = int.from_bytes(frames[1], "big")
                if first <= seq < upto:
                    got[seq] = frames[2]
            sock.close()
        if len(got) < upto - first:
            self.num_resyncs += 1
            self._push(RESET)
            return
        for s in range(first, upto):
            self._offer(got[s])

    # ---- applying (the index's owner) ------------------------------------------------------

    def _apply_op(self, op: KVEventBatch | None) -> int:
        """Apply one batch (then the engine's bound), or clear the engine for ``RESET``; returns
        the keys it touched."""
        if op is RESET:
            return len(self.index.clear(self.engine))
        apply_batch(self.index, self.engine, op)
        return num_hashes(op)

    def drain(self, max_hashes: int = DEFAULT_MAX_BATCH_HASHES) -> int:
        """Apply received batches until about ``max_hashes`` keys were touched (at least one
        batch when any waits; a reset is done in slices of at most ``max_hashes`` keys, the
        batches after it wait for its end); returns how many batches and resets were applied."""
        applied = touched = 0
        while touched < max_hashes:
            if self._clearing:
                touched += len(self.index.forget(self.engine, max_hashes - touched))
                if not self.index.num_keys(self.engine):
                    self._clearing = False
                    applied += 1
                continue
            try:
                op = self.pending.get_nowait()
            except queue.Empty:
                break
            if op is RESET:
                self._clearing = True
                continue
            touched += max(1, self._apply_op(op))
            applied += 1
        return applied

    def poll(self, timeout_ms: int = 0, max_messages: int = 1000) -> int:
        """Receive and apply on this thread: every message waiting, up to ``max_messages``
        (waiting up to ``timeout_ms`` for the first); returns how many arrived. Not once
        ``start``ed: the thread owns the socket then."""
        assert self.thread is None, "a started subscriber is drained, not polled"
        received = 0
        while received < max_messages and self.sub.poll(timeout_ms if received == 0 else 0):
            self._receive(self.sub.recv_multipart())
            received += 1
        return received

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        self.sub.close(linger=0)
