"""The OpenAI wire format: validate request bodies, build responses, stream chunks and errors.

``parse_completion`` / ``parse_chat`` turn a decoded JSON body into an ``OpenAIRequest`` or
raise ``ProtocolError`` naming the field; nothing reaches a worker unvalidated, and
``worker_request`` is what a worker is sent for one (``wire.GenerateRequest``). The builders
produce ``/v1/completions`` and ``/v1/chat/completions`` bodies (``response``; and their ``chunk``
forms for server-sent events, a stream ending with ``stream_end``) with
``usage.prompt_tokens_details.cached_tokens``; they are the only ones, used by ``kvcache serve``'s
front and by ``kvcache route`` (which adds the generated ``token_ids``, having no tokenizer).

Sampling: ``temperature`` (0..2, 0 = greedy, the default), ``top_p`` (0..1], ``top_k`` (vLLM's
extra field, -1 or 0 = off), ``seed`` (reproducible draws), ``max_tokens`` and ``stop`` (a string or
a list of up to 4 non-empty strings: the text ends before the first one the output contains, as
vLLM does); each is checked for type and range and a bad one is a 400 naming it (``param``).
``n`` must be 1; ``logprobs``/``echo`` are refused rather than ignored. OpenAI fields that ask
for something this server does not do (``logit_bias``, ``suffix``,
``tools``, ``response_format``, ...) are accepted at their no-op value (``{}``, ``""``, ``[]``,
``{"type": "text"}``) and refused with a 400 naming the field otherwise; a field the OpenAI API
does not have is refused, so a typo never silently changes a request.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: ``type`` and
``code`` (a string such as ``"model_not_found"``, or null; never the HTTP status) follow from the
status unless the caller names a more precise code; ``json_errors`` answers unknown routes and
methods in the same shape. Streamed with ``stream_options.include_usage``, every chunk carries
``"usage": null`` and the usage comes in one last chunk whose ``choices`` is empty, as OpenAI sends it.

``loads`` is the only way a body becomes JSON here: it bounds the nesting depth on the raw bytes
before parsing (a body of 100,000 ``[`` must be a 400, not a ``RecursionError``), and every string
a request carries must be encodable as UTF-8 (JSON allows a lone surrogate such as ``"\ud800"``).
Not here: tokenizing (``tokenize``), authentication (``config``), HTTP (``front``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from kvcache.cache.tenancy import Scope
from kvcache.errors import ProtocolError
from kvcache.serve import wire

MAX_TOKENS_DEFAULT = 16
MAX_TOKENS_LIMIT = 4096
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_JSON_DEPTH = 32  # OpenAI bodies nest 4-6 deep; json.loads recurses once per level
MAX_STOP = 4
MAX_STOP_CHARS = 256
_IGNORED = {"user", "presence_penalty", "frequency_penalty", "metadata", "store", "service_tier"}
# Fields that are accepted at a value that changes nothing and refused at any other value, with
# what this server does not do (the refusal says so).
_NOOPS: dict[str, tuple[tuple[Any, ...], str]] = {
    "logit_bias": ((None, {}), "bias logits"),
    "suffix": ((None, ""), "insert text before a suffix"),
    "best_of": ((None, 1), "rank several candidates"),
    "tools": ((None, []), "call tools"),
    "tool_choice": ((None, "none"), "call tools"),
    "parallel_tool_calls": ((None, True, False), "call tools"),
    "response_format": ((None, {"type": "text"}), "constrain the output to a format"),
    "top_logprobs": ((None, 0), "return log probabilities"),
}
_REFUSED = {"logprobs": "return log probabilities", "echo": "echo the prompt"}
# OpenAI's error ``type`` and ``code`` for each HTTP status, unless the caller names a code.
_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", None),
    405: ("invalid_request_error", None),
    413: ("invalid_request_error", None),
    429: ("tokens", "rate_limit_exceeded"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop")
_COMPLETION_NOOPS = {"logit_bias", "suffix", "best_of"}
_CHAT_NOOPS = {"logit_bias", "tools", "tool_choice", "parallel_tool_calls", "response_format", "top_logprobs"}
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_DEPTH_STEP = np.zeros(256, np.int32)  # +1 per opening bracket, -1 per closing one, by byte value
_DEPTH_STEP[list(b"[{")], _DEPTH_STEP[list(b"]}")] = 1, -1


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """A validated ``/v1/completions`` or ``/v1/chat/completions`` body: exactly one of ``text``,
    ``token_ids`` or ``messages`` is set. (What a worker is sent is ``wire.GenerateRequest``.)"""

    chat: bool
    model: str | None
    max_tokens: int
    stream: bool
    include_usage: bool
    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[tuple[str, str]] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def sampling(self) -> dict[str, Any]:
        """The fields a worker's ``/generate`` takes (``engine.SamplingParams``), defaults left out."""
        out: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
        }
        defaults = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}
        return {k: v for k, v in out.items() if v != defaults[k] or (k == "seed" and v is not None)}


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (strings skipped), without parsing it."""
    skeleton = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
    brackets = skeleton[(skeleton == 0x5B) | (skeleton == 0x5D) | (skeleton == 0x7B) | (skeleton == 0x7D)]
    return int(np.cumsum(_DEPTH_STEP[brackets]).max(initial=0))


def loads(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A request body as JSON; ``ProtocolError`` when it is not UTF-8 JSON or nests too deep."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise ProtocolError(f"body nests {depth} levels deep; at most {max_depth} are accepted")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"body is not valid JSON: {exc}") from exc


def _utf8(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProtocolError(
            f"{where} holds {text[exc.start : exc.end]!a} at character {exc.start}, which is "
            "not valid Unicode (a lone surrogate); send UTF-8 text"
        ) from exc
    return text


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _int_field(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"'{name}'={value!r} must be an integer in {lo}..{hi}", param=name)
    return value


def _common(body: dict[str, Any], allowed: set[str], chat: bool) -> dict[str, Any]:
    noops = _CHAT_NOOPS if chat else _COMPLETION_NOOPS
    unknown = sorted(set(body) - allowed - _IGNORED - noops)
    if unknown:
        raise ProtocolError(f"unsupported fields {unknown}; remove them", param=unknown[0])
    for name in sorted(noops & set(body)):
        accepted, what = _NOOPS[name]
        if not any(body[name] == ok and type(body[name]) is type(ok) for ok in accepted):
            shown = " or ".join("null" if ok is None else json.dumps(ok) for ok in accepted)
            raise ProtocolError(
                f"'{name}'={body[name]!r} is not supported: this server does not {what}; "
                f"send {shown} or leave it out",
                param=name,
            )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ProtocolError(f"'model'={model!r} must be a string", param="model")
    n = body.get("n", 1)
    if n is not None and (type(n) is not int or n != 1):
        raise ProtocolError(f"'n'={n!r}: only n=1 is supported", param="n")
    for name, what in _REFUSED.items():
        if body.get(name) not in (None, False, [], ""):
            raise ProtocolError(
                f"'{name}' is not supported: this server does not {what}; leave it unset", param=name
            )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ProtocolError(f"'stream'={stream!r} must be true or false", param="stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise ProtocolError(
                "'stream_options' must be an object like {\"include_usage\": true}", param="stream_options"
            )
        include_usage = options.get("include_usage", False) is True
    limit_name = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        limit_name = "max_completion_tokens"
    max_tokens = _int_field(body, limit_name, MAX_TOKENS_DEFAULT, 1, MAX_TOKENS_LIMIT)
    return {
        "chat": chat,
        "model": model,
        "max_tokens": max_tokens,
        "stream": stream,
        "include_usage": include_usage,
        **_sampling(body),
    }


def _number(
    body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and (lo < value <= hi if lo_open else lo <= value <= hi)
    )
    if not ok:
        span = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise ProtocolError(f"'{name}'={value!r} must be a number in {span}", param=name)
    return float(value)


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields, each type- and range-checked (``ProtocolError`` names the field)."""
    out: dict[str, Any] = {
        "temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
    }
    top_k = _int_field(body, "top_k", 0, -1, 2**31 - 1)
    out["top_k"] = max(top_k, 0)  # vLLM's -1 and 0 both mean off
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64
    ):
        raise ProtocolError(f"'seed'={seed!r} must be an integer", param="seed")
    out["seed"] = None if seed is None else seed % 2**63  # the engine seeds torch with a non-negative int
    stop = body.get("stop")
    if stop is None:
        stop = []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
    ):
        raise ProtocolError(
            f"'stop'={stop!r:.80} must be a string or a list of at most {MAX_STOP} non-empty "
            f"strings of at most {MAX_STOP_CHARS} characters",
            param="stop",
        )
    out["stop"] = tuple(_utf8(s, "'stop'") for s in stop)
    return out


