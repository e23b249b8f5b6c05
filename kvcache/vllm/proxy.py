"""``kvcache route``: an OpenAI-compatible proxy that places requests on vLLM engines by what
their KV event streams say they cache.

Each engine is an HTTP base URL (``/v1/completions``, ``/v1/chat/completions``) with its ZMQ
event endpoint and, optionally, its replay endpoint. The proxy subscribes to every stream
(``vllm.events``; each received on a thread of its own, applied on the event loop in bounded
slices between requests) straight into its ``Router``'s index (worker id = engine position; each
engine bounded to the engines' pool size, ``capacity_blocks``), keys each request with ``vllm.keys``
(as ``vllm.events.index_key``) and forwards
the request body to the engine the policy picks, streaming its answer back. Keys need token
ids: a completion whose ``prompt`` is a list of token ids is keyed (in the caller's scope and,
when ``--lora`` names it, with the LoRA adapter of its ``model``); text prompts and chat
messages are placed by load alone (no tokenizer here). The router's load accounting counts a
request from forwarding to the end of its response.

Callers authenticate as ``kvcache serve``'s do (``serve.config``: the same file, API keys to
tenants; without one every caller is the tenant ``default``), before the body is read; a missing or
unknown key is a 401 in OpenAI's error shape. The scope a request runs in comes from that tenant
alone: a ``cache_salt`` in the body only narrows it (``tenancy.Scope``'s salt), so no body names
another tenant. Engines see the scope as ``vllm.keys.scope_salt``: a vLLM engine as the
``cache_salt`` the proxy writes over the caller's, a kvcache worker as tenant, group and salt (its
published keys are salted with the deployment's keyed pseudonym of the scope, which the proxy then
keys with too: ``cache_salt_of``). vLLM engines cannot enforce a share group's k-anonymity, so with
``k_anonymity`` above 1 they get each tenant's private scope. The engines' own credential (a kvcache
worker's bearer token) is added here and never comes from or goes to a caller.

A client that goes away cancels its handler (``runner``), which drops the engine's stream: a
kvcache worker aborts the request within a step, as it does for ``kvcache serve``'s front.
Request ids are random (``route-`` and 96 bits), so proxies sharing an engine never collide.

With ``api="kvcache"`` the engines are kvcache workers (``kvcache worker --vllm-events``): a
completion with token ids is checked as ``kvcache serve`` checks it (``protocol.parse_completion``;
``stop`` strings are refused, there being no text to match them in), becomes their
``POST /generate`` (``protocol.worker_request``, sent through ``serve.peer.generate``: the front's
wire format and client) and is answered by the front's builders (``protocol.response``, or
``chunk`` events and ``stream_end`` with ``stream``), streamed or not, carrying the generated
``token_ids``, the worker's finish reason and its cached tokens. Given ``public``
(``vllm.public.PublicHead``, the deployment's published prefixes followed from its Redis), a
request's public head is keyed as the workers' event bridges publish it: in the public scope, the
same for every tenant, and the rest in the caller's scope (``vllm.keys``, ``public_blocks``), so a
tenant's first request goes to a worker that holds the public prefix another tenant's request
stored. vLLM engines salt block 0 with the
request's salt, so public prefixes never apply to them (``public`` is refused with
``api="openai"``). Not here: tokenizing, retries on another engine (``kvcache serve``'s front does
those for kvcache's own workers); which engine holds which keys (the router's one index,
``router.index.PreciseIndex``: the proxy keeps no copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

import aiohttp
from aiohttp import web

from kvcache.cache.tenancy import MAX_SALT_CHARS, Scope
from kvcache.errors import AuthError, ConfigError, ProtocolError
from kvcache.router.index import PreciseIndex
from kvcache.router.router import Router, RouteRequest
from kvcache.serve import peer, protocol, wire
from kvcache.serve.config import ServeConfig, TenantSpec
from kvcache.vllm.curve import CurveClient
from kvcache.vllm.events import index_key
from kvcache.vllm.keys import VllmKeyer, scope_salt
from kvcache.vllm.public import PublicHead
from kvcache.vllm.subscriber import EventSubscriber

_SCOPE = "vllm"
APIS = ("openai", "kvcache")  # what the engines speak: OpenAI (vLLM), or kvcache worker's /generate


@dataclass(frozen=True, slots=True)
class EngineEndpoint:
    url: str
    events: str
    replay: str | None = None

    @classmethod
    def parse(cls, spec: str) -> EngineEndpoint:
        """``URL,EVENTS[,REPLAY]``, e.g. ``http://h:8000,tcp://h:5557,tcp://h:5558``."""
        parts = spec.split(",")
        if len(parts) not in (2, 3) or not parts[0].startswith(("http://", "https://")):
            raise ConfigError(
                f"--engine {spec!r} must be URL,EVENTS[,REPLAY], e.g. http://h:8000,tcp://h:5557"
            )
        return cls(parts[0].rstrip("/"), parts[1], parts[2] if len(parts) == 3 else None)


