"""Start a whole deployment on one machine: Redis (unless given), N worker processes, the front.

``kvcache serve`` is this module behind argparse. Workers are separate processes running
``kvcache worker``, exactly what an operator starts on another machine; the front finds them
through Redis like any remote worker. The Redis URL (with its password) and the deployment
secret reach workers in their environment (``KVCACHE_REDIS_URL``, ``KVCACHE_SECRET``), never in
argv, where any local user could read them. The front listens at once (``/health`` answers 503
until a worker joins); stderr shows each worker as it joins (``worker w0 ready (1/2)``), and the
``serving on URL`` line comes on stdout only once every worker started here has joined, so a
client that waits for it is answered. On SIGINT/SIGTERM the front stops, then
the workers, then the Redis it started. A worker that exits before it ever joined (a model that
does not load, a bad flag, a refusal by the front) stops the whole deployment with a
``ConfigError`` carrying the worker's last error lines, as ``vllm serve`` exits when its engine
cannot start; a worker that dies after joining is a fault the front routes around.

With no workers to start (``kvcache serve --workers 0``) it is a front only: one more front of a
running deployment, which it joins through the deployment's Redis with the deployment's secret
(both from the environment, as a worker takes them). It starts neither Redis nor workers, its
``serving`` line comes once it sees one of the deployment's workers, and it stops with a
``ConfigError`` when their block size is not its own (the front must be started with the
deployment's flags). Stopping it stops nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import urlsplit

from aiohttp import web

from kvcache.cache.config import DEFAULT_BLOCK_SIZE
from kvcache.child import python_argv
from kvcache.costs import ENGINE_MAX_NUM_BATCHED_TOKENS, ENGINE_MAX_NUM_SEQS, LatencyModel
from kvcache.errors import ConfigError
from kvcache.model.tokenize import Tokenizer
from kvcache.serve import auth, wire
from kvcache.serve.config import ServeConfig
from kvcache.serve.front import READ_TIMEOUT_S, Front
from kvcache.serve.limits import ConnectionLimits


@dataclass(frozen=True, slots=True)
class WorkerArgs:
    """What every worker of a deployment is started with (``kvcache worker`` flags)."""

    model: str = "tiny"
    num_blocks: int = 1024
    block_size: int = DEFAULT_BLOCK_SIZE
    threads: int = 1
    config_path: str | None = None
    pod_tier: bool = True
    dtype: str | None = None
    device: str | None = None
    max_waiting: int = 64
    max_num_seqs: int = ENGINE_MAX_NUM_SEQS

    def argv(self, worker_id: str) -> list[str]:
        argv = [
            *python_argv(),
            "-m",
            "kvcache.cli",
            "worker",
            "--worker-id",
            worker_id,
            "--model",
            self.model,
            "--num-blocks",
            str(self.num_blocks),
            "--block-size",
            str(self.block_size),
            "--threads",
            str(self.threads),
            "--max-waiting",
            str(self.max_waiting),
            "--max-num-seqs",
            str(self.max_num_seqs),
        ]
        if self.config_path:
            argv += ["--config", self.config_path]
        if not self.pod_tier:
            argv += ["--no-pod-tier"]
        for flag, value in (("--dtype", self.dtype), ("--device", self.device)):
            if value is not None:
                argv += [flag, value]
        return argv


def worker_env(redis_url: str, secret: bytes) -> dict[str, str]:
    """The environment a worker starts with: ours plus the deployment's Redis URL and secret, and our
    pid (``wire.PARENT_PID_ENV``), so a worker stops by itself if this process dies without stopping it."""
    return {
        **os.environ,
        auth.REDIS_URL_ENV: redis_url,
        auth.SECRET_ENV: secret.hex(),
        wire.PARENT_PID_ENV: str(os.getpid()),
    }


@dataclass
class WorkerProcess:
    """A spawned worker; its stderr is relayed to ours and its last lines kept for error messages."""

    worker_id: str
    process: subprocess.Popen[bytes]
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=8))

    def relay(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace")
            self.tail.append(line.rstrip())
            sys.stderr.write(line)
            sys.stderr.flush()

    def failure(self) -> str:
        lines = [line for line in self.tail if line.strip()]
        said = lines[-1] if lines else "(no output)"
        return f"worker {self.worker_id} exited with code {self.process.returncode} before joining: {said}"


def spawn_workers(args: WorkerArgs, redis_url: str, secret: bytes, num_workers: int) -> list[WorkerProcess]:
    env = worker_env(redis_url, secret)
    workers = []
    for i in range(num_workers):
        process = subprocess.Popen(args.argv(f"w{i}"), env=env, stderr=subprocess.PIPE)
        worker = WorkerProcess(f"w{i}", process)
        assert process.stderr is not None
        threading.Thread(target=worker.relay, args=(process.stderr,), daemon=True).start()
        workers.append(worker)
    return workers


def check_redis(url: str, timeout_s: float = 3.0) -> None:
    """``ConfigError`` unless the Redis at ``url`` answers PING within ``timeout_s``."""
    import redis

    parts = urlsplit(url)
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        where = f"{parts.hostname}:{parts.port}"  # never the password
        raise ConfigError(
            f"cannot reach Redis at {where}: {exc}; start it or fix --redis/--connect ({auth.REDIS_URL_ENV})"
        ) from None
    finally:
        client.close()


def stop_processes(processes: list[subprocess.Popen[bytes]], timeout_s: float = 5.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_policy(policy: str) -> None:
    """``ConfigError`` listing every policy ``serve`` takes unless ``policy`` is one of them."""
    from kvcache.router.policies import POLICIES

    if policy not in POLICIES:
        raise ConfigError(f"--policy {policy!r} is unknown; choose one of {', '.join(POLICIES)}")


def worker_latency(latency: LatencyModel | None, max_num_seqs: int) -> LatencyModel:
    """The step-cost model the front prices workers with: ``latency`` (what ``kvcache calibrate``
    fitted for the workers' model on their machine; default ``LatencyModel()``'s figures) with the
    workers' concurrency (``--max-num-seqs``, the sequences a worker's engine runs at once) as
    ``max_num_seqs`` and their engine's chunk budget as ``max_num_batched_tokens``, whatever the
    calibrated file says: the model must describe the workers."""
    return dataclasses.replace(
        latency or LatencyModel(),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=ENGINE_MAX_NUM_BATCHED_TOKENS,
    )


async def _watch(front: Front, workers: list[WorkerProcess], stop: asyncio.Event, url: str) -> str | None:
    """Until ``stop``: the failure of a worker that exited before it joined, or of a front whose
    block size is not the deployment's (its first worker's), if one does. Reports each worker as
    it joins, and ``url`` once all have (a front without workers of its own: once the pool holds
    one of the deployment's)."""
    ours = [w.worker_id for w in workers]
    joined: set[str] = set()
    ready = False
    while not stop.is_set():
        for worker_id in ours:
            if worker_id not in joined and worker_id in front.pool.workers:
                joined.add(worker_id)
                print(
                    f"kvcache: worker {worker_id} ready ({len(joined)}/{len(ours)})",
                    file=sys.stderr,
                    flush=True,
                )
        first = front.pool.first
        if first is not None and first.block_size != front.router.block_size:
            return (
                f"the deployment's workers key blocks of {first.block_size} tokens (worker "
                f"{first.worker_id}); this front was started with --block-size {front.router.block_size}: "
                "start it with the deployment's --model, --block-size and --max-num-seqs"
            )
        if not ready and len(joined) == len(ours) and front.pool.workers:
            ready = True
            print(f"kvcache serving {front.model_name} on {url}", flush=True)
        for worker in workers:
            if worker.worker_id not in joined and worker.process.poll() is not None:
                await asyncio.sleep(0.2)  # let the relay thread take its last lines
                return worker.failure()
        await asyncio.sleep(0.2)
    return None


async def run_front(front: Front, host: str, port: int, workers: list[WorkerProcess] | None = None) -> None:
    """Serve ``front`` on ``host:port`` until SIGINT/SIGTERM, or until one of ``workers`` exits
    before joining (then ``ConfigError`` with its error). Without ``workers`` it is a front only,
    one more front of the deployment whose Redis it follows (``kvcache serve --workers 0``)."""
    workers = workers or []
    runner = front.runner()
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        if workers:
            print(
                f"kvcache: starting {len(workers)} worker(s) of {front.model_name}; waiting for them to load",
                file=sys.stderr,
                flush=True,
            )
        else:
            where = urlsplit(front.pool.redis_url or "")
            print(
                f"kvcache: front only: joining the deployment at Redis {where.hostname}:{where.port}; "
                "waiting for one of its workers",
                file=sys.stderr,
                flush=True,
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watch = asyncio.create_task(_watch(front, workers, stop, f"http://{host}:{port}"))
        await asyncio.wait([watch, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        failure = await watch
        if failure is not None:
            raise ConfigError(failure)
    finally:
        await runner.cleanup()


def make_front(
    *,
    config: ServeConfig,
    model: str,
    tokenizer: Tokenizer,
    redis_url: str,
    policy: str,
    mode: str,
    block_size: int,
    keys: auth.DeploymentKeys,
    served_names: tuple[str, ...] = (),
    max_prompt_tokens: int | None = None,
    latency: LatencyModel | None = None,
    max_num_seqs: int = ENGINE_MAX_NUM_SEQS,
    limits: ConnectionLimits | None = None,
    read_timeout_s: float = READ_TIMEOUT_S,
) -> Front:
    """The front with its router running one of the router's policies; ``affinity`` prices workers
    with ``worker_latency(latency, max_num_seqs)``. ``served_names``: the names clients use (the first is
    reported; default ``model``); ``limits``: its connection limits (default ``ConnectionLimits()``);
    ``read_timeout_s``: how long a worker may stay silent on a request (its first token included)
    before the client gets a 504."""
    from kvcache.router import Router, RouteRequest

    check_policy(policy)
    latency = worker_latency(latency, max_num_seqs)
    router = Router(policy=policy, mode=mode, block_size=block_size, latency=latency)
    names = served_names or (model,)
    return Front(
        config=config,
        router=router,
        tokenizer=tokenizer,
        model_name=names[0],
        redis_url=redis_url,
        route_request=RouteRequest,
        keys=keys,
        served_names=names[1:],
        max_prompt_tokens=max_prompt_tokens,
        limits=limits,
        max_num_seqs=max_num_seqs,
        read_timeout_s=read_timeout_s,
    )
