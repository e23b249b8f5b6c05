"""The front's connection limits under a slowloris client: header time, connections in total and
per address, and log volume (``kvcache.serve.limits``), against a scripted in-process worker."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from test_serve_front import ScriptedWorker, post, run_front

from kvcache.errors import ConfigError
from kvcache.serve import limits
from kvcache.serve.front import Front
from kvcache.serve.limits import ConnectionLimits, RepeatFilter

ALPHABET = "abcdefghijklmnopqrstuvwxyz"  # what the scripted worker answers, cycled
HALF_REQUEST = b"POST /v1/completions HTT"  # half a request line, never finished


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within_s) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_a_slowloris_flood_leaves_health_requests_and_streams_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """50 connections that each send half a request line, against a front limited to 20 connections
    (20 per address): the oldest idle ones are closed to make room, /health and a completion
    from a new connection are answered, a stream in progress is never cut, the rest are closed
    once their header time runs out, and the log does not grow by a line per connection."""
    caplog.set_level(logging.DEBUG)
    worker = ScriptedWorker(delay_s=0.05)  # a stream of 40 tokens lasts 2 s, past the header time

    async def scenario(front: Front, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        async with aiohttp.ClientSession() as session:
            stream = await session.post(
                url + "/v1/completions", json={"prompt": "hi", "max_tokens": 40, "stream": True}
            )
            assert stream.status == 200
            first = await stream.content.readline()
            assert first.startswith(b"data: {")
            sockets = []
            for _ in range(50):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(HALF_REQUEST)
                await writer.drain()
                sockets.append((reader, writer))
            async with session.get(url + "/health") as resp:
                assert resp.status == 200 and (await resp.json())["workers"] == 1
            status, body = await post(url + "/v1/completions", {"prompt": "hi", "max_tokens": 3})
            assert status == 200 and body["choices"][0]["text"] == "abc"
            assert front.guard.num_open <= 20
            # Room was made by closing the flood's oldest connections, at once.
            early = await asyncio.gather(*(closed_by_server(r, 0.5) for r, _ in sockets[:30]))
            assert all(early), early.count(False)
            # The stream, busy all along, was never closed for a limit or for the header time.
            rest = await stream.content.read()
            events = [
                json.loads(line[6:]) for line in (first + rest).split(b"\n\n") if line.startswith(b"data: {")
            ]
            assert "".join(e["choices"][0]["text"] for e in events) == ALPHABET + ALPHABET[:14]
            stream.release()
            # The survivors never finish their request line: closed when the header time runs out.
            late = await asyncio.gather(*(closed_by_server(r, 10.0) for r, _ in sockets[30:]))
            assert all(late), late.count(False)
            for _, writer in sockets:
                writer.close()
        assert front.guard.num_evicted >= 30 and front.guard.num_refused == 0

    run_front(
        worker,
        scenario,
        limits=ConnectionLimits(header_timeout_s=1.0, max_connections=20, max_connections_per_client=20),
    )
    lines = [
        r
        for r in caplog.records
        if r.name.startswith(("kvcache", "aiohttp", "asyncio")) and r.levelno >= logging.INFO
    ]
    assert len(lines) <= 5, [(r.name, r.getMessage()) for r in lines]
    summaries = [r.getMessage() for r in lines if r.getMessage().startswith("connection limits")]
    assert summaries and "(20 in all, 20 per client address): closed 1 idle connection(s)" in summaries[0]
    assert "most from 127.0.0.1 (1)" in summaries[0]


def test_when_every_connection_is_busy_a_new_one_is_closed_and_the_busy_ones_finish() -> None:
    worker = ScriptedWorker(delay_s=0.05)

    async def scenario(front: Front, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        async with aiohttp.ClientSession() as session:
            streams = [
                await session.post(
                    url + "/v1/completions", json={"prompt": "hi", "max_tokens": 20, "stream": True}
                )
                for _ in range(2)
            ]
            for stream in streams:
                assert (await stream.content.readline()).startswith(b"data: {")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await closed_by_server(reader, 5.0)
            writer.close()
            for stream in streams:
                assert (await stream.content.read()).endswith(b"data: [DONE]\n\n")
                stream.release()
        assert front.guard.num_refused == 1 and front.guard.num_evicted == 0

    run_front(worker, scenario, limits=ConnectionLimits(max_connections=2, max_connections_per_client=2))


def test_a_body_that_never_arrives_is_408() -> None:
    async def scenario(front: Front, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"pro')
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
        assert head.startswith("HTTP/1.1 408"), head
        length = next(
            int(line.split(":")[1])
            for line in head.split("\r\n")
            if line.lower().startswith("content-length:")
        )
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        assert "did not arrive within 0.5 s" in json.loads(body)["error"]["message"]
        writer.close()

    run_front(ScriptedWorker(), scenario, limits=ConnectionLimits(body_timeout_s=0.5))


def test_repeated_log_lines_are_capped_per_window_and_the_next_one_counts_the_drops() -> None:
    now = [0.0]
    repeat = RepeatFilter(burst=2, window_s=10.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)

    assert [repeat.filter(record("accept failed")) for _ in range(5)] == [True, True, False, False, False]
    assert repeat.filter(record("another message"))
    now[0] = 10.0
    first = record("accept failed")
    assert repeat.filter(first) and first.getMessage() == "accept failed [3 more like this dropped in 10 s]"


def test_limits_are_checked_and_fitted_to_the_file_descriptor_limit() -> None:
    with pytest.raises(ConfigError, match="header_timeout_s=0"):
        ConnectionLimits(header_timeout_s=0)
    with pytest.raises(ConfigError, match="max_connections=0"):
        ConnectionLimits(max_connections=0)
    assert ConnectionLimits(max_connections=100).per_client == 25
    assert ConnectionLimits(max_connections=100, max_connections_per_client=500).per_client == 100
    assert limits.fd_budget(64) == 64
    with pytest.raises(ConfigError, match=r"--max-connections 100000000 needs 200000256 file descriptors"):
        limits.fd_budget(10**8)
