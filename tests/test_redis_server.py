"""The private redis-server starter: it comes up on loopback, answers, and stops cleanly."""

from __future__ import annotations

import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from kvcache.child import python_argv
from kvcache.redis_server import RedisUnavailable, command_bytes, start_redis


def _exchange(port: int, payload: bytes, replies: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(payload)
        reply = b""
        while reply.count(b"\r\n") < replies:
            reply += sock.recv(256)
    return reply


def test_starts_on_loopback_answers_and_stops() -> None:
    with start_redis(maxmemory="16mb") as server:
        assert server.url == f"redis://kvcache:{server.password}@127.0.0.1:{server.port}/0"
        assert server.alive()
        auth = command_bytes("AUTH", "kvcache", server.password)
        reply = _exchange(server.port, auth + command_bytes("SET", "k", "v") + command_bytes("GET", "k"), 4)
        assert reply == b"+OK\r\n+OK\r\n$1\r\nv\r\n"
        process = server.process
    assert process.poll() is not None
    assert not server.alive()


def test_a_password_is_required_and_never_on_the_command_line() -> None:
    with start_redis() as server:
        assert len(server.password) >= 32
        assert _exchange(server.port, b"PING\r\n", 1).startswith(b"-NOAUTH")
        wrong = _exchange(server.port, command_bytes("AUTH", "kvcache", "guess") + command_bytes("PING"), 2)
        assert wrong.startswith(b"-WRONGPASS")
        default_user = _exchange(server.port, command_bytes("AUTH", "default", "") + command_bytes("PING"), 2)
        assert default_user.startswith(b"-WRONGPASS")
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert server.password.encode() not in cmdline
        assert stat.S_IMODE(server.config_path.stat().st_mode) == 0o600
        assert server.password not in Path(server.workdir.name, "redis.log").read_text()
        # Administration is not the deployment user's: it cannot reconfigure (protected-mode,
        # requirepass), wipe or stop the server.
        auth = command_bytes("AUTH", "kvcache", server.password)
        for command in (("CONFIG", "SET", "protected-mode", "no"), ("FLUSHALL",), ("SHUTDOWN",)):
            assert b"-NOPERM" in _exchange(server.port, auth + command_bytes(*command), 2)


def test_config_injection_through_maxmemory_is_refused() -> None:
    with pytest.raises(RedisUnavailable, match="maxmemory"):
        start_redis(maxmemory="1mb\nuser default on nopass")


def test_busy_port_is_a_clear_error() -> None:
    with start_redis() as first, pytest.raises(RedisUnavailable, match=r"port \d+ on 127.0.0.1 is in use"):
        start_redis(first.port, timeout=3)


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts: it no longer runs)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith(("Z", "X"))
    except FileNotFoundError:
        return True


def test_a_server_started_to_stop_with_its_parent_stops_when_the_parent_is_killed() -> None:
    """SIGKILL gives the caller no chance to stop Redis; the kernel's parent-death signal does."""
    child = subprocess.Popen(
        python_argv(
            "-c",
            "import sys, time\n"
            "from kvcache.redis_server import start_redis\n"
            "server = start_redis(stop_with_parent=True)\n"
            "print(server.process.pid, server.stops_with_parent, flush=True)\n"
            "time.sleep(120)\n",
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        pid_text, guarded = child.stdout.readline().split()
        redis_pid = int(pid_text)
        assert guarded == "True"
        assert not _gone(redis_pid)
        assert b"redis-server" in Path(f"/proc/{redis_pid}/cmdline").read_bytes()
        child.kill()
        child.wait(timeout=10)
        deadline = time.monotonic() + 20
        while not _gone(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(redis_pid)
    finally:
        child.kill()
        child.wait()
