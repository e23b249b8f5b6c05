"""The deployment secret and what it protects, without processes: keys, MACs, the pool's checks.

End-to-end attacks on a running deployment are in ``test_serve_attacks``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from kvcache import BlockManager, CacheConfig, redis_server
from kvcache.cache.events import BlockRemoved, BlockStored, CacheEvent
from kvcache.cache.tenancy import Scope
from kvcache.errors import AuthError, ConfigError
from kvcache.router import Router, RouteRequest
from kvcache.router.index import PreciseIndex
from kvcache.serve import auth, launch, wire
from kvcache.serve.metrics import ServeMetrics
from kvcache.serve.pool import WorkerPool
from kvcache.serve.wire import Registration, WorkerLoad

SECRET = bytes(range(32))
KEYS = auth.DeploymentKeys.from_secret(SECRET)
OTHER = auth.DeploymentKeys.from_secret(bytes(range(1, 33)))


def test_derived_keys_are_distinct_per_purpose_and_never_printed() -> None:
    parts = [
        KEYS.instance_root_key,
        KEYS.block_key,
        KEYS.registration_key,
        KEYS.heartbeat_key,
        KEYS.events_key,
        KEYS.pseudonym_key,
        KEYS.notice_key,
        KEYS.tier_key,
    ]
    assert len(set(parts)) == 8 and all(len(p) == 32 for p in parts)
    assert auth.DeploymentKeys.from_secret(SECRET) == KEYS  # deterministic: every process agrees
    assert KEYS.block_key != OTHER.block_key
    assert repr(KEYS) == "DeploymentKeys(<redacted>)"


def test_a_worker_credential_opens_one_worker_instance_only() -> None:
    mine = KEYS.worker_credential("w0", "i0")
    assert KEYS.check_worker_call(f"Bearer {mine}", "w0", "i0") is None
    assert KEYS.check_worker_call(None, "w0", "i0") == 401
    assert KEYS.check_worker_call(f"Basic {mine}", "w0", "i0") == 401
    assert KEYS.check_worker_call("Bearer ", "w0", "i0") == 403
    assert KEYS.check_worker_call(f"Bearer {mine}", "w1", "i0") == 403  # another worker
    assert KEYS.check_worker_call(f"Bearer {mine}", "w0", "i1") == 403  # the same worker, restarted
    assert KEYS.check_worker_call(f"Bearer {OTHER.worker_credential('w0', 'i0')}", "w0", "i0") == 403
    assert KEYS.worker_credential("w0", "i0i") != KEYS.worker_credential("w0i", "0i")  # no ambiguity


def test_only_the_registered_instance_answers_the_challenge() -> None:
    challenge = bytes(range(16))
    answer = {"worker_id": "w0", "instance": "i0", "proof": KEYS.hello_proof("w0", "i0", challenge)}
    raw = json.dumps(answer).encode()
    assert KEYS.check_hello(raw, challenge, ("w0", "i0")) == ("w0", "i0")
    assert KEYS.check_hello(raw, challenge, None) == ("w0", "i0")  # any worker of the deployment
    with pytest.raises(AuthError, match=r"worker w0 \(instance i9\) was expected; 'w0' \(instance 'i0'\)"):
        KEYS.check_hello(raw, challenge, ("w0", "i9"))
    with pytest.raises(AuthError, match="the proof does not verify"):
        KEYS.check_hello(raw, bytes(16), ("w0", "i0"))  # an old answer to another challenge
    with pytest.raises(AuthError, match="the proof does not verify"):
        KEYS.check_hello(
            json.dumps({**answer, "proof": OTHER.hello_proof("w0", "i0", challenge)}).encode(),
            challenge,
            ("w0", "i0"),
        )
    credential = {**answer, "proof": KEYS.worker_credential("w0", "i0")}  # what a leak gives: no proof
    with pytest.raises(AuthError, match="the proof does not verify"):
        KEYS.check_hello(json.dumps(credential).encode(), challenge, ("w0", "i0"))
    with pytest.raises(AuthError, match="not a worker's"):
        KEYS.check_hello(b"HTTP/1.1 200 OK", challenge, ("w0", "i0"))


def test_secret_from_env_or_an_owner_only_file(tmp_path: Path) -> None:
    assert auth.load_secret({}) is None
    assert auth.load_secret({auth.SECRET_ENV: SECRET.hex()}) == SECRET
    with pytest.raises(ConfigError, match="must be hex"):
        auth.load_secret({auth.SECRET_ENV: "not hex"})
    with pytest.raises(ConfigError, match="holds 4 bytes"):
        auth.load_secret({auth.SECRET_ENV: "00112233"})
    path = tmp_path / "secret"
    auth.write_secret_file(path, SECRET)
    assert path.stat().st_mode & 0o777 == 0o600
    assert auth.load_secret({auth.SECRET_FILE_ENV: str(path)}) == SECRET
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"-rw-r--r--.*chmod 600"):
        auth.load_secret({auth.SECRET_FILE_ENV: str(path)})


def test_a_redis_password_on_the_command_line_is_refused() -> None:
    with pytest.raises(ConfigError, match="KVCACHE_REDIS_URL"):
        auth.redis_url("redis://kvcache:hunter2@10.0.0.5:6379/0", {})
    assert auth.redis_url("redis://10.0.0.5:6379/0", {}) == "redis://10.0.0.5:6379/0"
    assert auth.redis_url(None, {auth.REDIS_URL_ENV: "redis://u:p@h:1/0"}) == "redis://u:p@h:1/0"


def test_a_redis_that_answers_without_a_password_is_refused() -> None:
    """What ``protected-mode no`` (or no ACL password) looks like from a client: PING answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"+PONG\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port} answers commands without a password"):
            auth.refuse_open_redis(f"redis://127.0.0.1:{port}/0")
        thread.join()