def check_prompt_tokens(num_tokens: int, limit: int | None) -> None:
    if limit is not None and num_tokens > limit:
        raise ProtocolError(
            f"the prompt has {num_tokens} tokens; this server accepts at most {limit} "
            "(--max-prompt-tokens): shorten it"
        )


def parse_completion(body: Any, max_prompt_tokens: int | None = None) -> OpenAIRequest:
    """``/v1/completions``: ``prompt`` is a string, a list of token ids, or a one-element list of either.
    A token-id prompt longer than ``max_prompt_tokens`` is refused before its ids are checked."""
    body = _require_object(body)
    common = _common(
        body,
        {
            "model",
            "prompt",
            "max_tokens",
            "stream",
            "stream_options",
            "n",
            "logprobs",
            "echo",
            *_SAMPLING_FIELDS,
        },
        chat=False,
    )
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ProtocolError("'prompt' is empty; send at least one character", param="prompt")
        return OpenAIRequest(text=_utf8(prompt, "'prompt'"), **common)
    if isinstance(prompt, list) and prompt:
        if not isinstance(prompt[0], (str, list)):
            check_prompt_tokens(len(prompt), max_prompt_tokens)
        if all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in prompt):
            return OpenAIRequest(token_ids=list(prompt), **common)
        if all(isinstance(t, (str, list)) for t in prompt):
            raise ProtocolError(
                f"'prompt' holds {len(prompt)} prompts; send one prompt per request", param="prompt"
            )
    raise ProtocolError(
        "'prompt' must be a non-empty string or a non-empty list of token ids in 0..2**32-1", param="prompt"
    )


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return _utf8(content, f"{where}.content")
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise ProtocolError(f'{where}.content[{i}] must be {{"type": "text", "text": "..."}}')
            parts.append(_utf8(text, f"{where}.content[{i}]"))
        return "".join(parts)
    raise ProtocolError(f"{where}.content must be a string or a list of text parts")


