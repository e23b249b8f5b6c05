"""Request traces: the records a replay drives workers with, and the two JSONL readers.

Two formats, told apart line by line from the fields present (so a file is auto-detected):

- Mooncake (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``): one id per
  ``block_tokens``-token prompt block (512 in the published traces); equal ids at the same
  position are the same reusable prefix block; the last block may be partial.
- token-level (``timestamp`` ms, ``tenant``, ``session``, ``tokens`` or ``text``,
  ``output_length``). ``text`` becomes its UTF-8 bytes, one token per byte (a stand-in tokenizer
  that needs no model files; pass real token ids in ``tokens`` when they matter).

A bad line raises ``TraceError`` naming the file, the line number and the field. Also here:
writing traces (``write_trace``), token-level requests as Mooncake ones (``to_block_ids``, over
``prefix_chain``), and a trace's clock rescaled to an offered prefill load (``scale_to_load``).

Not here: generating traces (``workloads``), replaying them (``replay``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcache.costs import LatencyModel
from kvcache.errors import ConfigError, TraceError

MOONCAKE_BLOCK_TOKENS = 512
FORMAT_MOONCAKE = "mooncake"
FORMAT_TOKENS = "tokens"


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace. Exactly one of ``block_ids`` and ``tokens`` is set."""

    timestamp_ms: float
    num_tokens: int
    output_tokens: int
    tenant: str = "default"
    session: str = ""
    block_ids: tuple[int, ...] | None = None
    tokens: tuple[int, ...] | None = None


def token_request(
    tokens: Iterable[int],
    output_tokens: int,
    *,
    tenant: str = "default",
    session: str = "",
    timestamp_ms: float = 0.0,
) -> TraceRequest:
    """A token-level request of ``tokens`` (copied)."""
    prompt = tuple(tokens)
    return TraceRequest(timestamp_ms, len(prompt), output_tokens, tenant, session, tokens=prompt)


def prompt_text(req: TraceRequest) -> str:
    """The text of a request whose tokens are UTF-8 bytes (a trace's ``text`` field)."""
    assert req.tokens is not None, "a block-id request has no text"
    return bytes(req.tokens).decode("utf-8")


@dataclass(frozen=True, slots=True)
class Trace:
    """Requests in arrival order, the format they came in, and the tokens per block id."""

    requests: list[TraceRequest]
    format: str
    block_tokens: int | None  # tokens per ``block_ids`` entry; None for token-level traces

    @property
    def duration_ms(self) -> float:
        return self.requests[-1].timestamp_ms - self.requests[0].timestamp_ms if self.requests else 0.0

    def unique_blocks(self, block_size: int | None = None) -> int:
        """Distinct prompt blocks: distinct ids for a Mooncake trace; distinct prefix blocks of
        ``block_size`` tokens for a token-level one."""
        if self.format == FORMAT_MOONCAKE:
            return len({i for req in self.requests if req.block_ids for i in req.block_ids})
        if block_size is None:
            raise TraceError("a token-level trace needs a block_size to count its unique blocks")
        return len(
            {i for req in to_block_ids(self.requests, block_size) if req.block_ids for i in req.block_ids}
        )


