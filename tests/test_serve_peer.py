"""Proven links to workers (``serve.peer``): nothing is sent before the proof, nothing on another
connection than the proven one, and kept links re-prove a connection that closed meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from deployment import KEYS

from kvcache.serve import peer

TIMEOUT = aiohttp.ClientTimeout(total=30)
W0 = ("w0", "i0")


class Worker:
    """Answers the challenge as ``identity`` and counts what it is sent, by connection."""

    def __init__(
        self,
        identity: tuple[str, str] = W0,
        close_after_hello: bool = False,
        close_after_generate: bool = False,
    ) -> None:
        self.identity = identity
        self.close_after_hello, self.close_after_generate = close_after_hello, close_after_generate
        self.seen: list[tuple[str, int]] = []  # (path, id of the connection's transport)

    def _note(self, request: web.Request) -> None:
        self.seen.append((request.path, id(request.transport)))

    async def hello(self, request: web.Request) -> web.Response:
        self._note(request)
        proof = KEYS.hello_proof(*self.identity, bytes.fromhex(request.headers[peer.CHALLENGE_HEADER]))
        answer = {"worker_id": self.identity[0], "instance": self.identity[1], "proof": proof}
        return web.json_response(answer, headers={"Connection": "close"} if self.close_after_hello else None)

    async def generate(self, request: web.Request) -> web.Response:
        self._note(request)
        assert KEYS.check_worker_call(request.headers.get("Authorization"), *self.identity) is None
        headers = {"Connection": "close"} if self.close_after_generate else None
        return web.json_response({"ok": True}, headers=headers)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(peer.HELLO_PATH, self.hello)
        app.router.add_post("/generate", self.generate)
        return app


def run(worker: Worker, scenario: Callable[[str], Awaitable[None]]) -> None:
    async def main() -> None:
        async with TestServer(worker.app()) as server:
            await asyncio.wait_for(scenario(str(server.make_url("")).rstrip("/")), 60)

    asyncio.run(main())


async def generate(pool: peer.LinkPool, url: str, expect: tuple[str, str] = W0) -> Any:
    async with pool.link(url, expect) as link, link.post("/generate", json={}) as resp:
        return await resp.json()


def test_a_kept_link_serves_later_requests_on_the_connection_it_proved() -> None:
    worker = Worker()

    async def scenario(url: str) -> None:
        pool = peer.LinkPool(KEYS, TIMEOUT)
        for _ in range(3):
            assert await generate(pool, url) == {"ok": True}
        await pool.close()
        paths = [path for path, _ in worker.seen]
        assert paths == ["/hello", "/generate", "/generate", "/generate"]  # one proof, then reuse
        assert len({conn for _, conn in worker.seen}) == 1

    run(worker, scenario)


def test_a_kept_link_whose_connection_closed_proves_a_new_one_first() -> None:
    worker = Worker(close_after_generate=True)  # as a keep-alive timeout (or a dead worker) would

    async def scenario(url: str) -> None:
        pool = peer.LinkPool(KEYS, TIMEOUT)
        for _ in range(2):
            assert await generate(pool, url) == {"ok": True}
        await pool.close()
        assert [path for path, _ in worker.seen] == ["/hello", "/generate", "/hello", "/generate"]
        (first, _, second, _) = (conn for _, conn in worker.seen)
        assert [conn for path, conn in worker.seen if path == "/generate"] == [first, second]

    run(worker, scenario)


def test_nothing_is_sent_on_a_connection_that_was_not_proved() -> None:
    worker = Worker(close_after_hello=True)  # proves itself, then the proven connection is gone

    async def scenario(url: str) -> None:
        pool = peer.LinkPool(KEYS, TIMEOUT)
        with pytest.raises(peer.UnprovenWorker, match="closed the connection it had just proved"):
            await generate(pool, url)
        await pool.close()
        assert [path for path, _ in worker.seen] == ["/hello", "/hello"]  # no /generate, ever

    run(worker, scenario)


def test_another_worker_or_instance_at_the_address_gets_no_request() -> None:
    worker = Worker(identity=("w0", "i1"))  # w0 restarted: a new instance where the old one was

    async def scenario(url: str) -> None:
        pool = peer.LinkPool(KEYS, TIMEOUT)
        with pytest.raises(peer.UnprovenWorker, match=r"worker w0 \(instance i0\) was expected"):
            await generate(pool, url)
        assert await generate(pool, url, ("w0", "i1")) == {"ok": True}
        await pool.close()
        assert [path for path, _ in worker.seen] == ["/hello", "/hello", "/generate"]

    run(worker, scenario)


def test_links_kept_too_long_are_closed() -> None:
    worker = Worker()
    now = [0.0]

    async def scenario(url: str) -> None:
        pool = peer.LinkPool(KEYS, TIMEOUT, max_idle_s=30.0, clock=lambda: now[0])
        assert await generate(pool, url) == {"ok": True}
        assert [len(links) for links in pool.idle.values()] == [1]
        now[0] = 31.0
        assert await generate(pool, url) == {"ok": True}  # the kept one was too old: a new proof
        assert [path for path, _ in worker.seen] == ["/hello", "/generate", "/hello", "/generate"]
        now[0] = 62.0
        await pool._sweep()
        assert pool.idle == {}

    run(worker, scenario)


def test_a_listener_that_closes_before_answering_the_challenge_is_a_failed_worker() -> None:
    """A worker dying as it is challenged: aiohttp retries the challenge on a second connection,
    which the link refuses; the caller gets ``UnprovenWorker`` (a connection error it retries
    elsewhere), and the listener saw one connection and nothing on it."""
    accepted = []

    async def main() -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(await reader.read(1))
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(peer.UnprovenWorker, match="closed the connection before answering"):
                await peer.WorkerLink(f"http://127.0.0.1:{port}", KEYS, TIMEOUT, W0).prove()

    asyncio.run(main())
    assert len(accepted) == 1