def _token_ids(prompt: Any) -> bool:
    """Whether ``prompt`` is token ids as kvcache workers take them (uint32s)."""
    return (
        isinstance(prompt, list) and bool(prompt) and all(type(t) is int and 0 <= t < 2**32 for t in prompt)
    )


def completion(body: dict[str, Any]) -> protocol.OpenAIRequest:
    """A completion for kvcache workers, checked as ``kvcache serve`` checks it
    (``protocol.parse_completion``; ``cache_salt`` is the proxy's, ``scope``); ``ProtocolError``
    naming the field, and for ``stop`` strings: with no tokenizer there is no text to match them in."""
    req = protocol.parse_completion({k: v for k, v in body.items() if k != "cache_salt"})
    if req.stop:
        raise ProtocolError(
            f"'stop'={list(req.stop)!r:.80}: kvcache route has no tokenizer, so it cannot match stop "
            "strings; leave 'stop' out (or send the request to kvcache serve)",
            param="stop",
        )
    return req


def _int_list(prompt: Any) -> TypeGuard[list[int]]:
    """Whether ``prompt`` is token ids the proxy can key (a vLLM engine takes any ints)."""
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    )


class RouteProxy:
    def __init__(
        self,
        engines: Sequence[EngineEndpoint],
        keyer: VllmKeyer,
        capacity_blocks: int,
        policy: str = "affinity",
        lora_models: frozenset[str] = frozenset(),
        api: str = "openai",
        upstream_headers: Mapping[str, str] | None = None,
        config: ServeConfig | None = None,
        *,
        events_curve: CurveClient | None = None,
        cache_salt_of: Callable[[Scope], str | None] = scope_salt,
        max_drain_hashes: int = 2048,
        connect_worker: Callable[[str], AbstractAsyncContextManager[Any]] | None = None,
        public: PublicHead | None = None,
    ) -> None:
        if not engines:
            raise ConfigError("kvcache route needs at least one --engine")
        if api not in APIS:
            raise ConfigError(f"api={api!r} is unknown; choose one of {APIS}")
        # Sent with every request to an OpenAI-API engine (e.g. its API key).
        self.upstream_headers = dict(upstream_headers or {})
        self.config = config or ServeConfig()  # callers' API keys -> tenants
        if api == "kvcache" and connect_worker is None:
            raise ConfigError(
                "api='kvcache' needs connect_worker (serve.peer.opener): kvcache workers "
                "answer only a caller that checked who they are"
            )
        if public is not None and api != "kvcache":
            raise ConfigError(
                "public prefixes apply to kvcache workers only (api='kvcache'): a vLLM engine salts "
                "block 0 with the request's salt, so no block of it is shared between tenants"
            )
        if public is not None and keyer.public_salt is None:
            raise ConfigError("public prefixes need a keyer with public_salt (vllm.public.public_salt)")
        if public is not None and public.hasher.block_size != keyer.block_size:
            raise ConfigError(
                f"the public head counts blocks of {public.hasher.block_size} tokens, the keyer "
                f"keys blocks of {keyer.block_size}: give both the engines' block size"
            )
        self.public = public
        # kvcache workers: url -> a link to the worker there once it proved itself (``serve.peer``).
        self.connect_worker = connect_worker
        self.api = api
        self.engines = list(engines)
        self.keyer = keyer
        self.lora_models = lora_models
        self.router = Router(policy, "precise", keyer.block_size, capacity_blocks=capacity_blocks)
        index = self.router.index
        assert isinstance(index, PreciseIndex)  # precise mode
        self.index = index  # the router's, which the subscribers fill: the proxy keeps no copy
        self.subscribers = []
        for w, engine in enumerate(self.engines):
            self.router.add_worker(w)
            self.subscribers.append(
                EventSubscriber(w, index, engine.events, engine.replay, curve=events_curve)
            )
        # Events are received on each subscriber's thread and applied here, on the event loop, in
        # slices of about ``max_drain_hashes`` keys per engine between requests (``_background``).
        self.max_drain_hashes = max_drain_hashes
        # The salt the engines key a request's scope with: vLLM engines get ``scope_salt`` as their
        # cache_salt; kvcache workers salt their published keys with the deployment's keyed
        # pseudonym of the scope, which the caller of the constructor passes here.
        self.cache_salt_of = cache_salt_of
        self.session: aiohttp.ClientSession | None = None

    def poll_events(self) -> int:
        """Apply what the subscribers received, a bounded slice per engine; returns batches applied."""
        return sum(sub.drain(self.max_drain_hashes) for sub in self.subscribers)

    def scope(self, tenant: TenantSpec, body: dict[str, Any]) -> Scope:
        """The scope of ``tenant``'s request, narrowed by the body's ``cache_salt`` when it has one;
        ``ValueError`` naming the field when the salt is not a string of 1..MAX_SALT_CHARS."""
        salt = body.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not 0 < len(salt) <= MAX_SALT_CHARS):
            raise ValueError(f"'cache_salt'={salt!r:.80} must be a string of 1..{MAX_SALT_CHARS} characters")
        shared = self.api == "kvcache" or self.config.k_anonymity == 1  # vLLM cannot gate a group
        return Scope(tenant.name, group=tenant.group if shared else None, salt=salt)

    def block_keys(self, body: dict[str, Any], scope: Scope) -> list[int]:
        """The vLLM keys of the request ``body`` in ``scope``, as its engine publishes them once it
        caches the prompt (with ``public``: the published head in the public scope); none for a
        prompt that is not token ids."""
        prompt = body.get("prompt")
        if not _int_list(prompt):
            return []
        model = body.get("model")
        lora = model if isinstance(model, str) and model in self.lora_models else None
        num_public = self.public.num_public_blocks(prompt) if self.public is not None else 0
        return self.keyer.keys(prompt, lora, self.cache_salt_of(scope), num_public)

    def place(self, body: dict[str, Any], scope: Scope) -> tuple[str, int]:
        """The request id and engine for one OpenAI request body in ``scope``."""
        request_id = f"route-{uuid.uuid4().hex[:24]}"
        prompt = body.get("prompt")
        keys = [index_key(k) for k in self.block_keys(body, scope)]
        num_tokens = 1
        if _int_list(prompt):
            num_tokens = len(prompt)
        elif isinstance(prompt, str):
            num_tokens = max(1, len(prompt) // 4)  # a length estimate for the load model only
        worker = self.router.route(RouteRequest(request_id, keys, num_tokens, _SCOPE))
        return request_id, cast(int, worker)  # engines are added by position

    async def forward(self, request: web.Request) -> web.StreamResponse:
        try:
            tenant = self.config.authenticate(request.headers.get("Authorization"))
        except AuthError as exc:
            return protocol.error_response(str(exc), status=401)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return protocol.error_response("the body is not JSON", status=400)
        if not isinstance(body, dict):
            return protocol.error_response("the body must be a JSON object", status=400)
        if self.api == "kvcache" and not _token_ids(body.get("prompt")):
            return protocol.error_response(
                "kvcache workers take token ids: send 'prompt' as a list of token ids",
                status=400,
                param="prompt",
            )
        try:
            scope = self.scope(tenant, body)
        except ValueError as exc:
            return protocol.error_response(str(exc), status=400, param="cache_salt")
        req: protocol.OpenAIRequest | None = None
        if self.api == "kvcache":
            try:
                req = completion(body)
            except ProtocolError as exc:
                return protocol.error_response(str(exc), status=400, param=exc.param)
        request_id, w = self.place(body, scope)
        assert self.session is not None
        try:
            if req is not None:
                return await self._generate(request, request_id, w, req, scope)
            body.pop("cache_salt", None)  # the engine's salt is the caller's scope, never the caller's word
            salt = self.cache_salt_of(scope)
            if salt is not None:
                body["cache_salt"] = salt
            url = self.engines[w].url + request.path
            post = self.session.post(url, json=body, headers=self.upstream_headers)
            async with post as upstream:
                response = web.StreamResponse(status=upstream.status)
                response.content_type = upstream.content_type
                response.headers["x-kvcache-engine"] = str(w)
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except aiohttp.ClientError as exc:
            return protocol.error_response(self._engine_failed(w, exc), status=502)
        finally:
            self.router.on_finished(request_id)

    async def _generate(
        self, request: web.Request, request_id: str, w: int, req: protocol.OpenAIRequest, scope: Scope
    ) -> web.StreamResponse:
        """One completion on a kvcache worker (``POST /generate``) in ``scope``, answered by the
        OpenAI builders ``kvcache serve`` answers with (``protocol``), streamed or not, with the
        generated ``token_ids`` and the worker's finish reason and cached tokens. A refusal before
        the first token keeps the worker's status; after it (streamed), it is the stream's last event."""
        assert self.connect_worker is not None and req.token_ids is not None
        created = int(time.time())
        model = req.model or ""  # the proxy serves whatever model its engines load
        headers = {"x-kvcache-engine": str(w)}
        tokens: list[int] = []
        first: wire.GenerateLine | None = None
        finish_reason = "length"
        response: web.StreamResponse | None = None
        try:
            link = self.connect_worker(self.engines[w].url)
            job = protocol.worker_request(req, request_id, req.token_ids, scope)
            async with link as worker, contextlib.aclosing(peer.generate(worker, job)) as lines:
                async for line in lines:
                    if line.done:
                        finish_reason = line.finish_reason or "length"
                        break
                    assert line.token_id is not None  # wire checks it
                    first = first or line
                    tokens.append(line.token_id)
                    if req.stream:
                        response = response or await self._start_stream(request, headers)
                        piece = protocol.chunk(
                            req,
                            request_id=request_id,
                            model=model,
                            created=created,
                            text="",
                            token_ids=[line.token_id],
                        )
                        await response.write(protocol.sse(piece))
        except (peer.WorkerRefused, aiohttp.ClientError) as exc:
            if response is None:
                if isinstance(exc, peer.WorkerRefused):
                    return protocol.error_response(exc.detail, status=exc.status)
                raise  # forward answers it: 502
            status, detail = (
                (exc.status, exc.detail)
                if isinstance(exc, peer.WorkerRefused)
                else (502, self._engine_failed(w, exc))
            )
            await response.write(protocol.sse(protocol.error_body(detail, status=status)))
            await response.write_eof()
            return response
        except ConnectionResetError:
            if response is None:
                raise
            return response  # the client went away mid-stream; leaving closed the worker's stream
        num_prompt = (first.prompt_tokens if first is not None else None) or len(req.token_ids)
        num_cached = (first.cached_tokens if first is not None else None) or 0
        usage = protocol.usage(num_prompt, len(tokens), num_cached)
        if not req.stream:
            body = protocol.response(
                req,
                request_id=request_id,
                model=model,
                created=created,
                text="",
                finish_reason=finish_reason,
                usage_=usage,
                token_ids=tokens,
            )
            return web.json_response(body, headers=headers)
        response = response or await self._start_stream(request, headers)
        end = protocol.stream_end(
            req,
            request_id=request_id,
            model=model,
            created=created,
            text="",
            finish_reason=finish_reason,
            usage_=usage,
            token_ids=[],
        )
        await response.write(end)
        await response.write_eof()
        return response

    def _engine_failed(self, w: int, exc: aiohttp.ClientError) -> str:
        return f"engine {w} ({self.engines[w].url}): {exc}"

    @staticmethod
    async def _start_stream(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        return response

    async def _background(self, app: web.Application) -> AsyncIterator[None]:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

        async def pump() -> None:
            loop = asyncio.get_running_loop()
            while True:
                started = loop.time()
                busy = self.poll_events() > 0
                # Events get at most half the loop's time: requests run while this sleeps.
                await asyncio.sleep(loop.time() - started if busy else 0.02)

        for sub in self.subscribers:
            sub.start()
        tasks = [asyncio.create_task(pump())]
        if self.public is not None:
            tasks.append(asyncio.create_task(self.public.follow()))
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.session.close()
        for sub in self.subscribers:
            sub.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 2**20, middlewares=[protocol.json_errors])
        app.router.add_post("/v1/completions", self.forward)
        app.router.add_post("/v1/chat/completions", self.forward)
        app.cleanup_ctx.append(self._background)
        return app

    def runner(self) -> web.AppRunner:
        """The app's runner, set as ``serve.front.Front.runner``'s: a client that disconnects cancels
        its handler (``handler_cancellation``), which drops the engine's stream and so stops the
        generation there; on shutdown, requests in flight get ``wire.SHUTDOWN_GRACE_S``."""
        return web.AppRunner(
            self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=wire.SHUTDOWN_GRACE_S
        )
