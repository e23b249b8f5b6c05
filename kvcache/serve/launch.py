"""Start a whole deployment on one machine: Redis (unless given), N worker processes, the front.

``kvcache serve`` is this module behind argparse. Workers are separate processes running
``kvcache worker``, exactly what an operator starts on another machine; the front finds them
through Redis like any remote worker. The Redis URL (with its password) and the deployment
secret reach workers in their environment (``KVCACHE_REDIS_URL``, ``KVCACHE_SECRET``), never in
argv, where any local user could read them. On SIGINT/SIGTERM the front stops, then
the workers, then the Redis it started.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from kvcache.serve import auth
from kvcache.serve.config import ServeConfig
from kvcache.serve.front import Front
from kvcache.serve.routing import ServiceEstimate, make_ttft_policy
from kvcache.serve.tokenize import Tokenizer


@dataclass(frozen=True, slots=True)
class WorkerArgs:
    """What every worker of a deployment is started with (``kvcache worker`` flags)."""

    model: str = "tiny"
    num_blocks: int = 1024
    block_size: int = 16
    threads: int = 1
    config_path: str | None = None
    pod_tier: bool = True

    def argv(self, worker_id: str) -> list[str]:
        argv = [sys.executable, "-m", "kvcache.cli", "worker", "--worker-id", worker_id,
                "--model", self.model, "--num-blocks", str(self.num_blocks),
                "--block-size", str(self.block_size), "--threads", str(self.threads)]  # fmt: skip
        if self.config_path:
            argv += ["--config", self.config_path]
        if not self.pod_tier:
            argv += ["--no-pod-tier"]
        return argv


def worker_env(redis_url: str, secret: bytes) -> dict[str, str]:
    """The environment a worker starts with: ours plus the deployment's Redis URL and secret."""
    return {**os.environ, auth.REDIS_URL_ENV: redis_url, auth.SECRET_ENV: secret.hex()}


def spawn_workers(args: WorkerArgs, redis_url: str, secret: bytes,
                  num_workers: int) -> list[subprocess.Popen[bytes]]:  # fmt: skip
    env = worker_env(redis_url, secret)
    return [subprocess.Popen(args.argv(f"w{i}"), env=env) for i in range(num_workers)]


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


async def run_front(front: Front, host: str, port: int) -> None:
    """Serve ``front`` on ``host:port`` until SIGINT/SIGTERM."""
    runner = web.AppRunner(front.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"kvcache serving {front.model_name} on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def make_front(*, config: ServeConfig, model: str, tokenizer: Tokenizer, redis_url: str, policy: str,
               mode: str, block_size: int, keys: auth.DeploymentKeys) -> Front:  # fmt: skip
    """The front with its router; ``policy="ttft"`` is ``routing.make_ttft_policy``, any other name
    one of the router's policies."""
    from kvcache.router import Router, RouteRequest

    estimate = None
    chosen: Any = policy
    if policy == "ttft":
        estimate = ServiceEstimate()
        chosen = make_ttft_policy(estimate)
    router: Any = Router(policy=chosen, mode=mode, block_size=block_size)
    return Front(config=config, router=router, tokenizer=tokenizer, model_name=model, redis_url=redis_url,
                 route_request=RouteRequest, keys=keys, estimate=estimate)  # fmt: skip
