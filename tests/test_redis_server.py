"""The private redis-server starter: it comes up on loopback, answers, and stops cleanly."""

from __future__ import annotations

import socket

import pytest

from kvcache.redis_server import RedisUnavailable, start_redis


def test_starts_on_loopback_answers_and_stops() -> None:
    with start_redis(maxmemory="16mb") as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.alive()
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
            sock.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
            reply = b""
            while not reply.endswith(b"v\r\n"):
                reply += sock.recv(64)
        assert reply == b"+OK\r\n$1\r\nv\r\n"
        process = server.process
    assert process.poll() is not None
    assert not server.alive()


def test_busy_port_is_a_clear_error() -> None:
    with start_redis() as first, pytest.raises(RedisUnavailable, match=r"port \d+ on 127.0.0.1 is in use"):
        start_redis(first.port, timeout=3)
