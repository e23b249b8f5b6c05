"""Canonical bytes for cache events, and the Redis names workers and the front agree on.

A batch of ``BlockStored``/``BlockRemoved`` events (``kvcache.cache.events``, the records the simulator
uses) encodes as::

    b"KVEV" version:u8 count:u32  then per event:
      0x01 key[16] parent_key[16] block_id:u32 scope_len:u16 scope(utf-8)     BlockStored
      0x02 key[16]                block_id:u32 scope_len:u16 scope(utf-8)     BlockRemoved

little-endian throughout. Decoding checks every length and tag and raises ``ProtocolError``
naming the offset, so a corrupt or hostile stream entry can never be mistaken for events.
No pickle: the format is the same for every language and version of Python.

``POST /generate`` (front or ``kvcache route`` to a worker) is typed records, encoded and decoded
here only: ``GenerateRequest`` in (``encode_request`` / ``decode_request``, which refuses a body
that is not one with a ``ProtocolError`` naming the field), ``GenerateLine`` records out
(``encode_line`` / ``decode_line``).

Redis layout (one deployment per Redis database):
- ``kvcache:workers`` hash: worker id -> JSON registration (url, instance, pid, model, ...);
- ``kvcache:alive:<worker id>``: the worker's signed heartbeat (``auth.sign_heartbeat``), set with a TTL;
- ``kvcache:refused:<worker id>``: JSON ``{instance, reason}`` set by the front when it refuses a
  worker (another model or block size); the worker logs the reason and stops;
- ``kvcache:events`` stream: entries ``{worker, instance, events}``, ``events`` encoded as above;
- ``kvcache:public``: the public prefixes, signed by the front (``serve.public``);
- ``kvcache:public-ack:<worker id>``: the version of them a worker applied, signed, with a TTL.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import msgspec

from kvcache.cache.events import BlockRemoved, BlockStored, CacheEvent
from kvcache.cache.hashing import KEY_BYTES
from kvcache.errors import ProtocolError

MAGIC = b"KVEV"
VERSION = 1
WORKERS_KEY = "kvcache:workers"
EVENTS_STREAM = "kvcache:events"
EVENTS_MAXLEN = 200_000  # the stream is trimmed (approximately) past this many entries
HEARTBEAT_S = 1.0
ALIVE_TTL_S = 4
# Set by ``kvcache serve`` for the workers it starts: a worker whose parent is gone (killed, so it
# could not stop them) stops by itself instead of running on unsupervised.
PARENT_PID_ENV = "KVCACHE_PARENT_PID"
PARENT_CHECK_S = 1.0
SHUTDOWN_GRACE_S = 5.0  # on SIGTERM, what a request in flight gets to finish before it is cancelled


REFUSED_TTL_S = 60
PUBLIC_KEY = "kvcache:public"
PUBLIC_ACK_TTL_S = 10


def alive_key(worker_id: str) -> str:
    return f"kvcache:alive:{worker_id}"


def refused_key(worker_id: str) -> str:
    return f"kvcache:refused:{worker_id}"


def public_ack_key(worker_id: str) -> str:
    return f"kvcache:public-ack:{worker_id}"


_STORED, _REMOVED = 1, 2
_HEAD = struct.Struct("<4sBI")
_TAIL = struct.Struct("<IH")


def encode_events(events: list[CacheEvent]) -> bytes:
    out = [_HEAD.pack(MAGIC, VERSION, len(events))]
    for event in events:
        scope = event.scope.encode("utf-8")
        if isinstance(event, BlockStored):
            tail = _TAIL.pack(event.block_id, len(scope))
            out.append(bytes([_STORED]) + event.key + event.parent_key + tail)
        else:
            out.append(bytes([_REMOVED]) + event.key + _TAIL.pack(event.block_id, len(scope)))
        assert len(event.key) == KEY_BYTES
        out.append(scope)
    return b"".join(out)


def decode_events(data: bytes) -> list[CacheEvent]:
    if len(data) < _HEAD.size:
        raise ProtocolError(f"event batch is {len(data)} bytes, shorter than its {_HEAD.size}-byte header")
    magic, version, count = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"event batch starts {magic!r} v{version}; expected {MAGIC!r} v{VERSION}")
    events: list[CacheEvent] = []
    pos = _HEAD.size
    for _ in range(count):
        if pos >= len(data):
            raise ProtocolError(f"event batch ends at byte {pos} after {len(events)} of {count} events")
        tag = data[pos]
        if tag not in (_STORED, _REMOVED):
            raise ProtocolError(f"unknown event tag {tag} at byte {pos}")
        fixed = 1 + KEY_BYTES * (2 if tag == _STORED else 1) + _TAIL.size
        if pos + fixed > len(data):
            raise ProtocolError(f"event at byte {pos} is truncated")
        key = data[pos + 1 : pos + 1 + KEY_BYTES]
        parent = data[pos + 1 + KEY_BYTES : pos + 1 + 2 * KEY_BYTES] if tag == _STORED else b""
        block_id, scope_len = _TAIL.unpack_from(data, pos + fixed - _TAIL.size)
        pos += fixed
        if pos + scope_len > len(data):
            raise ProtocolError(f"event scope at byte {pos} runs past the end of the batch")
        try:
            scope = data[pos : pos + scope_len].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"event scope at byte {pos} is not UTF-8") from exc
        pos += scope_len
        if tag == _STORED:
            events.append(BlockStored(key, parent, block_id, scope))
        else:
            events.append(BlockRemoved(key, block_id, scope))
    if pos != len(data):
        raise ProtocolError(f"event batch has {len(data) - pos} trailing bytes after {count} events")
    return events


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """A worker's load as its event batches carry it: the scheduler's queues and the pool's use."""

    num_running: int
    num_waiting: int
    kv_usage: float  # blocks in use / pool blocks, 0..1

    def encode(self) -> bytes:
        return json.dumps([self.num_running, self.num_waiting, round(self.kv_usage, 4)]).encode()

    @classmethod
    def decode(cls, raw: bytes) -> WorkerLoad:
        """``ValueError`` unless ``raw`` is what :meth:`encode` writes."""
        data = json.loads(raw)
        if (
            not isinstance(data, list)
            or len(data) != 3
            or any(type(x) is not int or x < 0 for x in data[:2])
            or type(data[2]) not in (int, float)
            or not 0 <= data[2] <= 1
        ):
            raise ValueError(f"not a worker load: {raw[:60]!r}")
        return cls(data[0], data[1], float(data[2]))


