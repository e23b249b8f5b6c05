"""Attacks on a running deployment from inside its trust boundary, each of which must fail.

The session's shared deployment (``serve_harness``): a local user who can reach a worker's port,
one who can read ``ps``, one who can read Redis and one who can write it. These tests leave the
deployment as they found it (forged Redis entries are deleted again).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from serve_harness import Deployment, ids, shared

from kvcache.cache.events import BlockStored
from kvcache.cache.hashing import Hasher, key_prompt, tokens_to_bytes
from kvcache.cache.tenancy import Scope
from kvcache.serve import auth, wire
from kvcache.serve.wire import Registration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Deployment:
    return shared(tmp_path_factory, pytestconfig)


def post(url: str, body: dict[str, Any], token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode())
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def indexed(server: Deployment) -> dict[str, int]:
    return {w: s["indexed_blocks"] for w, s in server.workers().items()}


def test_a_worker_serves_only_the_front(server: Deployment) -> None:
    prompt = ids(7000, 160)
    assert server.request("/v1/completions", {"prompt": prompt, "max_tokens": 2}, key="sk-acme")[0] == 200
    body = {"request_id": "x-1", "token_ids": prompt, "tenant": "acme", "group": None, "max_tokens": 2}
    keys = auth.DeploymentKeys.from_secret(server.secret)
    before = indexed(server)
    for worker_id, worker in server.workers().items():
        assert worker["url"].startswith("http://127.0.0.1:")  # loopback by default
        missing = (401, b'{"error": "missing worker credential"}')
        assert post(worker["url"] + "/generate", body, None) == missing
        wrong = auth.DeploymentKeys.from_secret(bytes(32)).worker_credential(worker_id, worker["instance"])
        refused = (403, b'{"error": "wrong worker credential"}')
        assert post(worker["url"] + "/generate", body, wrong) == refused
    assert indexed(server) == before  # the engine never ran: nothing was stored, nothing published
    w0 = server.workers()["w0"]
    credential = keys.worker_credential("w0", w0["instance"])
    status, out = post(w0["url"] + "/generate", {**body, "max_tokens": 1}, credential)
    assert status == 200 and b'"token_id"' in out  # the instance's credential is what opens the door


def test_no_secret_in_argv_or_logs_and_redis_wants_a_password(server: Deployment) -> None:
    keys = auth.DeploymentKeys.from_secret(server.secret)
    secrets = [
        server.redis.password,
        server.secret.hex(),
        *(keys.worker_credential(w, s["instance"]) for w, s in server.workers().items()),
    ]
    pids = [server.redis.process.pid, server.process.pid, *(w["pid"] for w in server.workers().values())]
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    # The deployment is shared between test modules: a worker another module killed may still be
    # listed until its heartbeat lapses; it has no command line left to leak from.
    assert server.process.pid in alive and len(alive) >= 2
    for pid in alive:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert not any(s in cmdline for s in secrets), f"a secret is on pid {pid}'s command line"
    log = server.log_path.read_text()
    assert not any(s in log for s in secrets)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.redis.port).ping()


def test_redis_readers_cannot_test_a_guess_of_a_tenants_prompt(server: Deployment) -> None:
    prompt = ids(7100, 176)  # 11 blocks
    assert server.request("/v1/completions", {"prompt": prompt, "max_tokens": 2}, key="sk-acme")[0] == 200
    keys = auth.DeploymentKeys.from_secret(server.secret)
    client = redis.Redis.from_url(server.redis.url)
    raw = next(iter(client.hgetall(wire.WORKERS_KEY).values()))
    reg = Registration.from_json(keys.open_registration(raw, time.time()))
    scope, prompt_bytes = Scope("acme").chain_scope, tokens_to_bytes(prompt)
    keyed_hasher = keys.hasher(block_size=16, model_id=reg.model_id, adapter_id=None)
    keyed = set(key_prompt(keyed_hasher, prompt_bytes, scope, {}).keys)
    guess = set(key_prompt(Hasher(block_size=16, model_id=reg.model_id), prompt_bytes, scope, {}).keys)

    def published() -> tuple[set[bytes], set[str]]:
        event_keys, scopes = set(), set()
        for _id, fields in client.xrange(wire.EVENTS_STREAM):
            for event in wire.decode_events(fields[b"events"]):
                event_keys.add(event.key)
                scopes.add(event.scope)
        return event_keys, scopes

    server.wait_for("the prompt's events", lambda: keyed <= published()[0])
    event_keys, scopes = published()
    assert len(keyed) == 11 and not guess & event_keys  # keys without the secret match nothing
    assert not any("acme" in s or "tenant:" in s or "group:" in s for s in scopes)
    assert keys.pseudonym("tenant:acme") in scopes


def test_forged_workers_and_events_written_to_redis_never_reach_the_router(server: Deployment) -> None:
    client = redis.Redis.from_url(server.redis.url)
    real = server.workers()
    before = indexed(server)
    fake = Registration("evil", "http://127.0.0.1:9", "evil-1", 1, "tiny", 16, 256, None, 1 << 20, "0" * 16)
    forged_envelope = json.dumps({"registration": fake.to_json(), "signed_at": time.time(), "mac": "00" * 16})
    w0 = real["w0"]
    stolen = json.loads(client.hget(wire.WORKERS_KEY, "w0"))
    moved = json.dumps(
        {**stolen, "registration": stolen["registration"].replace(w0["url"], "http://127.0.0.1:9")}
    )
    try:
        client.hset(wire.WORKERS_KEY, "evil", fake.to_json())  # the unsigned form
        client.hset(wire.WORKERS_KEY, "evil2", forged_envelope.replace("evil", "evil2"))
        client.hset(wire.WORKERS_KEY, "w0x", moved)  # a real worker's MAC over fields altered to point here
        for worker_id in ("evil", "evil2", "w0x"):
            client.set(wire.alive_key(worker_id), f"{worker_id}-1" if "evil" in worker_id else w0["instance"])
        events = wire.encode_events(
            [BlockStored(i.to_bytes(16, "little"), bytes(16), i, "p:0") for i in range(5000)]
        )
        client.xadd(wire.EVENTS_STREAM, {"worker": "w0", "instance": w0["instance"], "events": events})
        client.xadd(
            wire.EVENTS_STREAM,
            {
                "worker": "w0",
                "instance": w0["instance"],
                "seq": "999999",
                "events": events,
                "mac": b"\x00" * 16,
            },
        )
        # A real request after the forgeries: once its events are indexed, the forged ones were read.
        server.request("/v1/completions", {"prompt": ids(7200, 64), "max_tokens": 2}, key="sk-globex")
        server.wait_for(
            "the real request's events", lambda: sum(indexed(server).values()) > sum(before.values())
        )
        time.sleep(4 * 0.25)  # several registration polls
        assert set(server.workers()) == set(real)
        assert all(n <= 256 for n in indexed(server).values())  # --num-blocks 256
        assert sum(indexed(server).values()) - sum(before.values()) <= 4  # only the real prompt's blocks
    finally:
        client.hdel(wire.WORKERS_KEY, "evil", "evil2", "w0x")
        client.delete(*(wire.alive_key(w) for w in ("evil", "evil2", "w0x")))