def test_a_worker_without_the_secret_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcache.commands import worker

    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    monkeypatch.delenv(auth.SECRET_FILE_ENV, raising=False)
    with pytest.raises(ConfigError, match="needs its deployment's secret"):
        worker.run(argparse.Namespace(connect="redis://127.0.0.1:1/0"))


def test_workers_get_the_secret_and_redis_url_in_their_environment_never_argv() -> None:
    url = "redis://kvcache:pw-123@127.0.0.1:7000/0"
    argv = launch.WorkerArgs().argv("w0")
    assert not any("pw-123" in a or SECRET.hex() in a or "redis://" in a for a in argv)
    env = launch.worker_env(url, SECRET)
    assert env[auth.REDIS_URL_ENV] == url and env[auth.SECRET_ENV] == SECRET.hex()


def registration(
    worker_id: str = "w0", keys: auth.DeploymentKeys = KEYS, num_blocks: int = 64
) -> Registration:
    check = auth.key_check(keys.hasher(block_size=16, model_id="tiny", adapter_id=None))
    return Registration(
        worker_id, "http://127.0.0.1:1", f"inst-{worker_id}", 1, "tiny", 16, 256, None, num_blocks, check
    )


def test_registrations_verify_only_when_signed_fresh_and_unaltered() -> None:
    reg = registration().to_json()
    now = time.time()
    signed = KEYS.sign_registration(reg, now)
    assert KEYS.open_registration(signed, now + 1) == reg
    with pytest.raises(AuthError, match="MAC"):
        OTHER.open_registration(signed, now)
    tampered = json.loads(signed)
    tampered["registration"] = reg.replace("127.0.0.1:1", "10.6.6.6:80")
    with pytest.raises(AuthError, match="MAC"):
        KEYS.open_registration(json.dumps(tampered), now)
    with pytest.raises(AuthError, match="fresher than 30 s"):
        KEYS.open_registration(signed, now + 120)
    with pytest.raises(AuthError, match="not a signed envelope"):
        KEYS.open_registration(reg, now)  # an unsigned registration, as a forger writes it


def test_front_notices_open_only_when_signed_by_the_deployment() -> None:
    notice = json.dumps({"instance": "i0", "reason": "another model"})
    signed = KEYS.sign_notice(notice)
    assert KEYS.open_notice(signed) == notice
    assert OTHER.open_notice(signed) is None  # another deployment's front
    forged = json.loads(signed)
    forged["notice"] = json.dumps({"instance": "i1", "reason": "another model"})
    assert KEYS.open_notice(json.dumps(forged)) is None
    assert KEYS.open_notice(notice) is None  # unsigned, as anyone who can write Redis would put it
    assert KEYS.open_notice(b"\xff not json") is None
    # a registration envelope is not a notice: the purposes have separate keys
    assert KEYS.open_notice(KEYS.sign_registration(notice, time.time())) is None


