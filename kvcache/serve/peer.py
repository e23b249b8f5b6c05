"""A connection to a worker that has proved who it is, before anything is sent to it.

A worker's address comes from its signed registration, but whatever listens at that address now
may not be that worker: it may have died and something else bound its port. So every request to
a worker starts with a challenge on a fresh connection::

    GET /hello   X-Kvcache-Challenge: <16 random bytes, hex>
    <- {"worker_id", "instance", "proof": MAC(instance key, "hello", challenge)}

and only when the proof verifies (``auth.DeploymentKeys.check_hello``: the instance key is derived
from the deployment secret, the worker id and the instance id, so nothing else can answer) does
the request go out, with that instance's credential, **on the same connection**: the link's
session holds one connection and refuses to open a second one, so there is no moment at which
the request could reach another listener. A listener that answers wrongly, not at all within
``HELLO_TIMEOUT_S``, or closes the connection, raises :class:`UnprovenWorker` (a connection
error: the front counts that worker as failed and retries elsewhere) and has received no
prompt, tenant name or credential.

This is the ordering mutual TLS gives (the server proves its key before the client sends a
byte), done with the keys the deployment already has; it does not encrypt, so it protects
against someone who takes a worker's address, not against someone who reads the network
(docs/serve.md, "Threat model").

Not here: the keys (``auth``), what is sent (``front``, ``router.proxy``).
"""

from __future__ import annotations

import contextlib
import secrets
import types
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvcache.errors import AuthError
from kvcache.serve.auth import DeploymentKeys

CHALLENGE_HEADER = "X-Kvcache-Challenge"
CHALLENGE_BYTES = 16
HELLO_PATH = "/hello"
HELLO_TIMEOUT_S = 5.0  # a worker answers from its event loop at once; its engine runs elsewhere
MAX_HELLO_BYTES = 1024


class UnprovenWorker(aiohttp.ServerConnectionError):
    """What listens at a worker's address did not prove it is that worker (or any of ours)."""


@dataclass(slots=True)
class WorkerLink:
    """One proven connection to one worker instance; ``post`` sends on it with its credential."""

    session: aiohttp.ClientSession
    url: str
    worker_id: str
    instance: str
    headers: dict[str, str]

    def post(self, path: str, **kwargs: Any) -> Any:
        headers = {**kwargs.pop("headers", {}), **self.headers}
        return self.session.post(self.url + path, headers=headers, **kwargs)


def _one_connection() -> aiohttp.TraceConfig:
    """Trace hooks for one session, which may then open one connection only: the one it proves."""
    trace = aiohttp.TraceConfig()
    opened = 0

    async def on_create(session: aiohttp.ClientSession, context: types.SimpleNamespace, params: Any) -> None:
        nonlocal opened
        if opened:
            raise UnprovenWorker("the proven connection to the worker closed; a new one would be unproven")
        opened += 1

    trace.on_connection_create_start.append(on_create)
    return trace


@contextlib.asynccontextmanager
async def connect(url: str, keys: DeploymentKeys, *, timeout: aiohttp.ClientTimeout,
                  expect: tuple[str, str] | None = None) -> AsyncIterator[WorkerLink]:  # fmt: skip
    """A link to the worker at ``url`` once it proved it is ``expect`` (worker id, instance), or any
    worker of this deployment when ``expect`` is None; ``UnprovenWorker`` otherwise."""
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                     trace_configs=[_one_connection()]) as session:  # fmt: skip
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        try:
            hello = session.get(url + HELLO_PATH, headers={CHALLENGE_HEADER: challenge.hex()},
                                timeout=aiohttp.ClientTimeout(total=HELLO_TIMEOUT_S))  # fmt: skip
            async with hello as resp:
                raw = await resp.content.read(MAX_HELLO_BYTES)
                status = resp.status
        except TimeoutError as exc:
            raise UnprovenWorker(f"{url} did not answer the challenge within {HELLO_TIMEOUT_S:g} s") from exc
        try:
            if status != 200:
                raise AuthError(f"HTTP {status} to the challenge")
            worker_id, instance = keys.check_hello(raw, challenge, expect)
        except AuthError as exc:
            raise UnprovenWorker(f"{url}: {exc}") from None
        yield WorkerLink(session, url, worker_id, instance, keys.call_headers(worker_id, instance))


Opener = Callable[[str], AbstractAsyncContextManager[WorkerLink]]


def opener(keys: DeploymentKeys, timeout: aiohttp.ClientTimeout) -> Opener:
    """``connect`` for callers that know a worker by address only (``kvcache route``): any worker of
    this deployment that proves itself there is accepted."""

    def open_link(url: str) -> AbstractAsyncContextManager[WorkerLink]:
        return connect(url, keys, timeout=timeout)

    return open_link
