"""Who can read the vLLM KV event stream a kvcache worker publishes: loopback unless secured,
ZeroMQ CURVE (only listed subscribers connect, the bytes are encrypted), no token ids unless asked
for, and no tenant name in clear (keys are salted with the deployment's keyed pseudonym)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth
from deployment import KEYS

from kvcache import ConfigError
from kvcache.cache.config import CacheConfig
from kvcache.cache.manager import BlockManager
from kvcache.cache.tenancy import Scope
from kvcache.child import python_argv
from kvcache.router.index import PreciseIndex
from kvcache.vllm.curve import CurveClient, CurveServer, is_loopback, local_endpoint
from kvcache.vllm.events import BlockStored, EngineEventBridge, EventPublisher, decode_batch, index_key
from kvcache.vllm.keys import VllmKeyer
from kvcache.vllm.public import public_salt
from kvcache.vllm.subscriber import EventSubscriber

PROMPT = [911, 912, 913, 914, 915, 916, 917, 918, 919]  # two full blocks of 4


def _endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_bare_ports_bind_loopback_and_a_wide_bind_needs_curve() -> None:
    assert local_endpoint("5557") == "tcp://127.0.0.1:5557"
    assert local_endpoint("ipc:///run/kv.sock") == "ipc:///run/kv.sock"
    assert is_loopback("tcp://127.0.0.1:5557") and is_loopback("tcp://[::1]:5557")
    assert not is_loopback("tcp://*:5557") and not is_loopback("tcp://0.0.0.0:5557")
    assert not is_loopback("tcp://10.0.0.7:5557") and not is_loopback("tcp://127.0.0.1.evil.example:5557")
    assert not is_loopback("tcp://eth0:5557") and not is_loopback("udp://127.0.0.1:5557")
    for wide in ("tcp://*:5557", "tcp://0.0.0.0:5557"):
        with pytest.raises(ConfigError, match="without CURVE"):
            EventPublisher(wide)
    with pytest.raises(ConfigError, match="without CURVE"):
        EventPublisher(_endpoint(), "tcp://*:5558")  # the replay history too
    with pytest.raises(ConfigError, match="a port or a ZMQ endpoint"):
        local_endpoint("localhost:5557")


def _publish_as_a_worker(token_ids: bool) -> list[list[bytes]]:
    """acme's prompt through a kvcache engine's block events, as the worker publishes them; the
    frames a plain subscriber receives."""
    keyer = VllmKeyer(block_size=4, public_salt=public_salt(KEYS))
    manager = BlockManager(CacheConfig(num_blocks=8, block_size=4))
    endpoint = _endpoint()
    publisher = EventPublisher(endpoint)
    bridge = EngineEventBridge(publisher, keyer, manager, KEYS.pseudonym, token_ids=token_ids)
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.connect(endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        deadline = time.monotonic() + 10
        while not sub.poll(50):  # PUB/SUB joins asynchronously
            publisher.publish([])
            assert time.monotonic() < deadline
        while sub.poll(50):
            sub.recv_multipart()
        manager.allocate("r1", PROMPT, Scope("acme"))
        bridge.publish_engine_events(PROMPT, Scope("acme"), manager.drain_events())
        assert sub.poll(5000)
        return [sub.recv_multipart()]
    finally:
        sub.close(linger=0)
        publisher.close()


def test_token_ids_are_not_published_unless_asked_and_no_tenant_name_is() -> None:
    keyer = VllmKeyer(block_size=4)
    for token_ids in (False, True):
        [frames] = _publish_as_a_worker(token_ids)
        wire = b"".join(frames)
        assert b"acme" not in wire
        [event] = decode_batch(frames[2]).events
        assert isinstance(event, BlockStored)
        assert event.token_ids == (PROMPT[:8] if token_ids else [])
        # salted with acme's keyed pseudonym: nobody without the secret computes these keys
        assert event.block_hashes == keyer.keys(PROMPT, cache_salt=KEYS.pseudonym("tenant:acme"))
        assert event.block_hashes != keyer.keys(PROMPT, cache_salt="acme")


def _certificates(tmp_path: Path) -> dict[str, Path]:
    """Key pairs of a publisher, the subscriber it lists, and an intruder it does not."""
    keys, clients = tmp_path / "keys", tmp_path / "clients"
    keys.mkdir()
    clients.mkdir()
    out = {}
    for name in ("server", "router", "intruder"):
        public, secret = zmq.auth.create_certificates(keys, name)
        os.chmod(secret, 0o600)
        out[name], out[name + ".public"] = Path(secret), Path(public)
    (clients / "router.key").write_bytes(out["router.public"].read_bytes())
    out["clients"] = clients
    return out


def _received(sub: EventSubscriber, publisher: EventPublisher, index: PreciseIndex, seconds: float) -> bool:
    """Publish a stored key for ``seconds``; whether the subscriber's index got it."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        publisher.publish([BlockStored([42], None, [], 4, None, None)])
        sub.poll(50)
        if index.overlap(sub.engine, [index_key(42)]):
            return True
    return False


