"""The front over HTTP against a scripted in-process worker: input errors, worker errors, limits,
disconnects, slow workers and the metrics page, without starting processes or Redis."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from deployment import KEYS, registration
from hf_tokenizers import wordpiece

from kvcache.model.tokenize import ByteTokenizer, HFTokenizer, Tokenizer
from kvcache.router import Router, RouteRequest
from kvcache.serve import peer
from kvcache.serve.config import ServeConfig
from kvcache.serve.front import Front

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ScriptedWorker:
    """A worker whose ``/generate`` runs ``handler``; ``streamed`` counts token lines it wrote and
    ``gone`` is set when a write fails because the front dropped the connection."""

    def __init__(
        self,
        handler: Handler | None = None,
        delay_s: float = 0.0,
        token_ids: list[int] | None = None,
        identity: tuple[str, str] = ("w0", "i0"),
    ) -> None:
        self.handler = handler or self.tokens
        self.identity = identity  # (worker id, instance) it proves and whose credential it takes
        self.delay_s = delay_s
        self.token_ids = token_ids or [97 + i for i in range(26)]  # answers cycle through these
        self.streamed = 0
        self.gone = asyncio.Event()
        self.bodies: list[dict[str, Any]] = []

    async def tokens(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            for index in range(body["max_tokens"]):
                token_id = self.token_ids[index % len(self.token_ids)]
                line: dict[str, Any] = {"token_id": token_id, "index": index}
                if index == 0:
                    line.update(
                        prompt_tokens=len(body["token_ids"]),
                        cached_tokens=0,
                        tier_hits={"device": 0},
                        queue_s=0.0,
                    )
                await response.write(json.dumps(line).encode() + b"\n")
                self.streamed += 1
                await asyncio.sleep(self.delay_s)
            await response.write(b'{"done": true}\n')
        except (ConnectionResetError, asyncio.CancelledError):
            self.gone.set()
            raise
        return response

    async def generate(self, request: web.Request) -> web.StreamResponse:
        # The front must present this instance's credential, as a real worker requires.
        assert KEYS.check_worker_call(request.headers.get("Authorization"), *self.identity) is None
        return await self.handler(request)

    async def hello(self, request: web.Request) -> web.Response:
        """The challenge every request starts with (``serve.peer``), answered as ``identity``."""
        proof = KEYS.hello_proof(*self.identity, bytes.fromhex(request.headers[peer.CHALLENGE_HEADER]))
        worker_id, instance = self.identity
        return web.json_response({"worker_id": worker_id, "instance": instance, "proof": proof})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_get(peer.HELLO_PATH, self.hello)
        return app


def run_front(
    worker: ScriptedWorker,
    scenario: Callable[[Front, str], Awaitable[None]],
    *,
    config: ServeConfig | None = None,
    tokenizer: Tokenizer | None = None,
    **front_args: Any,
) -> None:
    """Start the worker and a front that knows it, then run ``scenario(front, front_url)``."""

    async def main() -> None:
        wserver = TestServer(worker.app())
        await wserver.start_server(access_log=None)  # as a real worker runs: no access log
        async with wserver:
            front = Front(
                config=config or ServeConfig(),
                router=Router("round_robin", block_size=16),
                tokenizer=tokenizer or ByteTokenizer(1024),
                model_name="tiny",
                redis_url=None,
                route_request=RouteRequest,
                keys=KEYS,
                **front_args,
            )
            url = str(wserver.make_url("")).rstrip("/")
            front.pool.add(registration("w0", url, "i0", model_id="tiny-llama"))
            runner = front.runner()  # as ``kvcache serve`` runs it (TestServer would cancel handlers itself)
            await runner.setup()
            try:
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                port = runner.addresses[0][1]
                await asyncio.wait_for(scenario(front, f"http://127.0.0.1:{port}"), 60)
            finally:
                await runner.cleanup()

    asyncio.run(main())


async def post(
    url: str, body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(url, data=data, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def check_error(got: tuple[int, Any], status: int, needle: str) -> None:
    assert got[0] == status, got
    error = got[1]["error"]
    assert needle in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["type"], str) and (error["code"] is None or isinstance(error["code"], str))


def test_input_errors_are_400_with_an_openai_error_body() -> None:
    async def scenario(front: Front, url: str) -> None:
        lone = b'{"prompt": "abc\\ud800", "max_tokens": 2}'
        check_error(await post(url + "/v1/completions", raw=lone), 400, "lone surrogate")
        chat = b'{"messages": [{"role": "user", "content": "x\\udfff"}]}'
        check_error(await post(url + "/v1/chat/completions", raw=chat), 400, "messages[0].content")
        deep = await post(url + "/v1/completions", raw=b"[" * 100_000)
        check_error(deep, 400, "nests 100000 levels deep")
        bad = await post(url + "/v1/completions", raw=b'{"prompt": "x"' + b"}" * 3)
        check_error(bad, 400, "not valid JSON")
        assert worker.bodies == []  # nothing reached the worker
        ok = await post(url + "/v1/completions", {"prompt": "fine", "max_tokens": 2, "logit_bias": {}})
        assert ok[0] == 200 and ok[1]["choices"][0]["text"] == "ab"

    worker = ScriptedWorker()
    run_front(worker, scenario)


class EmptyTokenizer(ByteTokenizer):
    def encode(self, text: str) -> list[int]:
        return []


def test_an_empty_encoding_is_400_not_500() -> None:
    async def scenario(front: Front, url: str) -> None:
        check_error(await post(url + "/v1/completions", {"prompt": "\u200b"}), 400, "encodes to no tokens")

    run_front(ScriptedWorker(), scenario, tokenizer=EmptyTokenizer(1024))


def test_worker_errors_keep_their_status_whatever_the_body() -> None:
    answers = iter(
        [
            web.Response(status=413, text="Request Entity Too Large"),
            web.Response(status=500, text="<html>boom</html>", content_type="text/html"),
            web.json_response({"error": "over quota"}, status=429),
            web.Response(status=502),
        ]
    )

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return next(answers)

    async def scenario(front: Front, url: str) -> None:
        body = {"prompt": "hello", "max_tokens": 2}
        check_error(await post(url + "/v1/completions", body), 413, "Request Entity Too Large")
        got = await post(url + "/v1/completions", body)
        check_error(got, 500, "<html>boom</html>")
        assert got[1]["error"]["type"] == "server_error"
        check_error(await post(url + "/v1/completions", body), 429, "over quota")
        check_error(await post(url + "/v1/completions", body), 502, "worker answered HTTP 502")
        assert list(front.pool.workers) == ["w0"]  # an error answer is not a dead worker

    run_front(ScriptedWorker(handler), scenario)


class SpyTokenizer(ByteTokenizer):
    """Records how many characters each ``encode`` call saw and on which thread it ran."""

    def __init__(self) -> None:
        super().__init__(1024)
        self.calls: list[tuple[int, str]] = []

    def encode(self, text: str) -> list[int]:
        self.calls.append((len(text), threading.current_thread().name))
        return super().encode(text)


def test_prompt_token_limit_is_enforced_before_tokenizing_the_rest() -> None:
    spy = SpyTokenizer()

    async def scenario(front: Front, url: str) -> None:
        huge = {"prompt": "y" * 1_000_000, "max_tokens": 2}
        check_error(await post(url + "/v1/completions", huge), 400, "more than 64 tokens")
        assert [n for n, _ in spy.calls] == [16 * 65]  # only the head was tokenized
        assert spy.calls[0][1] != threading.current_thread().name  # off the event loop's thread
        check_error(
            await post(url + "/v1/completions", {"prompt": list(range(1, 66))}),
            400,
            "the prompt has 65 tokens; this server accepts at most 64",
        )
        check_error(await post(url + "/v1/completions", {"prompt": "z" * 65}), 400, "has 65 tokens")
        too_big = await post(url + "/v1/completions", raw=b'{"prompt": "' + b"q" * (2**20 + 1) + b'"}')
        check_error(too_big, 413, f"larger than {2**20} bytes")
        ok = await post(url + "/v1/completions", {"prompt": "z" * 64, "max_tokens": 1})
        assert ok[0] == 200 and ok[1]["usage"]["prompt_tokens"] == 64
        assert worker.bodies[0]["token_ids"] == [ord("z")] * 64

    worker = ScriptedWorker()
    run_front(worker, scenario, tokenizer=spy, max_prompt_tokens=64)


def test_a_client_that_goes_away_stops_the_worker_stream() -> None:
    async def scenario(front: Front, url: str) -> None:
        body = {"prompt": "go", "max_tokens": 4096, "stream": True}
        completions = url + "/v1/completions"
        async with aiohttp.ClientSession() as session, session.post(completions, json=body) as resp:
            assert resp.status == 200
            await resp.content.readline()  # the first event: generation is running
        await asyncio.wait_for(worker.gone.wait(), 30)  # the front dropped the worker's stream
        assert worker.streamed < 4096
        # Not streamed: the client gives up waiting for the whole answer.
        worker.gone.clear()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as session:
            try:
                async with session.post(url + "/v1/completions", json={**body, "stream": False}) as resp:
                    await resp.read()
            except TimeoutError:
                pass
        await asyncio.wait_for(worker.gone.wait(), 30)
        assert worker.streamed < 2 * 4096

    worker = ScriptedWorker(delay_s=0.01)
    run_front(worker, scenario)


def test_a_slow_worker_times_out_with_504_and_stays_in_the_pool() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await request.read()
        await release.wait()  # alive, but says nothing until released
        return web.json_response({"error": "late"}, status=400)

    async def scenario(front: Front, url: str) -> None:
        got = await post(url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        check_error(got, 504, "sent nothing for 0.5 s")
        assert list(front.pool.workers) == ["w0"] and not front.pool.dead_instances
        release.set()

    run_front(ScriptedWorker(slow), scenario, read_timeout_s=0.5)


def test_metrics_name_tenants_only_for_admin_keys() -> None:
    config = ServeConfig.from_dict({"admin_keys": ["sk-admin"], "tenants": {"acme": {"keys": ["sk-acme"]}}})

    async def scenario(front: Front, url: str) -> None:
        acme = {"Authorization": "Bearer sk-acme"}
        got = await post(url + "/v1/completions", {"prompt": "secret", "max_tokens": 1}, headers=acme)
        assert got[0] == 200
        async with aiohttp.ClientSession() as session:
            pages = []
            for headers in ({}, acme, {"Authorization": "Bearer sk-admin"}):
                async with session.get(url + "/metrics", headers=headers) as resp:
                    pages.append(await resp.text())
        public, tenant_view, admin = pages
        for page in (public, tenant_view):
            assert "acme" not in page
            assert 'kvcache:prefix_cache_queries_total{tier="device",worker="w0"} 6.0' in page
        assert 'kvcache:prefix_cache_queries_total{tenant="acme",tier="device",worker="w0"} 6.0' in admin

    run_front(ScriptedWorker(), scenario, config=config)


def test_served_model_names() -> None:
    async def scenario(front: Front, url: str) -> None:
        for name in ("tiny", "alias"):
            got = await post(url + "/v1/completions", {"prompt": "a", "model": name, "max_tokens": 1})
            assert got[0] == 200 and got[1]["model"] == "tiny"
        check_error(await post(url + "/v1/completions", {"prompt": "a", "model": "gpt-9"}), 404, "'gpt-9'")

    run_front(ScriptedWorker(), scenario, served_names=("alias",))


def test_streamed_and_unstreamed_answers_are_the_same_text_with_a_real_tokenizer() -> None:
    tok = HFTokenizer(wordpiece(), "wordpiece")
    answer = tok.encode("it's fine. don't worry")  # decode() would clean "it ' s" up to "it's"

    async def scenario(front: Front, url: str) -> None:
        body = {"prompt": "q", "max_tokens": len(answer)}
        status, whole = await post(url + "/v1/completions", body)
        assert status == 200
        text = whole["choices"][0]["text"]
        streamed, completions = {**body, "stream": True}, url + "/v1/completions"
        async with aiohttp.ClientSession() as session, session.post(completions, json=streamed) as resp:
            events = [
                json.loads(line[6:])
                for line in (await resp.read()).splitlines()
                if line.startswith(b"data: {")
            ]
        assert "".join(e["choices"][0]["text"] for e in events) == text
        assert text.replace(" ", "") == "it'sfine.don'tworry"

    run_front(ScriptedWorker(token_ids=answer), scenario, tokenizer=tok)


def test_a_busy_worker_sends_the_request_elsewhere_and_all_busy_is_503_with_retry_after() -> None:
    async def busy(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": "w1 has 1 waiting request(s)"}, status=503, headers={"Retry-After": "2"}
        )

    worker = ScriptedWorker()

    async def scenario(front: Front, url: str) -> None:
        async with TestServer(ScriptedWorker(busy, identity=("w1", "i1")).app()) as other:
            other_url = str(other.make_url("")).rstrip("/")
            front.pool.add(registration("w1", other_url, "i1", model_id="tiny-llama"))
            # Round robin turns at every pick, the retries' too: requests 2, 3 and 4 try w1 first.
            for _ in range(4):
                status, body = await post(url + "/v1/completions", {"prompt": "hi", "max_tokens": 3})
                assert status == 200 and body["choices"][0]["text"] == "abc"
            assert len(worker.bodies) == 4 and front.metrics.value("kvcache:worker_busy_answers_total") == 3
            worker.handler = busy
            ask, path = {"prompt": "x"}, url + "/v1/completions"
            async with aiohttp.ClientSession() as session, session.post(path, json=ask) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "2"
                error = (await resp.json())["error"]
            assert (
                error["code"] == "service_unavailable"
                and "all 2 workers have full waiting queues" in (error["message"])
            )

    run_front(worker, scenario)


def test_a_stop_string_cuts_the_text_and_ends_the_workers_stream() -> None:
    worker = ScriptedWorker(delay_s=0.01)  # answers "abcdefgh..."

    async def scenario(front: Front, url: str) -> None:
        request = {"prompt": "hi", "max_tokens": 20, "stop": ["xyz", "de"]}
        status, body = await post(url + "/v1/completions", request)
        assert status == 200 and body["choices"][0]["text"] == "abc"
        assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 5
        await asyncio.wait_for(worker.gone.wait(), 10)  # the front dropped the worker's stream
        assert worker.bodies[0]["max_tokens"] == 20 and "temperature" not in worker.bodies[0]
        chat = {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 4,
            "stream": True,
            "stop": "cd",
            "temperature": 0.5,
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/v1/chat/completions", json=chat) as resp,
        ):
            lines = [line for line in (await resp.read()).split(b"\n\n") if line.startswith(b"data: {")]
        chunks = [json.loads(line[6:]) for line in lines]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "ab"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        sampled = worker.bodies[1]
        assert sampled["temperature"] == 0.5 and isinstance(sampled["seed"], int)  # the front picks a seed

    run_front(worker, scenario)


def test_stopping_the_front_cancels_a_request_still_in_flight_after_the_grace() -> None:
    """A request that never ends (its worker hangs) does not hold the server's shutdown for
    aiohttp's 60 s default: after ``wire.SHUTDOWN_GRACE_S`` it is cancelled."""
    from kvcache.serve import wire

    stuck = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await request.read()
        stuck.set()
        await asyncio.Event().wait()  # never answers
        raise AssertionError("unreachable")

    async def main() -> None:
        worker = ScriptedWorker(hang)
        wserver = TestServer(worker.app())
        await wserver.start_server(access_log=None)  # as a real worker runs: no access log
        async with wserver:
            front = Front(
                config=ServeConfig(),
                router=Router("round_robin", block_size=16),
                tokenizer=ByteTokenizer(1024),
                model_name="tiny",
                redis_url=None,
                route_request=RouteRequest,
                keys=KEYS,
            )
            url = str(wserver.make_url("")).rstrip("/")
            front.pool.add(registration("w0", url, "i0", model_id="tiny-llama"))
            runner = front.runner()
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            port = runner.addresses[0][1]
            client = asyncio.create_task(
                post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "hi", "max_tokens": 2})
            )
            await asyncio.wait_for(stuck.wait(), 30)
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(runner.cleanup(), 4 * wire.SHUTDOWN_GRACE_S)  # 60 s without the bound
            assert asyncio.get_running_loop().time() - started < 4 * wire.SHUTDOWN_GRACE_S
            client.cancel()
            await asyncio.gather(client, return_exceptions=True)

    asyncio.run(main())
