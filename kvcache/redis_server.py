"""Start a private ``redis-server`` on loopback: how the project, its commands and tests get Redis.

The pod tier (ICMS emulation) and the HTTP server share blocks and events through Redis. Nothing
here assumes one is running: :func:`start_redis` finds the ``redis-server`` binary (installing
Debian's package with ``apt-get`` when it is missing and we may), starts it bound to 127.0.0.1 on a
free port with persistence off, waits until it answers ``PING``, and returns a handle that stops it.

Access is by password, as the Redis documentation advises for any server more than one user can
reach: the default user is disabled and one ACL user, ``kvcache``, gets a generated password and
every command except administration (``CONFIG``, ``SHUTDOWN``, ``ACL``, ``FLUSHALL``, ``KEYS``,
...). The password is written to a config file only the owner can read (never on the command
line, where ``ps`` shows it); ``url`` carries it, so treat the URL as a secret.
Failure to start raises :class:`RedisUnavailable` with the reason; callers that need Redis must let
it propagate (tests fail loudly rather than skip).

Redis runs in a session of its own (a Ctrl-C aimed at the caller's terminal does not reach it), so
a caller killed with SIGKILL could not stop it. ``start_redis(stop_with_parent=True)`` closes that
gap on Linux: the server is started through util-linux's ``setpriv --pdeathsig TERM``, and the
kernel sends it SIGTERM when the thread that started it ends, however it ends. Call it from a
thread that lives as long as the server should (``kvcache serve`` does, from its main thread).
Without ``setpriv`` the server starts unguarded and ``RedisServer.stops_with_parent`` says so.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kvcache.errors import KVCacheError

__all__ = [
    "RedisServer",
    "RedisUnavailable",
    "command_bytes",
    "find_redis_server",
    "is_memory_size",
    "start_redis",
]


class RedisUnavailable(KVCacheError):
    """``redis-server`` could not be found, installed or started."""


def _install_with_apt() -> None:
    if shutil.which("apt-get") is None:
        raise RedisUnavailable("redis-server is not installed and apt-get is not available to install it")
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise RedisUnavailable("redis-server is not installed; run: apt-get install redis-server")
        sudo = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        done = subprocess.run([*sudo, *cmd], env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RedisUnavailable(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")


def find_redis_server(install: bool = True) -> str:
    """Path of ``redis-server``; installs Debian's package first when ``install`` and it is missing."""
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/sbin/redis-server"):
        if candidate and Path(candidate).exists():
            return candidate
    if not install:
        raise RedisUnavailable("redis-server is not installed")
    _install_with_apt()
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(path).exists():
        raise RedisUnavailable("redis-server is still missing after apt-get install")
    return path


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


USER = "kvcache"


def command_bytes(*args: str) -> bytes:
    """One Redis command in RESP, the protocol's wire form."""
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _ping(port: int, password: str, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(command_bytes("AUTH", USER, password) + command_bytes("PING"))
            reply = b""
            while len(reply) < 12 and not reply.startswith(b"-"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
            return reply.startswith(b"+OK\r\n+PONG")
    except OSError:
        return False


def _write_config(path: Path, lines: list[str]) -> None:
    """Created 0600 before anything is written: the password is never readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


@dataclass
class RedisServer:
    """A running private ``redis-server``; :meth:`stop` (or leaving the ``with`` block) ends it."""

    port: int
    process: subprocess.Popen[bytes]
    workdir: tempfile.TemporaryDirectory[str] = field(repr=False)
    password: str = field(default="", repr=False)
    stops_with_parent: bool = False  # the kernel stops it when the starting thread ends

    @property
    def url(self) -> str:
        """``redis://kvcache:PASSWORD@127.0.0.1:PORT/0``: a secret; pass it in the environment."""
        return f"redis://{USER}:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def config_path(self) -> Path:
        return Path(self.workdir.name, "redis.conf")

    def alive(self) -> bool:
        return self.process.poll() is None and _ping(self.port, self.password)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.workdir.cleanup()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def is_memory_size(text: str) -> bool:
    """``text`` is a size Redis' ``maxmemory`` takes: digits and an optional b, kb, mb or gb."""
    return re.fullmatch(r"[0-9]+(b|kb|mb|gb)?", text.lower()) is not None and int(re.sub(r"\D", "", text)) > 0


def start_redis(
    port: int | None = None,
    *,
    maxmemory: str | None = None,
    install: bool = True,
    timeout: float = 10.0,
    stop_with_parent: bool = False,
) -> RedisServer:
    """Start ``redis-server`` on 127.0.0.1 (a free port unless ``port``), persistence off.

    ``maxmemory`` (e.g. ``"256mb"``) caps it with LRU eviction of keys, as a capacity-bounded tier wants.
    ``stop_with_parent``: the server gets SIGTERM when the calling thread ends, even by SIGKILL
    (see the module docstring; needs ``setpriv``).
    """
    if maxmemory is not None and not is_memory_size(maxmemory):
        raise RedisUnavailable(f"maxmemory={maxmemory!r} must be a size such as '256mb'")
    binary = find_redis_server(install=install)
    if port is not None and _port_in_use(port):
        raise RedisUnavailable(f"port {port} on 127.0.0.1 is in use; pick another or leave it unset")
    port = port or _free_port()
    workdir = tempfile.TemporaryDirectory(prefix="kvcache-redis-")
    password = secrets.token_hex(24)
    lines = [
        "bind 127.0.0.1",
        f"port {port}",
        'save ""',
        "appendonly no",
        f'dir "{workdir.name}"',
        "protected-mode yes",
        "loglevel warning",
        "user default off",
        f"user {USER} on >{password} ~* &* +@all -@admin -@dangerous +info +dbsize",
    ]
    if maxmemory:
        lines += [f"maxmemory {maxmemory}", "maxmemory-policy allkeys-lru"]
    config = Path(workdir.name, "redis.conf")
    _write_config(config, lines)
    guard = shutil.which("setpriv") if stop_with_parent else None
    argv = [binary, str(config)] if guard is None else [guard, "--pdeathsig", "TERM", binary, str(config)]
    with Path(workdir.name, "redis.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = Path(workdir.name, "redis.log").read_text(errors="replace")[-400:]
            workdir.cleanup()
            raise RedisUnavailable(f"redis-server exited with code {process.returncode}: {text}")
        if _ping(port, password):
            return RedisServer(
                port=port,
                process=process,
                workdir=workdir,
                password=password,
                stops_with_parent=guard is not None,
            )
        time.sleep(0.02)
    process.kill()
    process.wait()
    workdir.cleanup()
    raise RedisUnavailable(f"redis-server did not answer PING on 127.0.0.1:{port} within {timeout:.0f}s")
