"""A worker: one batched engine behind an internal HTTP endpoint, registered and publishing in Redis.

``POST /generate`` takes ``{request_id, token_ids, tenant, group, max_tokens}``, optionally a
``salt`` (the scope is ``tenancy.Scope(tenant, group, salt)``: a salt narrows it) and the
sampling fields ``temperature``, ``top_p``, ``top_k`` and ``seed`` (``engine.SamplingParams``;
all of it ``wire.GenerateRequest``, decoded as that type by ``wire.decode_request``: a body that
is not one is a 400 naming the field); it answers with newline-delimited JSON, each line a
``wire.GenerateLine``: one line per generated token ``{"token_id", "index"}`` (the
first also carries ``prompt_tokens``, ``cached_tokens``, ``tier_hits``, ``prefill_s`` and
``queue_s``), then ``{"done": true, "engine_s", "finish_reason"}`` (``engine_s``: the engine time
the request took, queueing excluded; ``finish_reason``: ``stop`` at the model's end of sequence,
``length`` at ``max_tokens``). Errors the caller caused come back before the first line as a JSON
error with its HTTP status (400 bad tokens, bad sampling fields or more tokens than the pool
holds, 429 over quota, 503 pool full), or, once tokens were sent, as a last line
``{"error", "status"}``; they never stop the worker.

Every request joins the engine's step loop (``engine.AsyncEngine``): the scheduler runs up to
``max_num_seqs`` sequences per step and each stream gets its token as soon as the step that
made it ends. Admission is bounded: a request arriving while ``max_waiting`` requests already
wait for their first token is answered 503 with ``Retry-After`` at once (the front tries another
worker), so nothing queues without bound. When the front drops the connection (its client went
away), the request is aborted within one step and its blocks are freed, whether it was running
or still waiting. A request is admitted when its prompt plus ``max_tokens`` fits the pool:
``ceil((prompt + max_tokens - 1) / block_size)`` blocks, since the last token is returned without
its KV being written.

After every step the worker drains the engine's cache events and, with them, its load (running
and waiting requests, KV usage) into one signed batch on the Redis stream, so the front's router
learns what this worker caches and how busy it is without asking; a batch goes out whenever
there are events or the load changed. A heartbeat keeps the registration alive; when Redis is
unreachable the worker keeps serving and drops batches (counted), and re-registers once Redis
answers again. If the front refuses this worker (another model or block size than the
deployment's), the worker logs the front's reason once and stops (``refused``). ``GET /metrics``
gives the worker's own Prometheus series (``metrics.WorkerMetrics``).

Every call must carry this instance's credential (``auth.worker_credential``, which opens no
other worker or instance): without it the answer is 401, with a wrong one 403, before the body
is read. ``GET /hello`` needs none: it answers the front's challenge with this instance's proof
(``peer``), which the front checks before it sends anything else. Registrations and heartbeats
(with a beat number that only goes up) are signed on every heartbeat, and event batches carry a
sequence number and a MAC over events and load; events name scopes by pseudonym.
On each heartbeat the worker also reads the deployment's public prefixes from Redis and, when
they changed, publishes them in its engine and prefills them once (``public``).

Not here: routing and the OpenAI protocol (``front``), tokenizing and text stop sequences (the
front sends token ids and cuts text).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Hashable, Iterable
from dataclasses import replace
from typing import Any, Protocol

from aiohttp import web

from kvcache.cache.events import CacheEvent
from kvcache.cache.tenancy import Scope
from kvcache.engine.aio import AsyncEngine
from kvcache.engine.engine import Engine, RequestOutput
from kvcache.engine.sampling import SamplingParams
from kvcache.errors import CapacityError, ConfigError, InvalidTokensError, KVCacheError, QuotaError
from kvcache.serve import peer, wire
from kvcache.serve.auth import DeploymentKeys, key_check
from kvcache.serve.metrics import CONTENT_TYPE, WorkerMetrics
from kvcache.serve.public import WARM_TENANT, PublicFollower
from kvcache.serve.wire import Registration, WorkerLoad

log = logging.getLogger("kvcache.worker")
DEFAULT_MAX_WAITING = 64
RETRY_AFTER_S = 1
# The engine's reasons as OpenAI's: the end-of-sequence token and stop sequences are "stop".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def _status_of(exc: Exception) -> int:
    if isinstance(exc, QuotaError):
        return 429
    if isinstance(exc, CapacityError):
        return 503
    if isinstance(exc, KVCacheError):
        return 400
    return 500


class EngineEventSink(Protocol):
    """Where a worker also sends its engine's block events, request by request:
    ``vllm.events.EngineEventBridge`` (``kvcache worker --vllm-events``), a layer above this one."""

    def publish_engine_events(
        self, token_ids: list[int], scope: Scope, events: Iterable[CacheEvent]
    ) -> None: ...


class Worker:
    """Serves one engine (``kvcache.engine.Engine``) over HTTP; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        worker_id: str,
        redis_url: str | None,
        keys: DeploymentKeys,
        tier_names: tuple[str, ...] = (),
        max_waiting: int = DEFAULT_MAX_WAITING,
    ) -> None:
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ConfigError(f"max_waiting={max_waiting!r} must be an integer >= 0")
        self.engine = engine
        self.aengine = AsyncEngine(engine, after_step=self._after_step)
        self.keys = keys
        self.worker_id = worker_id
        self.redis_url = redis_url
        self.tier_names = tier_names
        self.max_waiting = max_waiting
        self.num_waiting = 0  # admitted here, no first token yet (the event loop's count)
        self.metrics = WorkerMetrics(self.load)
        self.instance = uuid.uuid4().hex[:12]
        self.events: asyncio.Queue[tuple[list[CacheEvent], WorkerLoad]] = asyncio.Queue()
        self.num_dropped_event_batches = 0
        self._event_seq = 0  # per instance; the front drops a batch whose number it has seen
        self._beat = 0  # per instance: the front counts a worker alive only while this advances
        self._last_load: WorkerLoad | None = None
        self._finished: dict[Hashable, str] = {}  # request -> engine finish reason (engine thread)
        self._tier_errors: dict[Hashable, int] = {}
        self._prompts: dict[Hashable, tuple[list[int], Scope]] = {}  # for the vLLM event bridge
        self.url = ""
        self.refused: str | None = None  # the front's reason, when it refused this worker
        self.stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis_task: asyncio.Task[None] | None = None
        self.vllm_events: EngineEventSink | None = None  # set by --vllm-events
        self.public = PublicFollower(keys, worker_id, self.instance, self._publish)

    # ---- the engine thread ---------------------------------------------------------------

    def load(self) -> WorkerLoad:
        """The engine's load now (lengths of its queues: safe to read from any thread)."""
        scheduler, pool = self.engine.scheduler, self.engine.manager.pool
        return WorkerLoad(
            len(scheduler.running), len(scheduler.waiting), pool.num_used_blocks / max(pool.num_blocks, 1)
        )

    def _after_step(self, outputs: list[RequestOutput]) -> None:
        """On the engine thread after each step (or abort): finish reasons, events, load."""
        first: list[Hashable] = []
        for out in outputs:
            if out.finished and out.finish_reason is not None:
                self._finished[out.request_id] = out.finish_reason
            if out.step is not None and out.step.index == 0:
                first.append(out.request_id)
                self._tier_errors[out.request_id] = int(getattr(self.engine, "last_tier_errors", 0))
        events = self.engine.drain_events()
        if events and self.vllm_events is not None:  # opt-in: vLLM's KV event stream too
            for rid in first or list(self._prompts)[:1]:
                prompt = self._prompts.get(rid)
                if prompt is not None:
                    self.vllm_events.publish_engine_events(prompt[0], prompt[1], events)
        load = self.load()
        if events or load != self._last_load:
            self._last_load = load
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self.events.put_nowait, (events, load))

    def _write_through(self) -> None:
        """On the engine thread, after a request: pod-tier writes of what prefills computed."""
        write_through = getattr(self.engine, "write_through", None)
        if write_through is not None:
            write_through()
        self._after_step([])

    async def _publish(self, prefixes: list[list[int]]) -> None:
        """Make ``prefixes`` the engine's public prefixes, then prefill each once (one token, in a
        scope of its own: every full block is public, so no private block is kept)."""
        await self.aengine.call(lambda: self.engine.set_published(prefixes))
        for tokens in prefixes:
            rid = f"public-warm-{uuid.uuid4().hex[:12]}"
            one = SamplingParams(max_tokens=1)
            if self.vllm_events is not None:  # the public blocks it stores go on vLLM's stream too
                self._prompts[rid] = (tokens, Scope(WARM_TENANT))
            try:
                async for _ in self.aengine.stream(tokens, Scope(WARM_TENANT), one, rid):
                    pass
            except KVCacheError as exc:  # published all the same: the first request computes it
                log.warning("a public prefix of %d tokens was not prefilled: %s", len(tokens), exc)
            finally:
                self._prompts.pop(rid, None)
        await self.aengine.call(self._write_through)

    def _tier_hits(self, step: Any) -> dict[str, int]:
        """Prompt tokens each tier supplied, device first (the engine reports the device's)."""
        tier_tokens = int(step.timings.tier_tokens) if step.timings is not None else 0
        hits = {"device": int(step.cached_tokens) - tier_tokens}
        for name in self.tier_names:  # one lower tier (the pod tier) in served engines
            hits[name] = tier_tokens
        return hits

    # ---- HTTP ----------------------------------------------------------------------------

    def _admit(self, body: wire.GenerateRequest) -> tuple[SamplingParams, Scope]:
        """The request's sampling parameters and scope; ``KVCacheError`` naming the bad field, or
        saying how many blocks the request needs when the pool cannot hold it."""
        sampling: dict[str, Any] = {
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "seed": body.seed,
        }  # a field left out is SamplingParams' default
        params = SamplingParams(
            max_tokens=body.max_tokens, **{k: v for k, v in sampling.items() if v is not None}
        )
        scope = Scope(body.tenant, group=body.group, salt=body.salt)
        manager = self.engine.manager
        # The last generated token is returned, never fed back: its KV is not stored.
        needed = -(-(len(body.token_ids) + body.max_tokens - 1) // manager.block_size)
        if needed > manager.pool.num_blocks:
            raise InvalidTokensError(
                f"{len(body.token_ids)} prompt tokens + max_tokens={body.max_tokens} need "
                f"{needed} blocks; a worker's pool holds {manager.pool.num_blocks}: shorten the "
                "prompt or max_tokens"
            )
        return params, scope

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = wire.decode_request(await request.read())
            params, scope = self._admit(body)
        except KVCacheError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if self.num_waiting >= self.max_waiting:
            self.metrics.rejected.inc()
            return web.json_response(
                {
                    "error": f"worker {self.worker_id} has {self.num_waiting} waiting request(s) "
                    f"(--max-waiting {self.max_waiting}); retry later"
                },
                status=503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        received = time.monotonic()
        rid = body.request_id
        if self.vllm_events is not None:
            self._prompts[rid] = (body.token_ids, scope)
        self.num_waiting += 1
        waiting = True
        response: web.StreamResponse | None = None
        queue_s, last = 0.0, received
        try:
            stream = self.aengine.stream(body.token_ids, scope, params, rid)
            async with contextlib.aclosing(stream) as steps:
                async for step in steps:
                    now = time.monotonic()
                    line = wire.GenerateLine(token_id=int(step.token_id), index=step.index)
                    if step.index == 0:
                        self.num_waiting -= 1
                        waiting = False
                        hits = self._tier_hits(step)
                        queue_s = step.timings.queue_s if step.timings is not None else 0.0
                        line.prompt_tokens = step.prompt_tokens
                        line.cached_tokens = sum(hits.values())
                        line.tier_hits = hits
                        line.prefill_s = step.elapsed_s - queue_s
                        line.queue_s = queue_s
                        line.tier_errors = self._tier_errors.pop(rid, 0)
                        self.metrics.observe_first(now - received, queue_s)
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                    if response is None:
                        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                        await response.prepare(request)
                    await response.write(wire.encode_line(line))
            reason = self._finished.pop(rid, None)
            if reason not in FINISH_REASONS:  # a stream ends at its finish: none recorded is a bug
                raise RuntimeError(f"the engine ended request {rid} without a finish reason ({reason!r})")
        except Exception as exc:  # a request must never take the worker down
            if not isinstance(exc, KVCacheError):
                log.exception("request %s failed", rid)
            status = _status_of(exc)
            if response is None:
                return web.json_response({"error": str(exc)}, status=status)
            error = wire.GenerateLine(error=str(exc), status=status)
            await response.write(wire.encode_line(error))  # in-band, after the first token
            await response.write_eof()
            return response
        finally:
            if waiting:
                self.num_waiting -= 1
            self._prompts.pop(rid, None)
            self._tier_errors.pop(rid, None)
            self._finished.pop(rid, None)
        self.metrics.e2e.observe(time.monotonic() - received)
        if response is None:
            return web.json_response({"error": "no output"}, status=500)
        done = wire.GenerateLine(
            done=True,
            engine_s=time.monotonic() - received - queue_s,
            finish_reason=FINISH_REASONS[reason],
        )
        await response.write(wire.encode_line(done))
        await response.write_eof()
        await self.aengine.call(self._write_through)  # off this request's latency, between steps
        return response

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Only the front (holder of this instance's credential) gets past here, the body unread;
        the challenge (``hello``) comes first and needs none: it is how the front decides to send it."""
        if request.path != peer.HELLO_PATH:
            status = self.keys.check_worker_call(
                request.headers.get("Authorization"), self.worker_id, self.instance
            )
            if status is not None:
                message = "missing worker credential" if status == 401 else "wrong worker credential"
                return web.json_response({"error": message}, status=status)
        response: web.StreamResponse = await handler(request)
        return response

    async def hello(self, request: web.Request) -> web.Response:
        """This instance's proof for the caller's fresh challenge (``peer``): cheap, nothing secret."""
        try:
            challenge = bytes.fromhex(request.headers.get(peer.CHALLENGE_HEADER, ""))
        except ValueError:
            challenge = b""
        if len(challenge) != peer.CHALLENGE_BYTES:
            return web.json_response(
                {"error": f"{peer.CHALLENGE_HEADER} must be {peer.CHALLENGE_BYTES} random bytes in hex"},
                status=400,
            )
        proof = self.keys.hello_proof(self.worker_id, self.instance, challenge)
        return web.json_response({"worker_id": self.worker_id, "instance": self.instance, "proof": proof})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "worker_id": self.worker_id,
                "instance": self.instance,
                "dropped_event_batches": self.num_dropped_event_batches,
            }
        )

    # ---- Redis ---------------------------------------------------------------------------

    def registration(self) -> Registration:
        manager = self.engine.manager
        return Registration(
            self.worker_id,
            self.url,
            self.instance,
            os.getpid(),
            manager.config.model_id,
            manager.block_size,
            int(self.engine.vocab_size),
            manager.config.adapter_id,
            manager.pool.num_blocks,
            key_check(manager.hasher),
        )

    def _signed_events(self, batch: list[CacheEvent], load: WorkerLoad) -> dict[str, str | bytes]:
        data = wire.encode_events([replace(e, scope=self.keys.pseudonym(e.scope)) for e in batch])
        seq = self._event_seq
        self._event_seq += 1
        raw_load = load.encode()
        mac = self.keys.sign_events(self.worker_id, self.instance, seq, data, raw_load)
        return {
            "worker": self.worker_id,
            "instance": self.instance,
            "seq": str(seq),
            "events": data,
            "load": raw_load,
            "mac": mac,
        }

    async def _redis_loop(self) -> None:
        """Heartbeat and event publishing; survives Redis going away and coming back."""
        import redis.asyncio as aioredis

        assert self.redis_url is not None
        client: Any = aioredis.Redis.from_url(self.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        reg = self.registration().to_json()
        next_beat = 0.0
        while True:
            try:
                if time.monotonic() >= next_beat:
                    if await self._was_refused(client):
                        return
                    await client.hset(
                        wire.WORKERS_KEY, self.worker_id, self.keys.sign_registration(reg, time.time())
                    )
                    beat = self.keys.sign_heartbeat(self.worker_id, self.instance, self._beat, time.time())
                    await client.set(wire.alive_key(self.worker_id), beat, ex=wire.ALIVE_TTL_S)
                    self._beat += 1
                    await self.public.sync(client)
                    next_beat = time.monotonic() + wire.HEARTBEAT_S
                try:
                    batch, load = await asyncio.wait_for(self.events.get(), timeout=wire.HEARTBEAT_S / 4)
                except TimeoutError:
                    continue
                while not self.events.empty():  # a backlog goes out as one batch with the newest load
                    more, load = self.events.get_nowait()
                    batch = batch + more
                fields = self._signed_events(batch, load)
                try:
                    await client.xadd(wire.EVENTS_STREAM, fields, maxlen=wire.EVENTS_MAXLEN, approximate=True)
                except Exception:
                    self.num_dropped_event_batches += 1
                    raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: keep serving, drop events, retry the heartbeat
                log.warning("redis unavailable (%s); serving on without events", type(exc).__name__)
                while not self.events.empty():
                    self.events.get_nowait()
                    self.num_dropped_event_batches += 1
                await asyncio.sleep(0.5)
                next_beat = 0.0

    async def _was_refused(self, client: Any) -> bool:
        """Whether the front refused this instance; if so, log why (once) and ask to stop."""
        raw = await client.get(wire.refused_key(self.worker_id))
        notice = self.keys.open_notice(raw) if raw is not None else None
        if notice is None:
            return False  # none, or not signed by this deployment's front: Redis cannot stop a worker
        try:
            data = json.loads(notice)
        except ValueError:
            return False
        if not isinstance(data, dict) or data.get("instance") != self.instance:
            return False  # an earlier instance was refused, not this one
        self.refused = str(data.get("reason", "refused by the front"))
        log.error("the front refused this worker: %s; stopping", self.refused)
        self.stop.set()
        return True

    async def deregister(self) -> None:
        import redis.asyncio as aioredis

        assert self.redis_url is not None
        client: Any = aioredis.Redis.from_url(self.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            await client.hdel(wire.WORKERS_KEY, self.worker_id)
            await client.delete(wire.alive_key(self.worker_id))
        except Exception:
            pass  # Redis is gone: the heartbeat expires on its own
        finally:
            await client.aclose()

    async def start(self, host: str, port: int, advertise: str | None = None) -> web.AppRunner:
        self._loop = asyncio.get_running_loop()
        app = web.Application(client_max_size=64 * 2**20, middlewares=[self._authenticate])
        app.router.add_post("/generate", self.generate)
        app.router.add_get(peer.HELLO_PATH, self.hello)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        # handler_cancellation: a dropped connection cancels its handler, which cancels the request.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=wire.SHUTDOWN_GRACE_S
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        self.url = f"http://{advertise or host}:{bound}"
        if self.redis_url:
            self._redis_task = asyncio.create_task(self._redis_loop())
        return runner


async def _stop_when_orphaned(worker: Worker, parent_pid: str | None) -> None:
    """Stop ``worker`` once the process that started it (``parent_pid``, from ``kvcache serve``) is no
    longer its parent: that process died without stopping it. Nothing to watch without a pid."""
    if parent_pid is None or not parent_pid.isdigit():
        return
    while os.getppid() == int(parent_pid):
        await asyncio.sleep(wire.PARENT_CHECK_S)
    log.warning(
        "worker %s: the kvcache serve that started it (pid %s) is gone; stopping",
        worker.worker_id,
        parent_pid,
    )
    worker.stop.set()


async def serve_forever(worker: Worker, host: str, port: int, advertise: str | None = None) -> None:
    """Run ``worker`` until SIGINT/SIGTERM; then deregister (best effort) and stop."""
    import signal

    runner = await worker.start(host, port, advertise)
    print(f"worker {worker.worker_id} serving at {worker.url}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stop.set)
    orphan_watch = asyncio.create_task(_stop_when_orphaned(worker, os.environ.get(wire.PARENT_PID_ENV)))
    await worker.stop.wait()
    orphan_watch.cancel()
    if worker._redis_task is not None:
        worker._redis_task.cancel()
        await asyncio.gather(worker._redis_task, return_exceptions=True)
        await worker.deregister()
    await worker.public.close()
    await runner.cleanup()
    await worker.aengine.close()