def parse_chat(body: Any) -> OpenAIRequest:
    """``/v1/chat/completions``: ``messages`` is a non-empty list of ``{role, content}`` objects."""
    body = _require_object(body)
    common = _common(
        body,
        {
            "model",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "stream",
            "stream_options",
            "n",
            "logprobs",
            *_SAMPLING_FIELDS,
        },
        chat=True,
    )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError(
            '\'messages\' must be a non-empty list of {"role", "content"} objects', param="messages"
        )
    parsed: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ProtocolError(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ProtocolError(f"{where}.role={role!r} must be one of {list(CHAT_ROLES)}")
        parsed.append((role, _content_text(message.get("content"), where)))
    return OpenAIRequest(messages=parsed, **common)


def worker_request(
    req: OpenAIRequest, request_id: str, token_ids: list[int], scope: Scope, *, seed: int | None = None
) -> wire.GenerateRequest:
    """What a worker's ``POST /generate`` is sent for ``req``: ``token_ids`` in ``scope``, with its
    ``max_tokens`` and sampling fields; ``seed`` is used when ``req`` samples and names none."""
    sampling = req.sampling()
    if seed is not None and sampling.get("temperature", 0.0) > 0 and "seed" not in sampling:
        sampling["seed"] = seed
    return wire.GenerateRequest(
        request_id, token_ids, scope.tenant, req.max_tokens, group=scope.group, salt=scope.salt, **sampling
    )


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def response(
    req: OpenAIRequest,
    *,
    request_id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str,
    usage_: dict[str, Any],
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """The non-streamed body; with ``token_ids`` (the generated ids, as vLLM's ``return_token_ids``
    adds them) its choice carries them too."""
    if req.chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_,
    }


def chunk(
    req: OpenAIRequest,
    *,
    request_id: str,
    model: str,
    created: int,
    text: str | None,
    finish_reason: str | None = None,
    usage_: dict[str, Any] | None = None,
    first: bool = False,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """One streamed chunk; ``text=None`` gives the usage-only final chunk (empty ``choices``). With
    ``include_usage`` the other chunks carry ``"usage": null``; without it no chunk has the field.
    ``token_ids``: the ids this chunk adds, carried by its choice (as in :func:`response`)."""
    choices: list[dict[str, Any]] = []
    if text is not None:
        if req.chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        else:
            choices = [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]
        if token_ids is not None:
            choices[0]["token_ids"] = token_ids
    out: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_ is not None or req.include_usage:
        out["usage"] = usage_
    return out


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (or a literal such as ``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def stream_end(
    req: OpenAIRequest,
    *,
    request_id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str,
    usage_: dict[str, Any],
    token_ids: list[int] | None = None,
) -> bytes:
    """How a streamed answer ends, as server-sent events: the last choice chunk (``text``, the
    ``finish_reason``), OpenAI's usage chunk (after the last choice, with no choices) when the
    request asked for it (``include_usage``), then ``[DONE]``."""
    last = chunk(
        req,
        request_id=request_id,
        model=model,
        created=created,
        text=text,
        finish_reason=finish_reason,
        token_ids=token_ids,
    )
    events = [sse(last)]
    if req.include_usage:
        usage_only = chunk(req, request_id=request_id, model=model, created=created, text=None, usage_=usage_)
        events.append(sse(usage_only))
    events.append(sse("[DONE]"))
    return b"".join(events)


def error_body(
    message: str, *, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``, its ``type`` and
    default ``code`` chosen by ``status``."""
    fallback = ("invalid_request_error", None) if status < 500 else ("server_error", None)
    type_, default_code = _ERROR_KINDS.get(status, fallback)
    return {"error": {"message": message, "type": type_, "param": param, "code": code or default_code}}


def error_response(
    message: str,
    *,
    status: int,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        error_body(message, status=status, param=param, code=code), status=status, headers=headers
    )


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown routes (404) and methods (405) answered with an OpenAI error body, not aiohttp's text."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        what = "Invalid URL" if exc.status == 404 else "Method not allowed"
        return error_response(
            f"{what} ({request.method} {request.path})",
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k == "Allow"},
        )
