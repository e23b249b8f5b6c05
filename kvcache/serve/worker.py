"""A worker: one engine behind an internal HTTP endpoint, registered and publishing events in Redis.

``POST /generate`` takes ``{request_id, token_ids, tenant, group, max_tokens}`` and answers with
newline-delimited JSON: one line per generated token ``{"token_id", "index"}`` (the first also
carries ``prompt_tokens``, ``cached_tokens``, ``tier_hits``, ``prefill_s`` and ``queue_s``), then
``{"done": true, "engine_s"}`` (the engine time the request took, queueing excluded).
Errors the caller caused come back before the first line as a JSON error with its HTTP status
(400 bad tokens or more tokens than the pool holds, 429 over quota, 503 pool full), or, once
tokens were sent, as a last line ``{"error", "status"}``; they never stop the worker.

The engine is single-threaded: every request runs on one engine thread, one at a time, in
arrival order; ``queue_s`` is how long a request waited for it. When the front drops the
connection (its client went away), the request stops after the step in progress, and a request
still waiting for the engine thread never starts. A request is admitted when its prompt plus
``max_tokens`` fits the pool: ``ceil((prompt + max_tokens - 1) / block_size)`` blocks, since the
last token is returned without its KV being written. After each prefill and each
request the worker drains the engine's cache events and appends them to the Redis stream, so the
front's router learns what this worker caches. A heartbeat keeps the registration alive; when
Redis is unreachable the worker keeps serving and drops events (counted), and re-registers once
Redis answers again. If the front refuses this worker (another model or block size than the
deployment's), the worker logs the front's reason once and stops (``refused``).

Every call must carry the deployment's worker token (``auth``): without it the answer is 401,
with a wrong one 403, before the body is read. Registrations are signed on every heartbeat and
event batches carry a sequence number and a MAC; events name scopes by pseudonym.

Not here: routing and the OpenAI protocol (``front``), tokenizing (the front sends token ids).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from kvcache.errors import CapacityError, InvalidTokensError, KVCacheError, QuotaError
from kvcache.events import CacheEvent
from kvcache.serve import wire
from kvcache.serve.auth import DeploymentKeys, key_check
from kvcache.tenancy import Scope

log = logging.getLogger("kvcache.worker")


@dataclass(frozen=True, slots=True)
class Registration:
    """What a worker tells the front about itself (stored as JSON in ``kvcache:workers``)."""

    worker_id: str
    url: str
    instance: str  # new on every start: the front purges what it knew of an earlier instance
    pid: int
    model_id: str
    block_size: int
    vocab_size: int
    adapter_id: str | None  # with model_id, block_size and the deployment key: how blocks are keyed
    num_blocks: int  # pool capacity: the front never indexes more blocks than this for the worker
    key_check: str  # ``auth.key_check`` of the worker's hasher: the front's must be equal

    def to_json(self) -> str:
        return json.dumps({f: getattr(self, f) for f in self.__dataclass_fields__})

    @classmethod
    def from_json(cls, text: str | bytes) -> Registration:
        data = json.loads(text)
        return cls(**{f: data[f] for f in cls.__dataclass_fields__})


def _status_of(exc: Exception) -> int:
    if isinstance(exc, QuotaError):
        return 429
    if isinstance(exc, CapacityError):
        return 503
    if isinstance(exc, KVCacheError):
        return 400
    return 500


class Worker:
    """Serves one engine (``kvcache.engine.Engine``) over HTTP; see the module docstring."""

    def __init__(self, engine: Any, worker_id: str, redis_url: str | None, keys: DeploymentKeys,
                 tier_names: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.engine = engine
        self.keys = keys
        self.worker_id = worker_id
        self.redis_url = redis_url
        self.tier_names = tier_names
        # A reply ends at the model's end-of-sequence token (sent, then the stream ends).
        eos = getattr(getattr(engine, "tokenizer", None), "eos_token_id", None)
        self.stop_ids = frozenset([eos] if isinstance(eos, int) else [])
        self.instance = uuid.uuid4().hex[:12]
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.events: asyncio.Queue[list[CacheEvent]] = asyncio.Queue()
        self.num_dropped_event_batches = 0
        self._event_seq = 0  # per instance; the front drops a batch whose number it has seen
        self.url = ""
        self.refused: str | None = None  # the front's reason, when it refused this worker
        self.stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis_task: asyncio.Task[None] | None = None
        self.vllm_events: Any = None  # a vllm_events.EngineEventBridge, set by --vllm-events

    # ---- the engine thread ---------------------------------------------------------------

    def _steps(self, body: dict[str, Any], cancel: threading.Event) -> Iterator[dict[str, Any]]:
        """Runs on the engine thread: the request's lines, errors as one ``{"error"}`` line."""
        scope = Scope(body["tenant"], group=body.get("group"))
        stream = self.engine.stream(
            body["token_ids"], scope=scope, max_new_tokens=body["max_tokens"], request_id=body["request_id"]
        )
        try:
            for step in stream:
                line: dict[str, Any] = {"token_id": int(step.token_id), "index": step.index}
                if step.index == 0:
                    hits = self._tier_hits(step)
                    line.update(prompt_tokens=step.prompt_tokens, cached_tokens=sum(hits.values()),
                                tier_hits=hits, prefill_s=step.elapsed_s,
                                tier_errors=int(getattr(self.engine, "last_tier_errors", 0)))  # fmt: skip
                    self._publish(self.engine.drain_events(), body)  # the router learns the prefix early
                yield line
                if cancel.is_set() or step.token_id in self.stop_ids:
                    break
        finally:
            stream.close()  # frees the request's blocks even when the caller went away
            write_through = getattr(self.engine, "write_through", None)
            if write_through is not None:
                write_through()
            self._publish(self.engine.drain_events(), body)

    def _tier_hits(self, step: Any) -> dict[str, int]:
        """Prompt tokens each tier supplied, device first (the engine reports the device's)."""
        tier_tokens = int(step.timings.tier_tokens) if step.timings is not None else 0
        hits = {"device": int(step.cached_tokens) - tier_tokens}
        for name in self.tier_names:  # one lower tier (the pod tier) in served engines
            hits[name] = tier_tokens
        return hits

    def _publish(self, events: list[CacheEvent], body: dict[str, Any]) -> None:
        if events and self.vllm_events is not None:  # opt-in: vLLM's KV event stream too
            scope = Scope(body["tenant"], group=body.get("group"))
            self.vllm_events.publish_engine_events(body["token_ids"], scope, events)
        if events:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self.events.put_nowait, events)

    # ---- HTTP ----------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise InvalidTokensError("body must be a JSON object")
            fields = (("request_id", str), ("token_ids", list), ("tenant", str), ("max_tokens", int))
            for name, kind in fields:
                if not isinstance(body.get(name), kind):
                    raise InvalidTokensError(f"'{name}' must be a {kind.__name__}")
            manager = self.engine.manager
            # The last generated token is returned, never fed back: its KV is not stored.
            needed = -(-(len(body["token_ids"]) + body["max_tokens"] - 1) // manager.block_size)
            if needed > manager.pool.num_blocks:
                raise InvalidTokensError(
                    f"{len(body['token_ids'])} prompt tokens + max_tokens={body['max_tokens']} need "
                    f"{needed} blocks; a worker's pool holds {manager.pool.num_blocks}: shorten the "
                    "prompt or max_tokens"
                )
        except (ValueError, KVCacheError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        received = time.monotonic()
        lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        cancel = threading.Event()
        loop = asyncio.get_running_loop()

        def run() -> None:
            started = time.monotonic()
            if cancel.is_set():  # the front gave up while this request waited for the engine
                loop.call_soon_threadsafe(lines.put_nowait, None)
                return
            try:
                for line in self._steps(body, cancel):
                    if line["index"] == 0:
                        line["queue_s"] = started - received
                    loop.call_soon_threadsafe(lines.put_nowait, line)
                    if cancel.is_set():
                        break
                done = {"done": True, "engine_s": time.monotonic() - started}
                loop.call_soon_threadsafe(lines.put_nowait, done)
            except Exception as exc:  # a request must never take the worker down
                if not isinstance(exc, KVCacheError):
                    log.exception("request %s failed", body.get("request_id"))
                loop.call_soon_threadsafe(lines.put_nowait, {"error": str(exc), "status": _status_of(exc)})
            loop.call_soon_threadsafe(lines.put_nowait, None)

        future = loop.run_in_executor(self.executor, run)
        response: web.StreamResponse | None = None
        try:
            done: dict[str, Any] = {"done": True}
            while (line := await lines.get()) is not None:
                if line.get("done"):
                    done = line
                    continue
                if "error" in line:
                    if response is None:
                        return web.json_response({"error": line["error"]}, status=line["status"])
                    done = line  # after the first token: the error ends the stream, in-band
                    continue
                if response is None:
                    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                    await response.prepare(request)
                await response.write(json.dumps(line).encode() + b"\n")
            if response is None:
                return web.json_response({"error": "no output"}, status=500)
            await response.write(json.dumps(done).encode() + b"\n")
            await response.write_eof()
            return response
        finally:
            cancel.set()
            await asyncio.shield(future)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Only the front (holder of the worker token) gets past here; the body is never read."""
        status = self.keys.check_worker_call(request.headers.get("Authorization"))
        if status is not None:
            message = "missing worker token" if status == 401 else "wrong worker token"
            return web.json_response({"error": message}, status=status)
        response: web.StreamResponse = await handler(request)
        return response

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"worker_id": self.worker_id, "instance": self.instance,
                                  "dropped_event_batches": self.num_dropped_event_batches})  # fmt: skip

    # ---- Redis ---------------------------------------------------------------------------

    def registration(self) -> Registration:
        manager = self.engine.manager
        return Registration(self.worker_id, self.url, self.instance, os.getpid(), manager.config.model_id,
                            manager.block_size, int(self.engine.vocab_size), manager.config.adapter_id,
                            manager.pool.num_blocks, key_check(manager.hasher))  # fmt: skip

    def _signed_events(self, batch: list[CacheEvent]) -> dict[str, str | bytes]:
        data = wire.encode_events([replace(e, scope=self.keys.pseudonym(e.scope)) for e in batch])
        seq = self._event_seq
        self._event_seq += 1
        mac = self.keys.sign_events(self.worker_id, self.instance, seq, data)
        return {"worker": self.worker_id, "instance": self.instance, "seq": str(seq), "events": data,
                "mac": mac}  # fmt: skip

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
                    await client.hset(wire.WORKERS_KEY, self.worker_id,
                                      self.keys.sign_registration(reg, time.time()))  # fmt: skip
                    await client.set(wire.alive_key(self.worker_id), self.instance, ex=wire.ALIVE_TTL_S)
                    next_beat = time.monotonic() + wire.HEARTBEAT_S
                try:
                    batch = await asyncio.wait_for(self.events.get(), timeout=wire.HEARTBEAT_S / 4)
                except asyncio.TimeoutError:
                    continue
                fields = self._signed_events(batch)
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
        app.router.add_get("/health", self.health)
        # handler_cancellation: a dropped connection cancels its handler, which cancels the request.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        self.url = f"http://{advertise or host}:{bound}"
        if self.redis_url:
            self._redis_task = asyncio.create_task(self._redis_loop())
        return runner


async def serve_forever(worker: Worker, host: str, port: int, advertise: str | None = None) -> None:
    """Run ``worker`` until SIGINT/SIGTERM; then deregister (best effort) and stop."""
    import signal

    runner = await worker.start(host, port, advertise)
    print(f"worker {worker.worker_id} serving at {worker.url}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stop.set)
    await worker.stop.wait()
    if worker._redis_task is not None:
        worker._redis_task.cancel()
        await asyncio.gather(worker._redis_task, return_exceptions=True)
        await worker.deregister()
    await runner.cleanup()
    worker.executor.shutdown(wait=False, cancel_futures=True)
