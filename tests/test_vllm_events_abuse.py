"""The vLLM KV event subscriber under a publisher that misbehaves: a huge batch, a flood, gaps the
replay socket never answers (the proxy keeps answering requests), and sequence numbers that go
back (an engine restarted) or jump absurdly (the index resets, never over-reports)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kvcache.router.index import PreciseIndex
from kvcache.vllm.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventPublisher,
    KVEventBatch,
    encode_batch,
    index_key,
)
from kvcache.vllm.keys import VllmKeyer
from kvcache.vllm.proxy import EngineEndpoint, RouteProxy
from kvcache.vllm.subscriber import EventSubscriber

STALL_S = 1.0  # generous: what any single request may wait for the event stream
FLOOD_S = 7.5  # how long the flooding publisher sends


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vkeys(*keys: int) -> list[bytes]:
    return [index_key(k) for k in keys]


def _stored(*keys: int) -> list[BlockStored | BlockRemoved]:
    return [BlockStored(list(keys), None, [], 16, None, None)]


def _wait(sub: EventSubscriber, done: Callable[[], bool], poll: bool = True) -> None:
    deadline = time.monotonic() + 20.0
    while not done():
        if poll:
            sub.poll(50)
        else:
            time.sleep(0.02)
        assert time.monotonic() < deadline, f"subscriber stuck at seq {sub.next_seq}"


def _join(pub: EventPublisher, sub: EventSubscriber) -> None:
    """PUB/SUB joins asynchronously: publish empty batches until the first arrives."""
    deadline = time.monotonic() + 10.0
    while sub.next_seq is None:
        pub.publish([])
        sub.poll(50)
        assert time.monotonic() < deadline


# ---- sequence numbers --------------------------------------------------------------------


def test_an_engine_restart_resets_its_view() -> None:
    endpoint = f"tcp://127.0.0.1:{_port()}"
    index = PreciseIndex(capacity_blocks=100)
    sub = EventSubscriber("e0", index, endpoint)
    old = EventPublisher(endpoint)
    try:
        _join(old, sub)
        for _ in range(100):  # past the sequence numbers the new one sends while it joins
            old.publish([])
        old.publish(_stored(1, 2, 3))
        old.publish(_stored(4))
        _wait(sub, lambda: sub.next_seq == old.seq)
        assert index.overlap("e0", vkeys(1, 2, 3, 4)) == 4
    finally:
        old.close()
    # The engine restarts: its blocks are gone and its sequence starts again at 0.
    new = EventPublisher(endpoint)
    try:
        deadline = time.monotonic() + 10.0
        while index.overlap("e0", vkeys(10)) == 0:
            new.publish(_stored(10))
            sub.poll(50)
            assert time.monotonic() < deadline, "the restarted engine's events were ignored"
        assert sub.num_resets == 1 and sub.num_gaps == 0
        assert index.overlap("e0", vkeys(1)) == 0 and index.num_keys("e0") == 1  # only what it now holds
        new.publish(_stored(11))
        _wait(sub, lambda: index.overlap("e0", vkeys(10, 11)) == 2)
    finally:
        sub.close()
        new.close()


def test_an_absurd_sequence_jump_resets_and_does_not_silence_the_engine() -> None:
    endpoint = f"tcp://127.0.0.1:{_port()}"
    index = PreciseIndex(capacity_blocks=100)
    sub = EventSubscriber("e0", index, endpoint)
    pub = EventPublisher(endpoint)
    try:
        _join(pub, sub)
        pub.publish(_stored(1))
        _wait(sub, lambda: sub.next_seq == pub.seq)
        normal = pub.seq
        pub.seq = 2**64 - 1  # one batch numbered at the very end of the sequence space
        pub.publish(_stored(50))
        _wait(sub, lambda: sub.next_seq == 2**64)
        assert sub.num_resets == 1 and sub.num_gaps == 0  # no replay of 2^64 batches asked for
        assert index.overlap("e0", vkeys(1)) == 0 and index.overlap("e0", vkeys(50)) == 1
        pub.seq = normal  # the engine goes on as before
        pub.publish(_stored(60))
        pub.publish(_stored(70))
        _wait(sub, lambda: sub.next_seq == normal + 2)
        assert sub.num_resets == 2
        assert index.overlap("e0", vkeys(50)) == 0  # never over-reports what the jump claimed
        assert index.overlap("e0", vkeys(60)) == 1 and index.overlap("e0", vkeys(70)) == 1
    finally:
        sub.close()
        pub.close()


def test_an_oversize_batch_is_dropped_counted_and_resets() -> None:
    endpoint = f"tcp://127.0.0.1:{_port()}"
    index = PreciseIndex(capacity_blocks=100)
    sub = EventSubscriber("e0", index, endpoint, max_batch_hashes=8, max_batch_bytes=1000)
    pub = EventPublisher(endpoint)
    try:
        _join(pub, sub)
        pub.publish(_stored(1))
        pub.publish(_stored(*range(100, 109)))  # 9 keys: over the bound
        pub.publish([BlockStored([7], None, list(range(1000)), 16, None, None)])  # over the bytes
        pub.publish(_stored(2))
        _wait(sub, lambda: sub.next_seq == pub.seq)
        assert sub.num_oversize == 2 and sub.num_bad == 0
        # what the dropped batches did is unknown: the view restarted after them
        assert index.overlap("e0", vkeys(1)) == 0 and index.overlap("e0", vkeys(100)) == 0
        assert index.overlap("e0", vkeys(7)) == 0 and index.overlap("e0", vkeys(2)) == 1
    finally:
        sub.close()
        pub.close()


def test_a_clear_is_applied_in_slices_before_what_follows_it() -> None:
    endpoint = f"tcp://127.0.0.1:{_port()}"
    index = PreciseIndex(capacity_blocks=100)
    sub = EventSubscriber("e0", index, endpoint)
    pub = EventPublisher(endpoint)
    sub.start()  # received on its own thread, applied here with drain
    try:
        deadline = time.monotonic() + 10.0
        while sub.next_seq is None:
            pub.publish([])
            time.sleep(0.05)
            assert time.monotonic() < deadline
        pub.publish(_stored(*range(1, 11)))

        def stored_all() -> bool:
            sub.drain(100)
            return index.num_keys("e0") == 10

        _wait(sub, stored_all, poll=False)
        pub.publish([AllBlocksCleared(), BlockStored([99], None, [], 16, None, None)])
        _wait(sub, lambda: sub.pending.qsize() == 2, poll=False)  # the clear, then the batch after it
        assert [(sub.drain(3), index.num_keys("e0")) for _ in range(4)] == [(0, 7), (0, 4), (0, 1), (2, 1)]
        assert index.overlap("e0", vkeys(99)) == 1 and index.overlap("e0", vkeys(10)) == 0
    finally:
        sub.close()
        pub.close()


# ---- the proxy stays responsive ---------------------------------------------------------


class _Scenario:
    """A proxy in front of one stub engine whose event stream the test drives; measures how long
    the event loop and a request wait while the stream misbehaves."""

    def __init__(self, replay: str | None = None) -> None:
        self.events = f"tcp://127.0.0.1:{_port()}"
        self.publisher = EventPublisher(self.events)
        self.replay = replay

    async def run(
        self, abuse: Callable[[EventPublisher, threading.Event], None], until: Callable[[RouteProxy], bool]
    ) -> Any:
        async def completions(request: web.Request) -> web.Response:
            return web.json_response({"object": "text_completion", "choices": [{"text": "ok"}]})

        engine_app = web.Application()
        engine_app.router.add_post("/v1/completions", completions)
        engine = TestServer(engine_app)
        await engine.start_server()
        url = str(engine.make_url("")).rstrip("/")
        endpoint = EngineEndpoint(url, self.events, self.replay)
        proxy = RouteProxy([endpoint], VllmKeyer(16), capacity_blocks=65_536)
        client = TestClient(TestServer(proxy.app()))
        await client.start_server()
        sub = proxy.subscribers[0]
        lags: list[float] = []
        requests: list[float] = []
        try:
            deadline = time.monotonic() + 10
            while sub.next_seq is None:
                self.publisher.publish([])
                await asyncio.sleep(0.05)
                assert time.monotonic() < deadline
            seen = threading.Event()  # the proxy applied what the abuse ended with
            thread = threading.Thread(target=abuse, args=(self.publisher, seen), daemon=True)
            thread.start()
            deadline = time.monotonic() + 60
            while thread.is_alive() or not seen.is_set():
                if until(proxy):
                    seen.set()
                t0 = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - t0 - 0.01)
                t0 = time.monotonic()
                resp = await client.post("/v1/completions", json={"model": "m", "prompt": [1] * 32})
                assert resp.status == 200
                requests.append(time.monotonic() - t0)
                assert time.monotonic() < deadline
            thread.join()
        finally:
            await client.close()
            await engine.close()
            self.publisher.close()
        return sub, max(lags), max(requests)


def test_a_huge_batch_does_not_stall_the_proxy() -> None:
    huge = encode_batch(KVEventBatch(0.0, _stored(*range(2**40, 2**40 + 1_000_000))))  # 9 MB

    def abuse(pub: EventPublisher, seen: threading.Event) -> None:
        with pub.lock:
            seq = pub.seq
            pub.seq += 1
            pub.pub.send_multipart([pub.topic, seq.to_bytes(8, "big"), huge])
        pub.publish(_stored(5))

    scenario = _Scenario()
    sub, lag, request = asyncio.run(scenario.run(abuse, lambda p: p.index.overlap(0, vkeys(5)) == 1))
    print(f"loop lag {lag * 1000:.0f} ms, request {request * 1000:.0f} ms")
    assert lag < STALL_S and request < STALL_S, (lag, request)
    assert sub.num_oversize == 1


def test_a_flooding_publisher_does_not_starve_the_proxy() -> None:
    # The publisher is a thread of this process, so under a loaded machine the GIL alone can hold the
    # loop for a while: the flood lasts FLOOD_S, and an unbounded subscriber stalls the loop for about
    # all of it, while a bounded one's worst stall does not grow with the flood's length.
    def abuse(pub: EventPublisher, seen: threading.Event) -> None:
        end = time.monotonic() + FLOOD_S
        key = 0
        while time.monotonic() < end:  # about 2 M keys a second, more than a proxy applies
            pub.publish(_stored(*range(key, key + 2000)))
            key += 2000
            time.sleep(0.001)  # the publisher is another process: leave this one's GIL alone
        while not seen.is_set():  # a message past ZMQ's high-water mark is dropped: repeat it
            pub.publish(_stored(2**50))
            time.sleep(0.05)

    scenario = _Scenario()
    _, lag, request = asyncio.run(scenario.run(abuse, lambda p: p.index.overlap(0, vkeys(2**50)) == 1))
    print(f"loop lag {lag * 1000:.0f} ms, request {request * 1000:.0f} ms")
    assert lag < FLOOD_S / 3 and request < FLOOD_S / 3, (lag, request)


def test_gaps_with_a_silent_replay_socket_do_not_block_the_proxy() -> None:
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)  # accepts replay requests and never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")

    def abuse(pub: EventPublisher, seen: threading.Event) -> None:
        for k in range(4):
            pub.publish(_stored(100 + k), send=False)  # lost on the wire
            pub.publish(_stored(200 + k))
        pub.publish(_stored(300))

    scenario = _Scenario(replay=f"tcp://127.0.0.1:{port}")
    try:
        sub, lag, request = asyncio.run(scenario.run(abuse, lambda p: p.index.overlap(0, vkeys(300)) == 1))
    finally:
        silent.close(linger=0)
    print(f"loop lag {lag * 1000:.0f} ms, request {request * 1000:.0f} ms")
    assert lag < STALL_S and request < STALL_S, (lag, request)
    assert sub.num_gaps == 4 and sub.num_resyncs == 4
