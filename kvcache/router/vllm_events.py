"""vLLM's KV event stream: the wire schema, a publisher and a subscriber over ZMQ.

vLLM (``vllm/distributed/kv_events.py``, ``--kv-events-config``) publishes msgpack-encoded
``KVEventBatch(ts, events, data_parallel_rank)`` on a ZMQ PUB socket as three frames
``[topic, seq (8 bytes, big-endian), payload]``; events are tagged arrays
``BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
lora_name)``, ``BlockRemoved(block_hashes, medium)`` and ``AllBlocksCleared()``. A ROUTER
replay socket answers ``[start_seq (8 bytes)]`` with every buffered ``[seq, payload]`` from
that sequence on, then ``[-1 (8 bytes, signed), b""]``. Fields a later vLLM appends are
ignored on decode; fields an earlier one lacks default to None.

``EventPublisher`` speaks this protocol, and ``EngineEventBridge`` feeds it a kvcache engine's
block events re-keyed as vLLM keys (``vllm_keys``), so a kvcache worker looks like a vLLM engine;
``EventSubscriber`` feeds a router index (``EngineIndex``): it applies batches in sequence,
asks the replay socket for a gap, and whenever the engine's view is unknown (a gap the replay
cannot fill, a batch over its bounds, a sequence that restarts or jumps absurdly) clears that
engine's entries, as on ``AllBlocksCleared``: the index then under-reports until new events
arrive, never over-reports. A subscriber can receive on its own thread and leave the applying
to its owner in bounded slices, so a publisher's volume never stalls a router's requests.
Routing is ``router``'s job.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import zmq

from kvcache.errors import ConfigError, KVCacheError
from kvcache.router.curve import CurveClient, CurveServer, is_loopback
from kvcache.router.vllm_keys import external_key

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
DEFAULT_TOPIC = "kv-events"
# One engine step stores at most max_num_batched_tokens / block_size blocks and evicts as many;
# these bounds leave room for the largest steps vLLM runs and keep one batch's cost small.
DEFAULT_MAX_BATCH_HASHES = 16_384
DEFAULT_MAX_BATCH_BYTES = 4 * 2**20
DEFAULT_MAX_GAP_BATCHES = 10_000  # vLLM's replay buffer (``buffer_steps``): a longer gap cannot be filled
RESET = None  # in a subscriber's queue: forget the engine's blocks (its view restarts)


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """A tagged event (the tag is the class name, as vLLM sends it)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


