"""vLLM's KV event stream: the wire schema, a publisher over ZMQ, and vLLM keys as the router indexes them.

vLLM (``vllm/distributed/kv_events.py``, ``--kv-events-config``) publishes msgpack-encoded
``KVEventBatch(ts, events, data_parallel_rank)`` on a ZMQ PUB socket as three frames
``[topic, seq (8 bytes, big-endian), payload]``; events are tagged arrays
``BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
lora_name)``, ``BlockRemoved(block_hashes, medium)`` and ``AllBlocksCleared()``. A ROUTER
replay socket answers ``[start_seq (8 bytes)]`` with every buffered ``[seq, payload]`` from
that sequence on, then ``[-1 (8 bytes, signed), b""]``. Fields a later vLLM appends are
ignored on decode; fields an earlier one lacks default to None.

``EventPublisher`` speaks this protocol (loopback only, unless secured with CURVE: ``curve``),
and ``EngineEventBridge`` feeds it a kvcache engine's block events re-keyed as vLLM keys
(``vllm.keys``), so a kvcache worker looks like a vLLM engine. ``index_key`` is a vLLM key as the
router's index holds it.

Not here: what each engine holds, which is the router's one index (``router.index.PreciseIndex``,
bounded per engine; ``vllm.subscriber`` applies a stream to it); routing (``router``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import zmq

from kvcache.cache.events import BlockStored as KVStored
from kvcache.cache.events import CacheEvent
from kvcache.cache.manager import BlockManager
from kvcache.cache.tenancy import PUBLIC_SCOPE, Scope
from kvcache.errors import ConfigError, KVCacheError
from kvcache.vllm.curve import CurveServer, is_loopback
from kvcache.vllm.keys import VllmKeyer, external_key

END_SEQ = (-1).to_bytes(8, "big", signed=True)
DEFAULT_TOPIC = "kv-events"


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


def decode_batch(payload: bytes) -> KVEventBatch:
    """One payload as a batch; a payload off the schema raises ``EventStreamError``."""
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EventStreamError(
            f"KV event payload of {len(payload)} bytes is not a KVEventBatch: {exc}"
        ) from exc


def index_key(key: int | bytes) -> bytes:
    """A vLLM block key (digest bytes or a 64-bit int, as events and ``VllmKeyer.keys`` give it)
    as the router's index keys it: the 64-bit int as 8 big-endian bytes, converted once, as a
    key enters the index or a request is keyed."""
    return external_key(key).to_bytes(8, "big")


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


class EngineEventBridge:
    """Lets a kvcache engine speak vLLM's stream: its block events become vLLM events keyed as
    vLLM would key the same tokens.

    For each request the worker passes the prompt's token ids, its scope and the engine events
    the request produced. The i-th full block of the prompt has kvcache key ``k_i`` (the
    engine's manager, the request's scope) and vLLM key ``v_i`` (``keyer``, with
    ``salt_of(scope.chain_scope)`` as ``cache_salt``); a stored ``k_i`` is published as a stored
    ``v_i`` and remembered, so its later removal is published under the same key. Blocks of
    generated tokens are not published (a router keys prompts only).

    The blocks the manager keys in the public scope (a published prefix, ``Prompt.num_public_blocks``)
    are the keyer's public head (``keyer.public_salt``): the same vLLM keys whichever tenant's
    request stored them, while what follows them is keyed in the tenant's scope, as ``kvcache
    route`` keys requests (``vllm.public``).

    ``salt_of`` is the deployment's keyed pseudonym (``serve.auth.DeploymentKeys.pseudonym``):
    no tenant name reaches the wire, and without the deployment secret nobody can compute the
    key of a guessed prompt to test it against the stream. ``BlockStored.token_ids`` are sent
    empty (routers match keys, not tokens) unless ``token_ids`` is set.
    """

    def __init__(
        self,
        publisher: EventPublisher,
        keyer: VllmKeyer,
        manager: BlockManager,
        salt_of: Callable[[str], str],
        *,
        token_ids: bool = False,
    ) -> None:
        if keyer.public_salt != salt_of(PUBLIC_SCOPE):
            # Checked here, not when a prefix is published: the bridge runs on the engine thread.
            raise ConfigError(
                f"the keyer's public_salt={keyer.public_salt!r} is not this deployment's public scope "
                "salt; give the keyer vllm.public.public_salt(keys), the salt the engine's public "
                "blocks are published under"
            )
        self.publisher = publisher
        self.keyer = keyer
        self.manager = manager
        self.salt_of = salt_of
        self.token_ids = token_ids
        self.vllm_of: dict[bytes, int] = {}  # kvcache key -> vLLM key, for blocks the engine holds

    def publish_engine_events(self, token_ids: list[int], scope: Scope, events: Iterable[CacheEvent]) -> None:
        """``scope``: the request's scope (its pseudonym becomes the salt)."""
        events = list(events)
        if not events:
            return
        salt = self.salt_of(scope.chain_scope)
        keyed = self.manager.hash(token_ids, scope)
        kv_keys = keyed.keys
        v_keys = self.keyer.keys(token_ids, cache_salt=salt, public_blocks=keyed.num_public_blocks)
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
