"""A connection to a worker that has proved who it is, before anything is sent to it.

A worker's address comes from its signed registration, but whatever listens at that address now
may not be that worker: it may have died and something else bound its port. So every request to
a worker starts with a challenge on a fresh connection::

    GET /hello   X-Kvcache-Challenge: <16 random bytes, hex>
    <- {"worker_id", "instance", "proof": MAC(instance key, "hello", challenge)}

and only when the proof verifies (``auth.DeploymentKeys.check_hello``: the instance key is derived
from the deployment secret, the worker id and the instance id, so nothing else can answer) does
the request go out, with that instance's credential, **on the same connection**: a link's
session holds one connection and never sends on another, so there is no moment at which the
request could reach another listener. A listener that answers wrongly, closes the connection
first, or does not answer within ``HELLO_TIMEOUT_S``, raises :class:`UnprovenWorker` (a
connection error: the front counts that worker as failed and retries elsewhere) and has received
no prompt, tenant name or credential.

A proven connection stays proven while it lives, so :class:`LinkPool` keeps links between
requests (the role of an HTTP client's connection pool), per worker instance. When a kept
link's connection has closed meanwhile (the worker's keep-alive timeout, or the worker died),
nothing is sent: the link proves a new connection first, once; if that fails too the caller
gets ``UnprovenWorker``.

This is the ordering mutual TLS gives (the server proves its key before the client sends a
byte), done with the keys the deployment already has; it does not encrypt, so it protects
against someone who takes a worker's address, not against someone who reads the network
(docs/serve.md, "Threat model").

``generate`` is the one client of a worker's ``POST /generate`` (``wire.GenerateRequest`` in,
``wire.GenerateLine`` records out), used by the front and by ``kvcache route``: a refusal is a
:class:`WorkerRefused` with the worker's status and reason, a broken stream an aiohttp payload
error (the caller may retry it elsewhere).

Not here: the keys (``auth``), what is sent and what it is answered with (``front``, ``vllm.proxy``).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
import types
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp

from kvcache.errors import AuthError, KVCacheError, ProtocolError
from kvcache.serve import wire
from kvcache.serve.auth import DeploymentKeys

CHALLENGE_HEADER = "X-Kvcache-Challenge"
CHALLENGE_BYTES = 16
HELLO_PATH = "/hello"
HELLO_TIMEOUT_S = 5.0  # a worker answers from its event loop at once; its engine runs elsewhere
MAX_HELLO_BYTES = 1024


class UnprovenWorker(aiohttp.ServerConnectionError):
    """What listens at a worker's address did not prove it is that worker (or any of ours)."""


