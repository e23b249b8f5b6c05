"""The OpenAI-compatible front: authenticate, validate, tokenize, route, proxy, retry.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` or not),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /debug/workers``
(worker addresses and pids, for loopback clients only) and ``/admin/public-prefixes`` (admin
keys only: ``public``).

A request's token ids are keyed in the caller's scope with the workers' hasher (same model,
adapter, block size, chain scope and deployment key as their block managers: ``auth.hasher``,
checked against each worker's registration), through the public prefixes the workers publish
(``hashing.key_prompt``, as their block managers key them). A request goes to a worker only on a
connection on which the worker proved it is the registered instance (``peer.LinkPool``: proved
once, kept between requests), with that instance's own credential. The router picks the worker. The
front streams the worker's tokens to the client. If the worker fails before it finished (the
connection is refused or cut) the worker is removed and the request goes to another one; tokens
the client already has are skipped by index, so a client sees each token once and exactly one
answer per request (decoding is greedy or seeded, the front choosing a seed for a sampled
request without one, and every worker loads the same weights, so the retried stream continues
the same text). A worker whose waiting queue is full answers 503 with ``Retry-After``: the
request goes to another worker, and when every worker did so the client gets 503 with
``Retry-After``. A tenant is sent only to workers where it holds fewer requests than its seats
(``fairness``: its ``max_share`` of ``--max-num-seqs``), else answered 429, so one tenant never
takes every seat. Errors the caller caused (400/401/404/429) are never retried, and a worker's
other error answers keep their status whatever their body (JSON or plain text). ``stop`` strings
are applied here, on the decoded text: the answer ends before the first one (``finish_reason``
``"stop"``) and the worker's stream is dropped, which aborts the request there.

A worker that is slow is not a failed worker: liveness comes from heartbeats (``pool``), so a
read that times out answers 504 and leaves the worker in the pool; only a refused or cut
connection removes it, until its next heartbeat. Request bodies are bounded (size, JSON nesting
depth, ``max_prompt_tokens``) and parsed, tokenized, hashed and serialized off the event loop
when they are large, so one tenant's huge prompt never stalls another's stream. A client that
goes away closes its generation: the front drops the worker's stream, and the worker stops
decoding within a step (or never starts a request still queued).

Not here: the engine (``worker``), the Redis bookkeeping (``pool``), the wire format (``protocol``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from kvcache.cache import hashing
from kvcache.cache.hashing import Hasher
from kvcache.costs import ENGINE_MAX_NUM_SEQS
from kvcache.errors import AuthError, KVCacheError, ProtocolError, RequestError
from kvcache.model.tokenize import IncrementalDecoder, StopText, Tokenizer, encode_limited
from kvcache.router import Router, RouteRequest
from kvcache.serve import peer, protocol, wire
from kvcache.serve.auth import DeploymentKeys
from kvcache.serve.config import ServeConfig, TenantSpec
from kvcache.serve.fairness import TenantSeats
from kvcache.serve.limits import ConnectionGuard, ConnectionLimits, GuardedRunner, quiet_repeats
from kvcache.serve.metrics import CONTENT_TYPE, ServeMetrics
from kvcache.serve.pool import WorkerPool
from kvcache.serve.public import PublicAdmin, PublicPrefixes

log = logging.getLogger("kvcache.front")
MAX_ATTEMPTS = 4
WAIT_FOR_WORKER_S = 10.0
READ_TIMEOUT_S = 60.0
INLINE_BYTES = 4096  # bodies (and prompts of as many tokens) above this are handled off the loop
_RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)


class HTTPFailure(Exception):
    """An error to answer with ``status`` and an OpenAI error body (``param``: the field to blame;
    ``code``: when more precise than the status's, ``protocol.error_body``; ``retry_after_s``: sent as
    ``Retry-After``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.param, self.code, self.retry_after_s = param, code, retry_after_s


@dataclass(slots=True)
class Step:
    token_id: int
    index: int
    worker_id: str


@dataclass(slots=True)
class Outcome:
    """What the client is told in ``usage`` and what the metrics record, filled while streaming."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    worker_id: str = ""
    tier_hits: dict[str, int] | None = None
    queue_s: float = 0.0
    prefill_s: float = 0.0
    tier_errors: int = 0
    finish_reason: str = "length"
    public_tokens: int = 0  # of the prompt, in published public blocks (as the front keyed it)


class Front:
    def __init__(
        self,
        *,
        config: ServeConfig,
        router: Router,
        tokenizer: Tokenizer,
        model_name: str,
        redis_url: str | None,
        route_request: type[RouteRequest],
        keys: DeploymentKeys,
        max_prompt_tokens: int | None = None,
        served_names: tuple[str, ...] = (),
        read_timeout_s: float = READ_TIMEOUT_S,
        limits: ConnectionLimits | None = None,
        max_num_seqs: int = ENGINE_MAX_NUM_SEQS,
    ) -> None:
        self.config = config
        self.router = router
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.served_names = {model_name, *served_names}
        self.max_prompt_tokens = max_prompt_tokens
        # A prompt of max_prompt_tokens fits in the body however it is sent (ids or text).
        self.max_body_bytes = max(2**20, 32 * (max_prompt_tokens or 2**19))
        self.read_timeout_s = read_timeout_s
        self.guard = ConnectionGuard(limits or ConnectionLimits())
        self.seats = TenantSeats(max_num_seqs)  # the workers' --max-num-seqs
        self.metrics = ServeMetrics()
        self.keys = keys
        self.pool = WorkerPool(router, self.metrics, redis_url, keys=keys)
        self.route_request = route_request
        self._ids = itertools.count()
        self._hasher: Hasher | None = None
        # Connections to workers, each proven before its first request and kept between requests.
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=read_timeout_s)
        self.links = peer.LinkPool(keys, self.timeout)
        self.public = PublicPrefixes(keys)
        self.admin = PublicAdmin(self.public, config, tokenizer, self.pool, redis_url, self.served_names)
        self.admin.declare(config.public_prefixes)
        self._published: tuple[Hasher, int, hashing.Published] | None = None  # for (hasher, version)

    # ---- dispatch ------------------------------------------------------------------------

    def _keys(self, token_ids: list[int], tenant: TenantSpec) -> hashing.PromptKeys | None:
        """The prompt's block keys as the workers' block managers compute them, public prefixes
        included; None before any worker joined."""
        reg = self.pool.first
        if reg is None:
            return None
        h = self._hasher
        if h is None or (h.model_id, h.adapter_id, h.block_size) != (
            reg.model_id,
            reg.adapter_id,
            reg.block_size,
        ):
            self._hasher = h = self.keys.hasher(
                block_size=reg.block_size, model_id=reg.model_id, adapter_id=reg.adapter_id
            )
        published, version = self._published, self.public.version  # the version before the set
        if published is None or published[0] is not h or published[1] != version:
            index: hashing.Published = {}
            for tokens in self.public.token_lists():
                hashing.publish_prefix(h, hashing.tokens_to_bytes(tokens), index)
            self._published = published = (h, version, index)
        raw = hashing.tokens_to_bytes(token_ids)
        return hashing.key_prompt(h, raw, tenant.scope.chain_scope, published[2])

    async def _wait_for_worker(self) -> None:
        deadline = time.monotonic() + WAIT_FOR_WORKER_S
        while not self.pool.workers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HTTPFailure(503, "no worker is available; retry later")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.pool.changed.wait(), timeout=min(left, 0.25))

    async def generate(
        self,
        request_id: str,
        token_ids: list[int],
        tenant: TenantSpec,
        req: protocol.OpenAIRequest,
        outcome: Outcome,
    ) -> AsyncGenerator[Step, None]:
        """Tokens from whichever worker serves the request, each index once, retried on failure.
        A worker that answers 503 with ``Retry-After`` (its waiting queue is full) is skipped for
        this request; when every worker did, the request is answered 503 with ``Retry-After``.
        Only workers where the tenant holds fewer than its seats are tried (``fairness``); when it
        holds them on every worker, the request is answered 429 with ``Retry-After``."""
        sent = 0
        # A seed of the front's choosing for a sampled request without one: a stream retried on
        # another worker continues the same text.
        request = protocol.worker_request(req, request_id, token_ids, tenant.scope, seed=secrets.randbits(63))
        if len(token_ids) > INLINE_BYTES:  # hashing and serializing a long prompt take milliseconds
            keyed = await asyncio.to_thread(self._keys, token_ids, tenant)
            payload = await asyncio.to_thread(wire.encode_request, request)
        else:
            keyed, payload = self._keys(token_ids, tenant), wire.encode_request(request)
        keys = keyed.keys if keyed is not None else []
        if keyed is not None and self._hasher is not None:
            outcome.public_tokens = keyed.num_public_blocks * self._hasher.block_size
        busy: dict[str, str] = {}  # workers that answered 503 + Retry-After -> its value
        failures = 0
        while failures < MAX_ATTEMPTS:
            await self._wait_for_worker()
            free = [w for w in self.pool.workers if w not in busy]
            if not free:
                retry = max(busy.values(), key=lambda v: float(v) if v.replace(".", "", 1).isdigit() else 0.0)
                raise HTTPFailure(
                    503,
                    f"all {len(busy)} workers have full waiting queues; retry after {retry} s",
                    retry_after_s=retry,
                )
            free = [w for w in free if self.seats.has_room(tenant, w)]
            if not free:
                share, seats, of = tenant.max_share, self.seats.seats(tenant), self.seats.max_num_seqs
                raise HTTPFailure(
                    429,
                    f"tenant {tenant.name!r} has {seats} request(s) in flight on each "
                    f"worker it may use, its share ({share:g} of {of} seats per worker); "
                    "retry when one ends",
                    retry_after_s="1",
                )
            route = self.route_request(
                request_id, keys, len(token_ids), tenant.scope.chain_scope, req.max_tokens
            )
            worker_id = self.router.route(route)
            if worker_id not in free:  # the router and the pool disagree for a moment, or it is full
                worker_id = min(free, key=self._reported_load)
            reg = self.pool.workers[worker_id].reg
            self.seats.take(tenant.name, worker_id)
            try:
                link = self.links.link(reg.url, (worker_id, reg.instance))
                async with link as worker, contextlib.aclosing(peer.generate(worker, payload)) as lines:
                    async for line in lines:
                        if line.done:
                            outcome.finish_reason = line.finish_reason or "length"
                            return
                        assert line.token_id is not None and line.index is not None  # wire checks it
                        if line.index == 0:
                            outcome.prompt_tokens = line.prompt_tokens or 0
                            outcome.cached_tokens = line.cached_tokens or 0
                            outcome.tier_hits = line.tier_hits
                            outcome.queue_s = line.queue_s or 0.0
                            outcome.prefill_s = line.prefill_s or 0.0
                            outcome.tier_errors = line.tier_errors or 0
                            outcome.worker_id = worker_id
                        if line.index < sent:
                            continue  # the client has it from the failed worker
                        sent += 1
                        yield Step(line.token_id, line.index, worker_id)
            except peer.WorkerRefused as exc:
                if exc.status == 503 and exc.retry_after is not None and not exc.in_band:
                    busy[worker_id] = exc.retry_after  # its waiting queue is full: try another
                    self.metrics.busy.inc()
                    continue
                # The worker is alive and refused this request (before its first token, or in-band
                # after some, e.g. quota reached while decoding): answer, never retry.
                raise HTTPFailure(exc.status, exc.detail) from None
            except aiohttp.ConnectionTimeoutError as exc:  # could not connect: as good as refused
                failures += 1
                self._failed(worker_id, reg.instance, request_id, exc)
                await self.links.forget(reg.url, (worker_id, reg.instance))
            except TimeoutError as exc:  # connected, then silent: slow is not dead, it stays
                raise HTTPFailure(
                    504, f"worker {worker_id} sent nothing for {self.read_timeout_s:g} s; retry later"
                ) from exc
            except _RETRYABLE as exc:
                failures += 1
                self._failed(worker_id, reg.instance, request_id, exc)
                await self.links.forget(reg.url, (worker_id, reg.instance))
            finally:
                self.seats.give(tenant.name, worker_id)
                with contextlib.suppress(RequestError):  # already gone if its worker was removed
                    self.router.on_finished(request_id)
        raise HTTPFailure(503, f"request failed on {MAX_ATTEMPTS} workers; retry later", retry_after_s="1")

    def _reported_load(self, worker_id: str) -> tuple[int, int]:
        """A worker's waiting and running requests as it last reported them (0 when unknown)."""
        state = self.pool.workers.get(worker_id)
        load = state.load if state is not None else None
        return (load.num_waiting, load.num_running) if load is not None else (0, 0)

    def _failed(self, worker_id: str, instance: str, request_id: str, exc: BaseException) -> None:
        log.warning(
            "worker %s failed on %s (%s); retrying elsewhere", worker_id, request_id, type(exc).__name__
        )
        self.pool.mark_down(worker_id, instance, failed=True)
        self.metrics.retries.inc()

    # ---- HTTP ----------------------------------------------------------------------------

    def _error(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: str | None = None,
    ) -> web.Response:
        self.metrics.requests.labels(str(status)).inc()
        headers = {"Retry-After": retry_after_s} if retry_after_s is not None else None
        return protocol.error_response(message, status=status, param=param, code=code, headers=headers)

    def _fail(self, exc: HTTPFailure) -> web.Response:
        return self._error(exc.status, exc.message, exc.param, exc.code, exc.retry_after_s)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    def _parse(
        self, raw: bytes, chat: bool, vocab_size: int | None
    ) -> tuple[protocol.OpenAIRequest, list[int]]:
        """Body bytes to a request and its prompt ids; every input error is an ``HTTPFailure(400)``."""
        try:
            body = protocol.loads(raw)
            if chat:
                req = protocol.parse_chat(body)
            else:
                req = protocol.parse_completion(body, self.max_prompt_tokens)
            if req.messages is not None:
                token_ids = self.tokenizer.encode_chat(req.messages)
                protocol.check_prompt_tokens(len(token_ids), self.max_prompt_tokens)
            elif req.text is not None:
                token_ids = encode_limited(self.tokenizer, req.text, self.max_prompt_tokens)
            else:
                assert req.token_ids is not None
                token_ids = req.token_ids
        except ProtocolError as exc:
            raise HTTPFailure(400, str(exc), param=exc.param) from exc
        except (KVCacheError, ValueError, TypeError, UnicodeError, RecursionError) as exc:
            raise HTTPFailure(400, f"the prompt cannot be tokenized: {exc}") from exc
        if not token_ids:
            raise HTTPFailure(400, "the prompt encodes to no tokens; send some text")
        top = max(token_ids)
        if vocab_size is not None and top >= vocab_size:
            raise HTTPFailure(400, f"token id {top} is not below the model's vocab_size {vocab_size}")
        return req, token_ids

    async def _read(self, request: web.Request, chat: bool) -> tuple[protocol.OpenAIRequest, list[int]]:
        timeout_s = self.guard.limits.body_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                raw = await request.read()
        except TimeoutError as exc:
            raise HTTPFailure(408, f"the body did not arrive within {timeout_s:g} s", code="timeout") from exc
        except web.HTTPRequestEntityTooLarge as exc:
            raise HTTPFailure(
                413, f"the body is larger than {self.max_body_bytes} bytes; shorten the prompt"
            ) from exc
        reg = self.pool.first
        vocab_size = reg.vocab_size if reg is not None else None
        if len(raw) > INLINE_BYTES:
            return await asyncio.to_thread(self._parse, raw, chat, vocab_size)
        return self._parse(raw, chat, vocab_size)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        received = time.monotonic()
        try:
            tenant = self.config.authenticate(request.headers.get("Authorization"))
        except AuthError as exc:
            return self._error(401, str(exc))
        try:
            req, token_ids = await self._read(request, chat)
        except HTTPFailure as exc:
            return self._fail(exc)
        if req.model is not None and req.model not in self.served_names:
            return self._error(
                404,
                f"model {req.model!r} is not served here; use {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        prefix = "chatcmpl" if chat else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        outcome = Outcome()
        decoder = IncrementalDecoder(self.tokenizer)
        stops = StopText(req.stop)
        response: web.StreamResponse | None = None
        text_parts: list[str] = []
        num_out = 0
        last = received
        # Closing the generator on every way out (a client gone, a cancelled handler, a stop string)
        # drops the worker's stream, which is what stops the generation there.
        async with contextlib.aclosing(self.generate(request_id, token_ids, tenant, req, outcome)) as steps:
            try:
                async for step in steps:
                    now = time.monotonic()
                    if num_out == 0:
                        self.metrics.ttft.labels(step.worker_id).observe(now - received)
                        if req.stream:
                            response = web.StreamResponse(
                                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                            )
                            await response.prepare(request)
                    else:
                        self.metrics.itl.labels(step.worker_id).observe(now - last)
                    last = now
                    num_out += 1
                    delta = stops.push(decoder.push(step.token_id))
                    if response is not None:
                        chunk = protocol.chunk(
                            req,
                            request_id=request_id,
                            model=self.model_name,
                            created=created,
                            text=delta,
                            first=num_out == 1,
                        )
                        await response.write(protocol.sse(chunk))
                    else:
                        text_parts.append(delta)
                    if stops.stopped:
                        outcome.finish_reason = "stop"
                        break
            except HTTPFailure as exc:
                if response is None:
                    return self._fail(exc)
                error = protocol.error_body(exc.message, status=exc.status, param=exc.param, code=exc.code)
                await response.write(protocol.sse(error))
                await response.write_eof()
                return response
            except ConnectionResetError:  # the client went away mid-stream
                log.info("client of %s went away after %d tokens; generation stopped", request_id, num_out)
                return response if response is not None else web.Response(status=499)  # nobody reads it
        tail = "" if stops.stopped else stops.push(decoder.flush())
        tail += "" if stops.stopped else stops.flush()
        if stops.stopped:
            outcome.finish_reason = "stop"
        usage = protocol.usage(outcome.prompt_tokens, num_out, outcome.cached_tokens)
        self._record(tenant, outcome, received)
        if response is None:
            body = protocol.response(
                req,
                request_id=request_id,
                model=self.model_name,
                created=created,
                text="".join(text_parts) + tail,
                finish_reason=outcome.finish_reason,
                usage_=usage,
            )
            return web.json_response(body)
        end = protocol.stream_end(
            req,
            request_id=request_id,
            model=self.model_name,
            created=created,
            text=tail,
            finish_reason=outcome.finish_reason,
            usage_=usage,
        )
        await response.write(end)
        await response.write_eof()
        return response

    def _record(self, tenant: TenantSpec, outcome: Outcome, received: float) -> None:
        m = self.metrics
        m.requests.labels("200").inc()
        m.e2e.labels(outcome.worker_id).observe(time.monotonic() - received)
        m.queue.labels(outcome.worker_id).observe(outcome.queue_s)
        m.record_cache(
            outcome.worker_id,
            tenant.name,
            outcome.prompt_tokens,
            outcome.tier_hits or {"device": outcome.cached_tokens},
        )
        if outcome.tier_errors:
            m.tier_errors.labels(outcome.worker_id).inc(outcome.tier_errors)
        m.record_public(outcome.worker_id, outcome.public_tokens, outcome.cached_tokens)

    async def models(self, request: web.Request) -> web.Response:
        try:
            self.config.authenticate(request.headers.get("Authorization"))
        except AuthError as exc:
            return self._error(401, str(exc))
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "kvcache"}],
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        status = 200 if self.pool.workers else 503
        body = {"workers": len(self.pool.workers), "redis": self.pool.redis_up}
        return web.json_response(body, status=status)

    async def prometheus(self, request: web.Request) -> web.Response:
        """Aggregate series for anyone; per-tenant series only with an admin key (``admin_keys``)."""
        admin = self.config.is_admin(request.headers.get("Authorization"))
        body = self.metrics.render(per_tenant=admin)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def debug_workers(self, request: web.Request) -> web.Response:
        """Each worker's address and what this front believes of it: the blocks its router indexes,
        the requests it routed there and has not seen finish (``active_requests``) and the running
        and waiting ones the worker last reported, every front's (``reported_requests``)."""
        if request.remote not in ("127.0.0.1", "::1"):  # internal addresses: operators on the host only
            return self._error(403, "/debug/workers answers loopback clients only")
        out = {}
        for wid, s in self.pool.workers.items():
            active, reported = self.router.request_counts(wid)
            out[wid] = {
                "url": s.reg.url,
                "pid": s.reg.pid,
                "instance": s.reg.instance,
                "indexed_blocks": self.pool.num_indexed(wid),
                "active_requests": active,
                "reported_requests": reported,
            }
        return web.json_response(out)

    # ---- lifecycle -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.max_body_bytes, middlewares=[self.guard.middleware, protocol.json_errors]
        )
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/debug/workers", self.debug_workers)
        self.admin.routes(app)
        app.cleanup_ctx.append(self._background)
        return app

    def runner(self) -> web.AppRunner:
        """The app's runner. A client that disconnects cancels its handler (``handler_cancellation``),
        which closes its generation, streamed or not. On shutdown, requests in flight get
        ``wire.SHUTDOWN_GRACE_S`` to finish, then are cancelled (aiohttp's default waits 60 s).
        Its connections are held to ``limits`` (header time, connections in all and per address)."""
        return GuardedRunner(
            self.app(),
            self.guard,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=wire.SHUTDOWN_GRACE_S,
        )

    async def _background(self, app: web.Application) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(self.pool.run()),
            asyncio.create_task(self.public.run(self.pool.redis_url)),
        ]
        with quiet_repeats():  # a flood of failing connections writes a few lines, not one each
            yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.links.close()