class EventStreamError(KVCacheError):
    """A KV event message that does not follow vLLM's schema."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def num_hashes(batch: KVEventBatch) -> int:
    """Block keys a batch names (what applying it costs)."""
    return sum(len(e.block_hashes) for e in batch.events if not isinstance(e, AllBlocksCleared))


def decode_batch(payload: bytes) -> KVEventBatch:
    """One payload as a batch; a payload off the schema raises ``EventStreamError``."""
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EventStreamError(
            f"KV event payload of {len(payload)} bytes is not a KVEventBatch: {exc}"
        ) from exc


class EngineIndex:
    """Which vLLM block keys each engine holds, at most ``capacity_blocks`` per engine.

    Keys are the 64-bit ints of ``vllm_keys.external_key``. An engine over its bound (events
    lost, or forged) forgets its least recently stored keys first, so the index never holds
    more than an engine's pool could.
    """

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ConfigError(f"capacity_blocks={capacity_blocks} must be >= 1 (the engines' KV blocks)")
        self.capacity_blocks = capacity_blocks
        self.keys_of: dict[str, OrderedDict[int, None]] = {}
        self.holders: dict[int, set[str]] = {}

    def _drop(self, engine: str, key: int) -> None:
        held = self.holders.get(key)
        if held is not None:
            held.discard(engine)
            if not held:
                del self.holders[key]

    def apply(self, engine: str, batch: KVEventBatch) -> tuple[list[int], list[int]]:
        """Apply one batch; returns the keys the engine gained and lost in this index."""
        keys = self.keys_of.setdefault(engine, OrderedDict())
        stored: list[int] = []
        removed: list[int] = []
        for event in batch.events:
            if isinstance(event, BlockStored):
                for raw in event.block_hashes:
                    key = external_key(raw)
                    if key not in keys:
                        stored.append(key)
                    keys[key] = None
                    keys.move_to_end(key)
                    self.holders.setdefault(key, set()).add(engine)
                while len(keys) > self.capacity_blocks:
                    old = keys.popitem(last=False)[0]
                    self._drop(engine, old)
                    removed.append(old)
            elif isinstance(event, BlockRemoved):
                for raw in event.block_hashes:
                    key = external_key(raw)
                    if key in keys:
                        del keys[key]
                        self._drop(engine, key)
                        removed.append(key)
            else:
                removed += self.clear(engine)
                keys = self.keys_of.setdefault(engine, OrderedDict())
        return stored, removed

    def clear(self, engine: str) -> list[int]:
        """Forget everything the engine holds; returns the keys forgotten."""
        gone = list(self.keys_of.pop(engine, OrderedDict()))
        for key in gone:
            self._drop(engine, key)
        return gone

    def forget(self, engine: str, max_keys: int) -> list[int]:
        """Forget up to ``max_keys`` of the engine's keys, least recently stored first (a clear
        in slices); returns the keys forgotten."""
        keys = self.keys_of.get(engine)
        gone: list[int] = []
        while keys and len(gone) < max_keys:
            key = keys.popitem(last=False)[0]
            self._drop(engine, key)
            gone.append(key)
        return gone

    def overlap(self, engine: str, keys: Iterable[int]) -> int:
        """Leading ``keys`` the engine holds."""
        mine: dict[int, None] = self.keys_of.get(engine, {})
        n = 0
        for key in keys:
            if key not in mine:
                break
            n += 1
        return n

    def num_keys(self, engine: str) -> int:
        return len(self.keys_of.get(engine, ()))


class EventPublisher:
    """A worker's side: PUB batches with sequence numbers, serve replays from a bounded buffer.

    Endpoints that leave this host need ``curve`` (a ``CurveServer``): the stream and the replay
    history are then encrypted and only the subscribers whose keys the server lists connect.
    Without it such a bind is refused: block keys and event timing of every tenant would be
    readable by anyone who reaches the port.
    """

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = DEFAULT_TOPIC,
        buffer_steps: int = 10_000,
        *,
        curve: CurveServer | None = None,
    ) -> None:
        for url in (endpoint, replay_endpoint):
            if url and curve is None and not is_loopback(url):
                raise ConfigError(
                    f"KV events endpoint {url} is reachable from other hosts, and without CURVE anyone "
                    "there reads every tenant's block keys: bind tcp://127.0.0.1:PORT, or give the "
                    "publisher CURVE keys (a server certificate and the subscribers' public keys)"
                )
        # A context of its own: ZAP (the CURVE client check) is per context.
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.auth = curve.authenticator(self.ctx) if curve is not None else None
        self.pub = self.ctx.socket(zmq.PUB)
        if curve is not None:
            curve.secure(self.pub)
        self.pub.bind(endpoint)
        self.replay = None
        if replay_endpoint:
            self.replay = self.ctx.socket(zmq.ROUTER)
            if curve is not None:
                curve.secure(self.replay)
            self.replay.bind(replay_endpoint)
        self.topic = topic.encode()
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.seq = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if self.replay is not None:
            self.thread = threading.Thread(target=self._serve_replay, daemon=True, name="kv-events-replay")
            self.thread.start()

    def publish(
        self, events: list[BlockStored | BlockRemoved | AllBlocksCleared], *, send: bool = True
    ) -> int:
        """Number, buffer and (unless ``send`` is False: a test's lost message) send one batch."""
        payload = encode_batch(KVEventBatch(ts=time.time(), events=events))
        with self.lock:
            seq = self.seq
            self.seq += 1
            self.buffer.append((seq, payload))
            if send:
                self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def _serve_replay(self) -> None:
        assert self.replay is not None
        poller = zmq.Poller()
        poller.register(self.replay, zmq.POLLIN)
        while not self.stop.is_set():
            if not poller.poll(50):
                continue
            frames = self.replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                continue  # not a replay request
            client, _, start = frames
            first = int.from_bytes(start, "big")
            with self.lock:
                wanted = [(s, p) for s, p in self.buffer if s >= first]
            for seq, payload in wanted:
                self.replay.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
            self.replay.send_multipart([client, b"", END_SEQ, b""])

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        self.pub.close(linger=0)
        if self.replay is not None:
            self.replay.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()  # the ports are free once close returns (an engine restarting binds them again)


class EventSubscriber:
    """The router's side for one engine: receive its batches in order, fill gaps by replay, apply
    them to the index.

    Receiving (socket reads, sequence checks, decoding, replay requests) and applying (the index
    and ``on_change``) are apart, so a router can receive on a thread of its own (``start``) and
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
        engine: str,
        index: EngineIndex,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = DEFAULT_TOPIC,
        replay_timeout_ms: int = 500,
        on_change: Callable[[str, list[int], list[int]], None] | None = None,
        *,
        curve: CurveClient | None = None,
        max_batch_hashes: int = DEFAULT_MAX_BATCH_HASHES,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_gap_batches: int = DEFAULT_MAX_GAP_BATCHES,
        max_pending_batches: int = 64,
    ) -> None:
        bounds = {"max_batch_hashes": max_batch_hashes, "max_batch_bytes": max_batch_bytes,
                  "max_gap_batches": max_gap_batches, "max_pending_batches": max_pending_batches,
                  "replay_timeout_ms": replay_timeout_ms}  # fmt: skip
        for name, value in bounds.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name, url in (("events", endpoint), ("replay", replay_endpoint)):
            if url and curve is None and not is_loopback(url):
                log.warning("engine %s: %s endpoint %s leaves this host without CURVE: anyone on the "
                            "path reads and can forge its KV events", engine, name, url)  # fmt: skip
        self.engine = engine
        self.index = index
        self.on_change = on_change  # (engine, keys gained, keys lost), after each change
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
        self._push(self._checked(payload))

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

    def _checked(self, payload: bytes) -> KVEventBatch | None:
        """The payload's batch, or ``RESET`` when it is too large or off the schema."""
        if len(payload) > self.max_batch_bytes:
            self.num_oversize += 1
            return RESET
        try:
            batch = decode_batch(payload)
        except EventStreamError:
            self.num_bad += 1
            return RESET
        if num_hashes(batch) > self.max_batch_hashes:
            self.num_oversize += 1
            return RESET
        return batch

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
        """Apply one batch, or clear the engine for ``RESET``; returns the keys it touched."""
        if op is RESET:
            removed = self.index.clear(self.engine)
            if self.on_change is not None and removed:
                self.on_change(self.engine, [], removed)
            return len(removed)
        stored, removed = self.index.apply(self.engine, op)
        if self.on_change is not None and (stored or removed):
            self.on_change(self.engine, stored, removed)
        return num_hashes(op)

    def drain(self, max_hashes: int = DEFAULT_MAX_BATCH_HASHES) -> int:
        """Apply received batches until about ``max_hashes`` keys were touched (at least one
        batch when any waits; a reset is done in slices of at most ``max_hashes`` keys, the
        batches after it wait for its end); returns how many batches and resets were applied."""
        applied = touched = 0
        while touched < max_hashes:
            if self._clearing:
                removed = self.index.forget(self.engine, max_hashes - touched)
                if self.on_change is not None and removed:
                    self.on_change(self.engine, [], removed)
                touched += len(removed)
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


class EngineEventBridge:
    """Lets a kvcache engine speak vLLM's stream: its block events become vLLM events keyed as
    vLLM would key the same tokens.

    For each request the worker passes the prompt's token ids, its scope and the engine events
    the request produced. The i-th full block of the prompt has kvcache key ``k_i`` (the
    engine's manager, the request's scope) and vLLM key ``v_i`` (``keyer``, with
    ``salt_of(scope.chain_scope)`` as ``cache_salt``); a stored ``k_i`` is published as a stored
    ``v_i`` and remembered, so its later removal is published too. Blocks of generated tokens
    are not published (a router keys prompts only).

    ``salt_of`` is the deployment's keyed pseudonym (``serve.auth.DeploymentKeys.pseudonym``):
    no tenant name reaches the wire, and without the deployment secret nobody can compute the
    key of a guessed prompt to test it against the stream. ``BlockStored.token_ids`` are sent
    empty (routers match keys, not tokens) unless ``token_ids`` is set.
    """

    def __init__(
        self,
        publisher: EventPublisher,
        keyer: Any,
        manager: Any,
        salt_of: Callable[[str], str],
        *,
        token_ids: bool = False,
    ) -> None:
        self.publisher = publisher
        self.keyer = keyer
        self.manager = manager
        self.salt_of = salt_of
        self.token_ids = token_ids
        self.vllm_of: dict[bytes, int] = {}  # kvcache key -> vLLM key, for blocks the engine holds

    def publish_engine_events(self, token_ids: list[int], scope: Any, events: Iterable[Any]) -> None:
        """``scope``: the request's ``kvcache.tenancy.Scope`` (its pseudonym becomes the salt)."""
        from kvcache.events import BlockStored as KVStored

        events = list(events)
        if not events:
            return
        salt = self.salt_of(scope.chain_scope)
        kv_keys = self.manager.hash(token_ids, scope).keys
        v_keys = self.keyer.keys(token_ids, cache_salt=salt)
        prompt = {k: (i, v) for i, (k, v) in enumerate(zip(kv_keys, v_keys, strict=False))}
        first = len(v_keys)
        stored: list[int | bytes] = []
        removed: list[int | bytes] = []
        for event in events:
            if isinstance(event, KVStored):
                hit = prompt.get(event.key)
                if hit is not None:
                    self.vllm_of[event.key] = hit[1]
                    stored.append(hit[1])
                    first = min(first, hit[0])
            else:
                v = self.vllm_of.pop(event.key, None)
                if v is not None:
                    removed.append(v)
        out: list[BlockStored | BlockRemoved | AllBlocksCleared] = []
        if removed:
            out.append(BlockRemoved(removed, "GPU"))
        if stored:
            # the newly stored blocks run from ``first`` on (the blocks before were cached)
            bs = self.keyer.block_size
            parent = v_keys[first - 1] if first > 0 else None
            tokens = token_ids[first * bs : (first + len(stored)) * bs] if self.token_ids else []
            out.append(BlockStored(stored, parent, tokens, bs, None, "GPU"))
        if out:
            self.publisher.publish(out)