def _field(obj: dict[str, Any], name: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise TraceError(f"{where}: field {name!r} is missing")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TraceError(f"{where}: field {name!r}={value!r} must be {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _int_list(value: Any, name: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise TraceError(f"{where}: field {name!r} must be a non-empty list of integers")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise TraceError(f"{where}: field {name!r}[{i}]={item!r} must be an integer >= 0")
    return tuple(value)


def parse_line(obj: Any, where: str, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> TraceRequest:
    """One JSON object of either format as a ``TraceRequest``; ``where`` prefixes errors."""
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    timestamp = float(_field(obj, "timestamp", where, (int, float)))
    if timestamp < 0:
        raise TraceError(f"{where}: field 'timestamp'={timestamp} must be >= 0 (milliseconds)")
    output = _field(obj, "output_length", where, int)
    if output < 1:
        raise TraceError(f"{where}: field 'output_length'={output} must be >= 1")
    if "hash_ids" in obj:
        num_tokens = _field(obj, "input_length", where, int)
        ids = _int_list(obj["hash_ids"], "hash_ids", where)
        expected = -(-num_tokens // block_tokens)
        if num_tokens < 1 or len(ids) != expected:
            raise TraceError(
                f"{where}: field 'hash_ids' has {len(ids)} ids for input_length={num_tokens}; expected "
                f"ceil({num_tokens}/{block_tokens}) = {expected}"
            )
        return TraceRequest(timestamp, num_tokens, output, block_ids=ids)
    tenant = str(_field(obj, "tenant", where, (str, int)))
    session = str(obj.get("session", ""))
    if "tokens" in obj:
        tokens = _int_list(obj["tokens"], "tokens", where)
    elif "text" in obj:
        text = _field(obj, "text", where, str)
        if not text:
            raise TraceError(f"{where}: field 'text' is empty")
        tokens = tuple(text.encode("utf-8"))
    else:
        raise TraceError(f"{where}: field 'tokens' (or 'text', or Mooncake's 'hash_ids') is missing")
    return token_request(tokens, output, tenant=tenant, session=session, timestamp_ms=timestamp)


def read_trace(path: str | Path, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Trace:
    """Read a JSONL trace of either format (mixing them in one file is an error)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    requests: list[TraceRequest] = []
    fmt: str | None = None
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            req = parse_line(obj, where, block_tokens)
            line_fmt = FORMAT_MOONCAKE if req.block_ids is not None else FORMAT_TOKENS
            if fmt is None:
                fmt = line_fmt
            elif fmt != line_fmt:
                raise TraceError(f"{where}: a {line_fmt} line in a {fmt} trace; use one format per file")
            if requests and req.timestamp_ms < requests[-1].timestamp_ms:
                raise TraceError(
                    f"{where}: field 'timestamp'={req.timestamp_ms:g} goes back in time "
                    f"(previous line {requests[-1].timestamp_ms:g}); sort the trace by timestamp"
                )
            requests.append(req)
    if fmt is None:
        raise TraceError(f"{path}: the trace has no requests")
    return Trace(requests, fmt, block_tokens if fmt == FORMAT_MOONCAKE else None)


def to_json_line(req: TraceRequest) -> dict[str, Any]:
    """The JSON object ``parse_line`` reads back into ``req``."""
    ts: float | int = int(req.timestamp_ms) if req.timestamp_ms == int(req.timestamp_ms) else req.timestamp_ms
    if req.block_ids is not None:
        return {
            "timestamp": ts,
            "input_length": req.num_tokens,
            "output_length": req.output_tokens,
            "hash_ids": list(req.block_ids),
        }
    assert req.tokens is not None
    return {
        "timestamp": ts,
        "tenant": req.tenant,
        "session": req.session,
        "tokens": list(req.tokens),
        "output_length": req.output_tokens,
    }


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> int:
    """Write requests as JSONL (each in its own format); returns how many were written."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for req in requests:
            f.write(json.dumps(to_json_line(req), separators=(", ", ": ")) + "\n")
            count += 1
    return count


def prefix_chain(
    items: Sequence[int], items_per_block: int, ids: dict[tuple[int, tuple[int, ...]], int]
) -> tuple[int, ...]:
    """Ids of ``items`` cut into blocks of ``items_per_block``, chained by prefix: a block's id is
    looked up in ``ids`` (shared by every request of a trace) by its parent's id and its items, and
    new ones are numbered in first-seen order, so equal ids at a position mean equal prefixes."""
    parent = -1
    chain: list[int] = []
    for start in range(0, len(items), items_per_block):
        parent = ids.setdefault((parent, tuple(items[start : start + items_per_block])), len(ids))
        chain.append(parent)
    return tuple(chain)


def to_block_ids(
    requests: Sequence[TraceRequest], block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> list[TraceRequest]:
    """Token-level requests as Mooncake ones: equal prefix blocks get equal ids (``prefix_chain``).

    Mooncake traces have no tenants: equal prefixes get equal ids whoever sent them (the tenant is
    dropped).
    """
    ids: dict[tuple[int, tuple[int, ...]], int] = {}
    out: list[TraceRequest] = []
    for req in requests:
        assert req.tokens is not None, "already a block-id request"
        chain = prefix_chain(req.tokens, block_tokens, ids)
        out.append(TraceRequest(req.timestamp_ms, req.num_tokens, req.output_tokens, block_ids=chain))
    return out


def offered_load(requests: Sequence[TraceRequest], num_workers: int, latency: LatencyModel) -> float:
    """Fraction of the workers' prefill time the trace asks for if nothing were cached."""
    if len(requests) < 2:
        return 0.0
    work_ms = sum(latency.prefill_ms(r.num_tokens, 0, 0) for r in requests)
    span_ms = requests[-1].timestamp_ms - requests[0].timestamp_ms
    return work_ms / (num_workers * max(span_ms, 1e-9))


def scale_to_load(
    requests: Sequence[TraceRequest], num_workers: int, load: float, latency: LatencyModel | None = None
) -> list[TraceRequest]:
    """The same Mooncake requests on a clock stretched so that ``offered_load`` is ``load``."""
    if load <= 0:
        raise ConfigError(f"load={load} must be > 0 (1.0 = every prefill engine busy without caching)")
    if num_workers < 1:
        raise ConfigError(f"num_workers={num_workers} must be >= 1")
    now = offered_load(requests, num_workers, latency or LatencyModel())
    if now == 0.0:
        return list(requests)
    factor = now / load
    return [
        TraceRequest(round(r.timestamp_ms * factor, 3), r.num_tokens, r.output_tokens, block_ids=r.block_ids)
        for r in requests
    ]
