"""Start a real deployment for end-to-end tests: Redis, ``kvcache serve`` and its worker processes.

``shared`` gives every end-to-end module one deployment (started once per test session,
stopped at its end), because starting worker processes dominates the suite's time. Its config
has API keys: ``acme`` and ``globex`` are private tenants, ``initech``, ``hooli`` and ``piper``
share the group ``partners`` under k-anonymity k=2, and ``small`` has a 2-block quota;
``ADMIN_KEY`` reads the per-tenant metrics and manages public prefixes.

The deployment secret is generated here and, like the Redis URL with its password, passed in
the environment (as an operator would), so tests can compute what the deployment computes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvcache.child import python_argv
from kvcache.redis_server import RedisServer, start_redis
from kvcache.serve import auth

STARTUP_S = 120.0
ADMIN_KEY = "sk-admin"
CONFIG = f"""
k_anonymity = 2
admin_keys = ["{ADMIN_KEY}"]
[tenants.acme]
keys = ["sk-acme"]
[tenants.globex]
keys = ["sk-globex"]
[tenants.initech]
keys = ["sk-initech"]
group = "partners"
[tenants.hooli]
keys = ["sk-hooli"]
group = "partners"
[tenants.piper]
keys = ["sk-piper"]
group = "partners"
[tenants.small]
keys = ["sk-small"]
cap_blocks = 2
"""
_SHARED: list[Deployment] = []


def ids(seed: int, n: int) -> list[int]:
    """``n`` token ids below the byte tokenizer's 256, distinct for distinct seeds."""
    rng = random.Random(seed)
    return [rng.randrange(1, 256) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Deployment:
    url: str
    redis: RedisServer
    process: subprocess.Popen[bytes]
    log_path: Path
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_pids: list[int] = field(default_factory=list)
    config_path: Path | None = None
    secret: bytes = b""
    owns_redis: bool = True  # False for another front's handle (``start_front``): its stop leaves Redis

    def request(
        self,
        path: str,
        body: Any = None,
        key: str | None = None,
        raw: bytes | None = None,
        method: str | None = None,
    ) -> tuple[int, Any]:
        """``(status, decoded JSON body)`` of one request; POST when ``body`` or ``raw`` is given."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stream(
        self, path: str, body: dict[str, Any], key: str | None = None, on_chunk: Any = None
    ) -> list[Any]:
        """Every SSE ``data:`` payload of a streamed request, decoded (``[DONE]`` as the string)."""
        req = urllib.request.Request(self.url + path, data=json.dumps({**body, "stream": True}).encode())
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        out: list[Any] = []
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            for line in resp:
                if line.startswith(b"data: "):
                    payload = line[6:].strip()
                    out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
                    if on_chunk is not None:
                        on_chunk(out[-1])
        return out

    def workers(self) -> dict[str, Any]:
        return self.request("/debug/workers")[1]  # type: ignore[no-any-return]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels`` (read with the admin key, so
        per-tenant series are there)."""
        req = urllib.request.Request(self.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def wait_for(self, what: str, check: Any, timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.05)
        log = self.log_path.read_text()[-3000:]
        raise AssertionError(f"timed out waiting for {what}; server log:\n{log}")

    def start_worker(self, worker_id: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.log_path.open("ab")
        cmd = [
            *python_argv(),
            "-m",
            "kvcache.cli",
            "worker",
            "--worker-id",
            worker_id,
            "--model",
            "tiny",
            "--num-blocks",
            "256",
            *args,
        ]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        env = deployment_env(self.redis, self.secret)
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.extra.append(process)
        return process

    def start_front(self, *args: str) -> Deployment:
        """One more front of this deployment (``kvcache serve --workers 0`` with its Redis and
        secret, on a port of its own), once it answers: a handle that requests go through. This
        deployment's ``stop`` stops it too."""
        port = free_port()
        log_path = self.log_path.with_name(f"front-{port}.log")
        cmd = [
            *python_argv("-m", "kvcache.cli", "serve"),
            *("--workers", "0", "--port", str(port), "--model", "tiny", "--num-blocks", "256", *args),
        ]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        env = deployment_env(self.redis, self.secret)
        process = subprocess.Popen(cmd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env)
        self.extra.append(process)
        front = Deployment(
            f"http://127.0.0.1:{port}",
            self.redis,
            process,
            log_path,
            config_path=self.config_path,
            secret=self.secret,
            owns_redis=False,
        )
        front.wait_for("the front", lambda: _answers(front.url), STARTUP_S)
        return front

    def stop(self) -> None:
        for process in [self.process, *self.extra]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [self.process, *self.extra]:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        for pid in self.worker_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # only if ``serve`` could not stop them itself
        if self.owns_redis:
            self.redis.stop()


def deploy(
    tmp: Path, *, workers: int = 2, config: str | None = None, args: tuple[str, ...] = ()
) -> Deployment:
    """Redis, then ``kvcache serve --workers N`` on it; returns once every worker has joined (with
    ``workers=0``: a front only, once it answers; start workers with ``start_worker``)."""
    redis = start_redis(stop_with_parent=True)
    port = free_port()
    cmd = [
        *python_argv(),
        "-m",
        "kvcache.cli",
        "serve",
        "--workers",
        str(workers),
        "--port",
        str(port),
        "--model",
        "tiny",
        "--num-blocks",
        "256",
        *args,
    ]
    path = None
    if config is not None:
        path = tmp / "serve.toml"
        path.write_text(config)
        cmd += ["--config", str(path)]
    log_path = tmp / "serve.log"
    secret = auth.new_secret()
    process = subprocess.Popen(
        cmd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=deployment_env(redis, secret)
    )
    dep = Deployment(f"http://127.0.0.1:{port}", redis, process, log_path, config_path=path, secret=secret)
    try:
        dep.wait_for("the front", lambda: _answers(dep.url), STARTUP_S)
        dep.wait_for(f"{workers} workers", lambda: len(dep.workers()) == workers, STARTUP_S)
    except BaseException:
        dep.stop()
        raise
    dep.worker_pids = [w["pid"] for w in dep.workers().values()]
    return dep


def deployment_env(redis: RedisServer, secret: bytes) -> dict[str, str]:
    """What ``kvcache serve`` and its workers get: the Redis URL and the secret, never argv."""
    return {**os.environ, auth.REDIS_URL_ENV: redis.url, auth.SECRET_ENV: secret.hex()}


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/health", timeout=1).close()
        return True
    except urllib.error.HTTPError:
        return True  # 503 until a worker joined: the front answers
    except OSError:
        return False


def shared(tmp_path_factory: pytest.TempPathFactory, config: pytest.Config) -> Deployment:
    """The session's deployment (two workers, ``CONFIG``), started on first use."""
    if not _SHARED or _SHARED[0].process.poll() is not None:
        dep = deploy(tmp_path_factory.mktemp("serve"), workers=2, config=CONFIG)
        config.add_cleanup(dep.stop)
        _SHARED[:] = [dep]
    return _SHARED[0]