def test_the_front_keys_blocks_exactly_as_a_worker_block_manager_does() -> None:
    from kvcache.model.tokenize import ByteTokenizer
    from kvcache.router import RouteRequest
    from kvcache.serve.config import ServeConfig, TenantSpec
    from kvcache.serve.front import Front

    front = Front(
        config=ServeConfig(),
        router=Router(),
        tokenizer=ByteTokenizer(),
        model_name="tiny",
        redis_url=None,
        route_request=RouteRequest,
        keys=KEYS,
    )
    reg = registration()
    front.pool.add(reg)
    tokens = list(range(1, 81))
    worker = BlockManager(
        CacheConfig(num_blocks=8, block_size=16, model_id="tiny", deployment_key=KEYS.block_key)
    )
    expected = worker.hash(tokens, Scope("acme")).keys
    keyed = front._keys(tokens, TenantSpec("acme"))
    assert keyed is not None and keyed.keys == expected and len(expected) == 5
    unkeyed = BlockManager(CacheConfig(num_blocks=8, block_size=16, model_id="tiny"))
    assert set(unkeyed.hash(tokens, Scope("acme")).keys).isdisjoint(expected)
    assert auth.key_check(worker.hasher) == reg.key_check


def make_pool() -> tuple[WorkerPool, Router]:
    router = Router(policy="round_robin")
    return WorkerPool(router, ServeMetrics(), None, keys=KEYS), router


def entry(
    reg: Registration,
    seq: int,
    events: list[CacheEvent],
    keys: auth.DeploymentKeys = KEYS,
    load: WorkerLoad | None = None,
) -> dict[bytes, bytes]:
    data = wire.encode_events(events)
    raw_load = load.encode() if load is not None else b""
    mac = keys.sign_events(reg.worker_id, reg.instance, seq, data, raw_load)
    out = {
        b"worker": reg.worker_id.encode(),
        b"instance": reg.instance.encode(),
        b"seq": str(seq).encode(),
        b"events": data,
        b"mac": mac,
    }
    if load is not None:
        out[b"load"] = raw_load
    return out


def stored(i: int) -> BlockStored:
    return BlockStored(i.to_bytes(16, "little"), bytes(16), i, "p:0")


def test_a_worker_hashing_with_another_secret_never_joins() -> None:
    async def scenario() -> None:
        pool, router = make_pool()
        pool.add(registration("w9", keys=OTHER))
        assert pool.workers == {} and router.workers == []
        pool.add(registration("w0"))
        assert router.workers == ["w0"]

    asyncio.run(scenario())


def test_forged_and_replayed_event_batches_are_dropped() -> None:
    async def scenario() -> None:
        pool, router = make_pool()
        reg = registration()
        pool.add(reg)
        pool.apply_events(entry(reg, 0, [stored(i) for i in range(5000)], keys=OTHER))
        unsigned = entry(reg, 0, [stored(1)])
        del unsigned[b"mac"]
        pool.apply_events(unsigned)
        assert router.index.num_keys("w0") == 0
        pool.apply_events(entry(reg, 0, [stored(1), stored(2)]))
        pool.apply_events(entry(reg, 1, [BlockRemoved(stored(1).key, 1, "p:0")]))
        assert router.index.num_keys("w0") == 1
        pool.apply_events(entry(reg, 0, [stored(1), stored(2)]))  # a replay of batch 0
        assert router.index.num_keys("w0") == 1

    asyncio.run(scenario())


def test_the_load_a_batch_carries_is_signed_recorded_and_feeds_the_router() -> None:
    async def scenario() -> None:
        pool, router = make_pool()
        reg = registration()
        pool.add(reg)
        pool.apply_events(entry(reg, 0, [], load=WorkerLoad(3, 2, 0.25)))
        assert pool.workers["w0"].load == WorkerLoad(3, 2, 0.25)
        assert pool.metrics.value("kvcache:num_requests_running", {"worker": "w0"}) == 3
        assert pool.metrics.value("kvcache:num_requests_waiting", {"worker": "w0"}) == 2
        assert pool.metrics.value("kvcache:kv_cache_usage_perc", {"worker": "w0"}) == 0.25
        # Policies see the report beside the router's own count, which a lagging report never inflates.
        router.route(RouteRequest("a", [], 16))
        (view,) = router._views(RouteRequest("r", [], 16), 0.0)
        assert (view.active_requests, view.reported_requests) == (1, 5)
        router.on_finished("a")
        (view,) = router._views(RouteRequest("r", [], 16), 0.0)
        assert (view.active_requests, view.reported_requests) == (0, 5)
        forged = entry(reg, 1, [], load=WorkerLoad(0, 0, 0.0))
        forged[b"load"] = WorkerLoad(99, 0, 0.0).encode()  # Redis rewrites the load: the MAC fails
        pool.apply_events(forged)
        assert pool.workers["w0"].load == WorkerLoad(3, 2, 0.25)
        with pytest.raises(ValueError, match="not a worker load"):
            WorkerLoad.decode(b"[1, -2, 0.5]")
        pool.mark_down("w0")
        assert pool.metrics.value("kvcache:num_requests_running", {"worker": "w0"}) == 0

    asyncio.run(scenario())