@dataclass(frozen=True, slots=True)
class Registration:
    """What a worker tells the front about itself (stored as JSON in ``kvcache:workers``)."""

    worker_id: str
    url: str
    instance: str  # new on every start: the front purges what it knew of an earlier instance
    pid: int
    model_id: str
    block_size: int
    vocab_size: int
    adapter_id: str | None  # with model_id, block_size and the deployment key: how blocks are keyed
    num_blocks: int  # pool capacity: the front never indexes more blocks than this for the worker
    key_check: str  # ``auth.key_check`` of the worker's hasher: the front's must be equal

    def to_json(self) -> str:
        return json.dumps({f: getattr(self, f) for f in self.__dataclass_fields__})

    @classmethod
    def from_json(cls, text: str | bytes) -> Registration:
        data = json.loads(text)
        return cls(**{f: data[f] for f in cls.__dataclass_fields__})


# ---- POST /generate: what the front (and ``kvcache route``) and a worker exchange -------------


class GenerateRequest(msgspec.Struct, omit_defaults=True, gc=False):
    """The body of ``POST /generate``: the prompt's token ids, the scope it runs in (tenant, share
    group, salt) and how to generate (``engine.SamplingParams``' fields). Encoded by the sender
    (``encode_request``) and decoded by the worker (``decode_request``) as this one type; types
    are checked here, ranges where the values are used (``SamplingParams``, ``Scope``, the engine's
    token check)."""

    request_id: str
    token_ids: list[int]
    tenant: str
    max_tokens: int
    group: str | None = None
    salt: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None


class GenerateLine(msgspec.Struct, omit_defaults=True, gc=False):
    """One NDJSON line of a worker's ``/generate`` answer (``serve.worker``), in one of three kinds:

    - a token: ``token_id`` and ``index``; the first (index 0) also carries the prompt's figures
      (``prompt_tokens``, ``cached_tokens``, ``tier_hits``, ``prefill_s``, ``queue_s``, ``tier_errors``);
    - the end: ``done`` with ``engine_s`` and ``finish_reason`` (``stop`` or ``length``);
    - an error after tokens were sent: ``error`` and ``status`` (the HTTP status it would have had).
    """

    token_id: int | None = None
    index: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    tier_hits: dict[str, int] | None = None
    prefill_s: float | None = None
    queue_s: float | None = None
    tier_errors: int | None = None
    done: bool = False
    engine_s: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None


_line_encoder = msgspec.json.Encoder()


def encode_request(request: GenerateRequest) -> bytes:
    return _line_encoder.encode(request)


_request_decoder = msgspec.json.Decoder(GenerateRequest)
_FIELD_AT = re.compile(r"at `\$\.(\w+)")
_MISSING_FIELD = re.compile(r"missing required field `(\w+)`")


def decode_request(raw: bytes) -> GenerateRequest:
    """A ``POST /generate`` body as ``GenerateRequest``; ``ProtocolError`` when it is not one,
    naming the field (``param``) and the value sent, or saying the body is not a JSON object."""
    try:
        return _request_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        at, missing = _FIELD_AT.search(str(exc)), _MISSING_FIELD.search(str(exc))
        if missing is not None:
            name = missing.group(1)
            raise ProtocolError(f"'{name}' is missing from the /generate body", param=name) from None
        if at is None:
            raise ProtocolError(f"the /generate body must be a JSON object: {exc}") from None
        name = at.group(1)
        raise ProtocolError(f"'{name}'={_sent(raw, name)!r:.80} is refused: {exc}", param=name) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError(f"the /generate body is not valid JSON: {exc}") from None


def _sent(raw: bytes, name: str) -> Any:
    """The value ``raw`` (a JSON object the typed decoder refused) holds at ``name``, for the message."""
    try:
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    return body.get(name) if isinstance(body, dict) else None


_line_decoder = msgspec.json.Decoder(GenerateLine)


def encode_line(line: GenerateLine) -> bytes:
    return _line_encoder.encode(line) + b"\n"


def decode_line(raw: bytes) -> GenerateLine:
    """A line as ``GenerateLine``; ``ProtocolError`` naming what is wrong when it is not one, or
    when it is none of the three kinds (a token without its index, an error without a status)."""
    try:
        line = _line_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"worker sent a malformed /generate line: {exc}") from None
    if line.error is not None:
        if line.status is None:
            raise ProtocolError("worker sent an error line without its status")
    elif not line.done and (line.token_id is None or line.index is None):
        raise ProtocolError("worker sent a /generate line that is neither a token, the end nor an error")
    return line