def test_curve_publisher_accepts_only_listed_subscribers_with_its_key(tmp_path: Path) -> None:
    certs = _certificates(tmp_path)
    server = CurveServer.load(certs["server"], certs["clients"])
    events, replay = _endpoint(), _endpoint()
    publisher = EventPublisher(events, replay, curve=server)
    index = PreciseIndex(capacity_blocks=10)
    trusted = EventSubscriber(
        "trusted", index, events, curve=CurveClient.load(certs["router"], certs["server.public"])
    )
    # knows the server's public key but is not listed; has no key at all; expects another server
    intruder = EventSubscriber(
        "intruder", index, events, curve=CurveClient.load(certs["intruder"], certs["server.public"])
    )
    plain = EventSubscriber("plain", index, events)
    wrong = EventSubscriber(
        "wrong", index, events, curve=CurveClient.load(certs["router"], certs["router.public"])
    )
    try:
        assert _received(trusted, publisher, index, 10.0)
        for sub in (intruder, plain, wrong):
            assert not _received(sub, publisher, index, 1.0), sub.engine
            assert sub.next_seq is None  # not one message
        # the replay history answers only a listed subscriber too
        ctx = zmq.Context.instance()
        for client in (None, CurveClient.load(certs["intruder"], certs["server.public"])):
            dealer = ctx.socket(zmq.DEALER)
            if client is not None:
                client.secure(dealer)
            dealer.connect(replay)
            dealer.send_multipart([b"", (0).to_bytes(8, "big")], flags=zmq.NOBLOCK)
            assert not dealer.poll(1000)
            dealer.close(linger=0)
    finally:
        for sub in (trusted, intruder, plain, wrong):
            sub.close()
        publisher.close()


def test_curve_keys_come_from_owner_only_files(tmp_path: Path) -> None:
    certs = _certificates(tmp_path)
    os.chmod(certs["server"], 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        CurveServer.load(certs["server"], certs["clients"])
    os.chmod(certs["server"], 0o600)
    with pytest.raises(ConfigError, match=r"no NAME\.key"):
        CurveServer.load(certs["server"], tmp_path / "keys" / "..")
    os.chmod(certs["router.public"], 0o600)
    with pytest.raises(ConfigError, match="no valid secret-key"):
        CurveClient.load(certs["router.public"], certs["server.public"])  # a public file as the secret one
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        CurveClient.load(fifo, certs["server.public"])


def test_the_worker_refuses_a_wide_event_bind_without_curve_before_loading() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens: the Redis check passes, no engine loads
    env = {**os.environ, "KVCACHE_SECRET": "ab" * 32, "CUDA_VISIBLE_DEVICES": ""}
    argv = ["worker", "--connect", f"redis://127.0.0.1:{closed}", "--vllm-events", "tcp://*:5557"]
    proc = subprocess.run(
        [*python_argv(), "-m", "kvcache.cli", *argv], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kvcache worker: error: KV events endpoint tcp://*:5557"), last
    assert "without CURVE" in last