class WorkerRefused(KVCacheError):
    """The worker is alive and refused the request: ``status`` is its HTTP status (400 bad input,
    429 quota, 503 full), ``detail`` its reason, ``retry_after`` its ``Retry-After`` (a full
    waiting queue) or None. Before the first token or in-band after some (``in_band``)."""

    def __init__(
        self, status: int, detail: str, retry_after: str | None = None, in_band: bool = False
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after, self.in_band = status, detail, retry_after, in_band


def refusal_detail(status: int, text: str) -> str:
    """A worker's non-200 answer as one line, whether its body is JSON or not."""
    try:
        detail = json.loads(text).get("error")
    except (ValueError, AttributeError):
        detail = None
    if not isinstance(detail, str) or not detail:
        detail = text.strip()[:300] or f"worker answered HTTP {status}"
    return detail


async def generate(
    link: WorkerLink, request: wire.GenerateRequest | bytes
) -> AsyncGenerator[wire.GenerateLine, None]:
    """The worker's answer to ``request`` (or its encoding), line by line, ending with the
    ``done`` line. ``WorkerRefused`` for a refusal (before the first token or in-band after some),
    ``aiohttp.ClientPayloadError`` for a malformed line or a stream that ends before ``done``."""
    payload = request if isinstance(request, bytes) else wire.encode_request(request)
    async with link.post("/generate", data=payload, headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            retry_after = resp.headers.get("Retry-After")
            text = await resp.text(errors="replace")
            raise WorkerRefused(
                resp.status, refusal_detail(resp.status, text), retry_after and retry_after[:16]
            )
        async for raw in resp.content:
            try:
                line = wire.decode_line(raw)
            except ProtocolError as exc:
                raise aiohttp.ClientPayloadError(str(exc)) from None
            if line.error is not None:
                assert line.status is not None  # decode_line checks it
                raise WorkerRefused(line.status, line.error, in_band=True)
            yield line
            if line.done:
                return
    raise aiohttp.ClientPayloadError("worker stream ended early")


class _Unproven(Exception):
    """A session tried to open a second connection: nothing was sent on it."""


def _one_connection() -> aiohttp.TraceConfig:
    """Trace hooks for one session, which may then open one connection only: the one it proves."""
    trace = aiohttp.TraceConfig()
    opened = 0

    async def on_create(session: aiohttp.ClientSession, context: types.SimpleNamespace, params: Any) -> None:
        nonlocal opened
        if opened:
            raise _Unproven("the proven connection closed; a new one would be unproven")
        opened += 1

    trace.on_connection_create_start.append(on_create)
    return trace


class WorkerLink:
    """Proven connections to one worker instance, one at a time; ``post`` sends on the current one."""

    def __init__(
        self, url: str, keys: DeploymentKeys, timeout: aiohttp.ClientTimeout, expect: tuple[str, str] | None
    ) -> None:
        self.url, self.keys, self.timeout, self.expect = url, keys, timeout, expect
        self.session: aiohttp.ClientSession | None = None
        self.worker_id = self.instance = ""
        self.headers: dict[str, str] = {}

    async def prove(self) -> None:
        """A new connection, and the challenge on it; ``UnprovenWorker`` unless the answer verifies."""
        await self.close()
        connector = aiohttp.TCPConnector(limit=1)
        self.session = session = aiohttp.ClientSession(
            timeout=self.timeout, connector=connector, trace_configs=[_one_connection()]
        )
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        try:
            hello = session.get(
                self.url + HELLO_PATH,
                headers={CHALLENGE_HEADER: challenge.hex()},
                timeout=aiohttp.ClientTimeout(total=HELLO_TIMEOUT_S),
            )
            async with hello as resp:
                raw = await resp.content.read(MAX_HELLO_BYTES)
                if resp.status != 200:
                    raise AuthError(f"HTTP {resp.status} to the challenge")
            self.worker_id, self.instance = self.keys.check_hello(raw, challenge, self.expect)
        except TimeoutError as exc:
            await self.close()
            silent = f"{self.url} did not answer the challenge within {HELLO_TIMEOUT_S:g} s"
            raise UnprovenWorker(silent) from exc
        except AuthError as exc:
            await self.close()
            raise UnprovenWorker(f"{self.url}: {exc}") from None
        except _Unproven as exc:  # closed before answering, and aiohttp tried a second connection
            await self.close()
            raise UnprovenWorker(f"{self.url} closed the connection before answering the challenge") from exc
        except BaseException:
            await self.close()
            raise
        self.headers = self.keys.call_headers(self.worker_id, self.instance)

    @contextlib.asynccontextmanager
    async def post(self, path: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        """``session.post`` on the proven connection, with the instance's credential. If that
        connection closed since it was proved, one new connection is proved first (nothing was sent)."""
        headers = {**kwargs.pop("headers", {})}
        for attempt in (1, 2):
            if self.session is None:
                await self.prove()
            assert self.session is not None
            try:
                resp = await self.session.post(self.url + path, headers={**headers, **self.headers}, **kwargs)
                break
            except _Unproven as exc:
                if attempt == 2:
                    raise UnprovenWorker(f"{self.url} closed the connection it had just proved") from exc
                await self.close()
        async with resp:
            yield resp

    async def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()


@contextlib.asynccontextmanager
async def connect(
    url: str, keys: DeploymentKeys, *, timeout: aiohttp.ClientTimeout, expect: tuple[str, str] | None = None
) -> AsyncIterator[WorkerLink]:
    """A link to the worker at ``url`` once it proved it is ``expect`` (worker id, instance), or any
    worker of this deployment when ``expect`` is None (``UnprovenWorker`` otherwise); closed after."""
    link = WorkerLink(url, keys, timeout, expect)
    await link.prove()
    try:
        yield link
    finally:
        await link.close()


Opener = Callable[[str], AbstractAsyncContextManager[WorkerLink]]


def opener(keys: DeploymentKeys, timeout: aiohttp.ClientTimeout) -> Opener:
    """``connect`` for callers that know a worker by address only (``kvcache route``): any worker of
    this deployment that proves itself there is accepted."""

    def open_link(url: str) -> AbstractAsyncContextManager[WorkerLink]:
        return connect(url, keys, timeout=timeout)

    return open_link


class LinkPool:
    """Proven links kept between requests, per (address, worker instance): a link goes back to the
    pool only after a request that ended cleanly, at most ``max_idle`` per instance and for at most
    ``max_idle_s`` (below aiohttp's 75 s keep-alive, so a kept connection is rarely closed under it)."""

    def __init__(
        self,
        keys: DeploymentKeys,
        timeout: aiohttp.ClientTimeout,
        *,
        max_idle: int = 32,
        max_idle_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys, self.timeout, self.max_idle, self.max_idle_s = keys, timeout, max_idle, max_idle_s
        self.clock = clock
        self.idle: dict[tuple[str, str, str], list[tuple[WorkerLink, float]]] = {}  # newest last
        self._swept = clock()

    @contextlib.asynccontextmanager
    async def link(self, url: str, expect: tuple[str, str]) -> AsyncIterator[WorkerLink]:
        if self.clock() - self._swept > self.max_idle_s:
            await self._sweep()
        key = (url, *expect)
        idle = self.idle.setdefault(key, [])
        link = None
        while idle and link is None:
            kept, since = idle.pop()
            if self.clock() - since <= self.max_idle_s:
                link = kept
            else:
                await kept.close()
        if link is None:
            link = WorkerLink(url, self.keys, self.timeout, expect)
            await link.prove()
        clean = False
        try:
            yield link
            clean = True
        finally:
            if clean and link.session is not None and len(idle) < self.max_idle:
                idle.append((link, self.clock()))
            else:
                await link.close()
            if not idle:
                self.idle.pop(key, None)

    async def _sweep(self) -> None:
        """Close links kept too long, whoever they lead to (instances that left are never asked for)."""
        self._swept = now = self.clock()
        for key in list(self.idle):
            fresh = [(link, since) for link, since in self.idle[key] if now - since <= self.max_idle_s]
            for link, since in self.idle[key]:
                if now - since > self.max_idle_s:
                    await link.close()
            if fresh:
                self.idle[key] = fresh
            else:
                del self.idle[key]

    async def forget(self, url: str, expect: tuple[str, str]) -> None:
        """Close the kept links of one worker instance (it failed or left)."""
        for link, _ in self.idle.pop((url, *expect), []):
            await link.close()

    async def close(self) -> None:
        for key in list(self.idle):
            for link, _ in self.idle.pop(key):
                await link.close()
