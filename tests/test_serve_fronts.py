"""Several fronts on one deployment: they route from the same worker events, each counts the
requests the others placed (as the workers report them), they keep one public-prefix set in
Redis, and a front that dies leaves the others serving.

The end-to-end tests run one Redis, two ``kvcache worker`` processes (no pod tier, so a cached
token is a hit in the serving worker's own pool) and two fronts started with ``kvcache serve
--workers 0``, in file order: the last one kills front A.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from deployment import KEYS, registration
from serve_harness import STARTUP_S, Deployment, deploy, deployment_env, free_port, ids
from test_serve_auth import entry
from test_serve_launch import serve

from kvcache.child import python_argv
from kvcache.model.tokenize import ByteTokenizer
from kvcache.redis_server import start_redis
from kvcache.router import Router, RouteRequest
from kvcache.serve import auth, public, wire
from kvcache.serve.config import PublicPrefixSpec
from kvcache.serve.metrics import ServeMetrics
from kvcache.serve.pool import WorkerPool
from kvcache.serve.wire import WorkerLoad

WORKERS = ("w0", "w1")


# ---- a front only: what it refuses -----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "args", "needle"),
    [
        ({}, (), "give that deployment's Redis with --redis URL"),
        (
            {auth.REDIS_URL_ENV: "redis://127.0.0.1:1/0"},
            (),
            "give it the deployment's secret in KVCACHE_SECRET",
        ),
        (
            {auth.REDIS_URL_ENV: "redis://127.0.0.1:1/0", auth.SECRET_ENV: "ab" * 32},
            ("--threads", "2", "--no-pod-tier"),
            "--threads, --no-pod-tier configure the workers this command starts, and --workers 0 starts none",
        ),
        ({}, ("--workers", "-1"), "--workers=-1 must be >= 0"),
    ],
)
def test_a_front_only_needs_the_deployments_redis_and_secret_and_no_worker_flags(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    args: tuple[str, ...],
    needle: str,
) -> None:
    for name in (auth.REDIS_URL_ENV, auth.SECRET_ENV, auth.SECRET_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    workers = () if "--workers" in args else ("--workers", "0")
    assert needle in serve(capsys, *workers, *args)


# ---- load: a front counts what the workers report, whoever placed it ----------------------------


def test_a_router_counts_the_load_a_worker_reports_though_it_placed_none_of_it() -> None:
    async def scenario() -> None:
        router = Router(policy="least_loaded", clock=lambda: 0.0)
        pool = WorkerPool(router, ServeMetrics(), None, keys=KEYS)
        regs = {w: registration(w) for w in WORKERS}
        for reg in regs.values():
            pool.add(reg)
        # w0 runs 3 and queues 1 requests another front placed; this router placed none.
        pool.apply_events(entry(regs["w0"], 0, [], load=WorkerLoad(3, 1, 0.1)))
        assert router.request_counts("w0") == (0, 4)
        chosen = [router.route(RouteRequest(f"r{i}", [], 16)) for i in range(4)]
        assert chosen == ["w1"] * 4  # in flight: w0 4 (reported), w1 0, 1, 2, 3 (its own)
        # w1 reports the 4 requests routed there: a floor, not a sum, so they count once.
        pool.apply_events(entry(regs["w1"], 0, [], load=WorkerLoad(4, 0, 0.1)))
        (w0, w1) = router._views(RouteRequest("probe", [], 16), 0.0)
        assert (w0.active_requests, w0.reported_requests, w0.in_flight_requests) == (0, 4, 4)
        assert (w1.active_requests, w1.reported_requests, w1.in_flight_requests) == (4, 4, 4)
        # 4 each; w1 also has this router's prefills pending (its clock stands still): w0.
        assert router.route(RouteRequest("r4", [], 16)) == "w0"
        # w0's other requests end: what is left there is the one this router placed.
        pool.apply_events(entry(regs["w0"], 1, [], load=WorkerLoad(0, 0, 0.0)))
        (w0, _) = router._views(RouteRequest("probe", [], 16), 0.0)
        assert (w0.active_requests, w0.reported_requests, w0.in_flight_requests) == (1, 0, 1)

        # The default policy prices them as decode work its prefill would share steps with: two
        # idle workers tie (a seeded draw), and one whose report says it is busy loses the tie.
        def first_choice(seed: int, report: WorkerLoad | None) -> str:
            affinity = Router(seed=seed, clock=lambda: 0.0)
            pool = WorkerPool(affinity, ServeMetrics(), None, keys=KEYS)
            for reg in regs.values():
                pool.add(reg)
            if report is not None:
                pool.apply_events(entry(regs["w1"], 0, [], load=report))
            return str(affinity.route(RouteRequest("a", [], 64)))

        assert {first_choice(seed, None) for seed in range(8)} == {"w0", "w1"}
        assert {first_choice(seed, WorkerLoad(6, 0, 0.2)) for seed in range(8)} == {"w0"}

    asyncio.run(scenario())


# ---- public prefixes: one set in Redis for every front ----------------------------------------------


def prefix(*token_ids: int) -> public.PublicPrefix:
    return public.render(PublicPrefixSpec("token_ids", token_ids), ByteTokenizer())


def test_two_fronts_keep_one_public_set_whose_version_only_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    p1, p2, p3 = prefix(*range(1, 33)), prefix(*range(40, 72)), prefix(*range(80, 112))

    def stored(client: Any) -> tuple[int, set[tuple[int, ...]]]:
        opened = public.open_set(KEYS, client_get(client))
        assert opened is not None
        return opened[0], {tuple(p) for p in opened[1]}

    def client_get(client: Any) -> bytes:
        raw = client.get(wire.PUBLIC_KEY)
        assert raw is not None
        return raw  # type: ignore[no-any-return]

    def ids_of(front: public.PublicPrefixes) -> set[tuple[int, ...]]:
        return {tuple(t) for t in front.token_lists()}

    with start_redis() as server:
        import redis.asyncio as aioredis

        reader = redis.Redis.from_url(server.url)

        def sync(front: public.PublicPrefixes) -> bool:
            async def once() -> bool:
                client = aioredis.Redis.from_url(server.url)
                try:
                    return await front.sync(client)
                finally:
                    await client.aclose()

            return asyncio.run(once())

        a, b = public.PublicPrefixes(KEYS), public.PublicPrefixes(KEYS)
        a.add(p1)  # front A's config
        b.add(p2)  # front B's, another config
        assert sync(a) and stored(reader) == (a.version, {p1.token_ids})
        assert sync(b)  # B takes A's set in and adds its own: a new version, above A's
        v_b, union = stored(reader)
        assert union == {p1.token_ids, p2.token_ids} and v_b == b.version > a.version
        assert sync(a) and (a.version, ids_of(a)) == (v_b, union)  # A takes it in as it is
        raw = client_get(reader)
        assert sync(a) and sync(b) and client_get(reader) == raw  # in step: nobody writes, no flip

        # Concurrent changes, each made on a front that has not seen the other's: both hold.
        a.add(p3)
        b.remove(p1.prefix_id)
        assert sync(a) and sync(b) and sync(a)
        version, now = stored(reader)
        assert now == {p2.token_ids, p3.token_ids} == ids_of(a) == ids_of(b)
        assert version == a.version == b.version > v_b

        # A flushed Redis gets the set back, at the same version.
        reader.delete(wire.PUBLIC_KEY)
        assert sync(b) and stored(reader) == (version, now)

        # Another front writes between A's read and A's write: A writes nothing, then takes it in.
        a.add(p1)
        b.remove(p2.prefix_id)
        other = b.signed()
        opened_by_a = public.open_set

        def open_then_write(keys: auth.DeploymentKeys, raw: bytes | str) -> Any:
            redis.Redis.from_url(server.url).set(wire.PUBLIC_KEY, other)  # front B, meanwhile
            return opened_by_a(keys, raw)

        monkeypatch.setattr(public, "open_set", open_then_write)
        assert sync(a) is False and client_get(reader) == other.encode()
        monkeypatch.setattr(public, "open_set", opened_by_a)
        assert sync(a) and sync(b)
        final_version, final = stored(reader)
        assert final == {p1.token_ids, p3.token_ids} == ids_of(a) == ids_of(b)
        assert final_version == a.version == b.version > version
        reader.close()


# ---- end to end: two fronts, two workers, one Redis ------------------------------------------------


@pytest.fixture(scope="module")
def fronts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, Deployment]]:
    a = deploy(tmp_path_factory.mktemp("fronts"), workers=0)  # Redis and front A only
    try:
        for worker_id in WORKERS:
            a.start_worker(worker_id, "--no-pod-tier")
        b = a.start_front()
        for front in (a, b):
            front.wait_for("both workers", lambda f=front: len(f.workers()) == 2, STARTUP_S)
        yield a, b
    finally:
        a.stop()


def served_by(front: Deployment) -> dict[str, float]:
    return {w: front.metric("kvcache:e2e_request_latency_seconds_count", worker=w) for w in WORKERS}


def test_a_prompt_sent_through_a_then_b_lands_on_the_worker_holding_it(
    fronts: tuple[Deployment, Deployment],
) -> None:
    a, b = fronts
    prompt = {"prompt": ids(7, 200), "max_tokens": 2}  # 12 full blocks and 8 tokens
    status, first = a.request("/v1/completions", prompt)
    assert status == 200 and first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    (holder,) = [w for w, n in served_by(a).items() if n == 1]
    # B learns the blocks from the worker's events, as A does (B placed nothing there).
    b.wait_for(
        "front B to index the blocks A's request stored",
        lambda: b.workers()[holder]["indexed_blocks"] == a.workers()[holder]["indexed_blocks"] >= 12,
    )
    status, second = b.request("/v1/completions", prompt)
    assert status == 200 and second["usage"]["prompt_tokens_details"]["cached_tokens"] == 192
    assert served_by(b) == {w: float(w == holder) for w in WORKERS}


def test_a_front_with_another_block_size_stops_and_leaves_the_workers_alone(
    fronts: tuple[Deployment, Deployment],
) -> None:
    a, _ = fronts
    cmd = [*python_argv("-m", "kvcache.cli", "serve"), "--workers", "0", "--port", str(free_port())]
    cmd += ["--model", "tiny", "--block-size", "32"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=deployment_env(a.redis, a.secret)
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "the deployment's workers key blocks of 16 tokens" in done.stderr
    assert "this front was started with --block-size 32" in done.stderr
    assert set(a.workers()) == set(WORKERS)  # nobody refused them


def test_b_counts_a_request_a_placed_and_serves_on_when_a_is_killed(
    fronts: tuple[Deployment, Deployment],
) -> None:
    a, b = fronts
    streaming, release = threading.Event(), threading.Event()

    def hold(chunk: Any) -> None:
        streaming.set()
        release.wait(120)

    def stream_through_a() -> list[Any] | BaseException:
        try:
            return a.stream("/v1/completions", {"prompt": ids(8, 64), "max_tokens": 3000}, on_chunk=hold)
        except (OSError, http.client.HTTPException) as exc:
            return exc

    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(stream_through_a)
        try:
            assert streaming.wait(120)  # A's request is decoding on one worker
            busy = b.wait_for(
                "front B to see the worker's report",
                lambda: [w for w, v in b.workers().items() if v["reported_requests"] == 1],
            )
            (worker,) = busy
            assert b.workers()[worker]["active_requests"] == 0  # B placed nothing there
            # A fresh prompt through B goes to the other worker: B counts A's request.
            (idle,) = [w for w in WORKERS if w != worker]
            before = served_by(b)
            status, _ = b.request("/v1/completions", {"prompt": ids(9, 64), "max_tokens": 2})
            assert status == 200 and served_by(b)[idle] == before[idle] + 1
        finally:  # whatever happened: A dies now, which cuts its stream short
            os.kill(a.process.pid, signal.SIGKILL)
            a.process.wait(timeout=30)
            release.set()
        cut = result.result(timeout=120)
    assert isinstance(cut, BaseException) or "[DONE]" not in cut  # A's client lost its answer
    # The worker drops the request of the dead front's connection, and says so in its events.
    b.wait_for("the worker to drop A's request", lambda: b.workers()[worker]["reported_requests"] == 0)
    prompts = [ids(8, 64), *(ids(seed, 48) for seed in range(10, 16))]  # A's, retried, and new ones
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(
            pool.map(lambda p: b.request("/v1/completions", {"prompt": p, "max_tokens": 4}), prompts)
        )
    assert [status for status, _ in answers] == [200] * len(prompts)
    for _, body in answers:  # a whole answer each: 4 tokens, or fewer where the model ended it
        finish = body["choices"][0]["finish_reason"]
        assert (finish, body["usage"]["completion_tokens"]) == ("length", 4) or finish == "stop"
    assert set(b.workers()) == set(WORKERS)