def test_a_workers_index_never_exceeds_its_capacity_and_drops_the_oldest() -> None:
    async def scenario() -> None:
        pool, router = make_pool()
        reg = registration(num_blocks=64)
        pool.add(reg)
        index = router.index
        assert isinstance(index, PreciseIndex)  # the router's one index, bounded per worker
        pool.apply_events(entry(reg, 0, [stored(i) for i in range(5000)]))
        assert index.num_keys("w0") == 64 and pool.num_indexed("w0") == 64
        assert list(index.keys_of["w0"]) == [stored(i).key for i in range(4936, 5000)]
        assert index.holders.keys() == {stored(i).key for i in range(4936, 5000)}
        pool.apply_events(entry(reg, 1, [stored(4936)]))  # stored again: now the newest
        pool.apply_events(entry(reg, 2, [stored(7000)]))
        assert next(iter(index.keys_of["w0"])) == stored(4938).key
        assert list(index.keys_of["w0"])[-2:] == [stored(4936).key, stored(7000).key]
        assert index.num_keys("w0") == 64
        assert pool.metrics.value("kvcache:router_indexed_blocks", {"worker": "w0"}) == 64
        index.check()

    asyncio.run(scenario())


def test_a_registration_without_a_valid_pool_size_is_refused() -> None:
    async def scenario() -> None:
        pool, router = make_pool()
        for bad in (0, -3):
            reg = registration(f"w{-bad}", num_blocks=bad)
            pool.add(reg)
            assert f"num_blocks={bad}," in pool.refused[reg.instance]
        assert pool.workers == {} and router.workers == []

    asyncio.run(scenario())


def test_pseudonyms_are_stable_per_deployment_and_hide_the_tenant() -> None:
    name = KEYS.pseudonym("tenant:acme")
    assert name == KEYS.pseudonym("tenant:acme") and name.startswith("p:") and "acme" not in name
    assert name != KEYS.pseudonym("tenant:globex") and name != OTHER.pseudonym("tenant:acme")


def test_a_served_pod_tier_authenticates_blocks_with_the_deployment_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from kvcache.serve import engine_setup
    from kvcache.serve.config import ServeConfig
    from kvcache.tiers import IcmsTier, Seal

    with caplog.at_level(logging.WARNING, logger="kvcache.tiers.icms"):
        engine, names = engine_setup.load_engine(
            "tiny",
            ServeConfig(),
            num_blocks=16,
            block_size=16,
            threads=1,
            seed=0,
            redis_url="redis://127.0.0.1:1/0",
            worker_id="w0",
            deployment_key=KEYS.block_key,
            tier_secret=KEYS.tier_key,
        )
    tier = engine.tiers.tiers[0]
    assert isinstance(tier, IcmsTier) and names == ("pod",)
    assert tier.seal.authenticated and tier.seal == Seal.keyed(KEYS.tier_key)
    assert "not authenticated" not in caplog.text


def test_a_redis_that_accepts_a_wrong_password_is_refused(tmp_path: Path) -> None:
    """A real redis-server whose ``kvcache`` user is ``on nopass``: PING alone is refused, so only
    AUTH with a wrong password shows that anyone gets in."""
    port = redis_server._free_port()
    config = tmp_path / "redis.conf"
    config.write_text(
        f'bind 127.0.0.1\nport {port}\nsave ""\nappendonly no\ndir "{tmp_path}"\n'
        "user default off\nuser kvcache on nopass ~* &* +@all\n"
    )
    server = subprocess.Popen([redis_server.find_redis_server(), str(config)], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, username="kvcache", password="anything")
        deadline = time.monotonic() + 10
        while True:  # up once AUTH with any password answers
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        refused = f"127.0.0.1:{port} accepts a wrong password for user 'kvcache'"
        with pytest.raises(ConfigError, match=refused):
            auth.refuse_open_redis(f"redis://kvcache:the-real-one@127.0.0.1:{port}/0")
    finally:
        server.terminate()
        server.wait(10)


def test_a_redis_with_a_password_passes() -> None:
    with redis_server.start_redis() as server:
        auth.refuse_open_redis(server.url)  # no error: the password is needed, a wrong one is refused
