"""The embedding example of docs/router.md runs as written, and the Router's own contract."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvcache import BlockStored, ConfigError, RequestError
from kvcache.router import Router, RouteRequest

DOC = Path(__file__).resolve().parent.parent / "docs" / "router.md"


def test_docs_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "docs/router.md has no python example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    assert namespace["placements"] == [namespace["first"]] * 3  # the session sticks to its worker
    assert namespace["cached"] == [0, 992, 1088]


def test_router_contract() -> None:
    now = [0.0]
    router = Router("lpm", "precise", 4, clock=lambda: now[0])
    with pytest.raises(ConfigError, match="no workers"):
        router.route(RouteRequest("a", [], 4))
    router.add_worker(7)
    with pytest.raises(ConfigError, match="already added"):
        router.add_worker(7)
    assert router.route(RouteRequest("a", [b"k" * 16], 6)) == 7
    with pytest.raises(RequestError, match="already routed"):
        router.route(RouteRequest("a", [b"k" * 16], 6))
    with pytest.raises(RequestError, match="inconsistent"):
        router.route(RouteRequest("b", [b"k" * 16] * 3, 6))
    assert router.remove_worker(7) == ["a"]
    with pytest.raises(RequestError, match="not routed"):
        router.on_finished("a")
    with pytest.raises(ConfigError, match="policy='best' is unknown"):
        Router("best")
    with pytest.raises(ConfigError, match="mode='exact' is unknown"):
        Router(mode="exact")


def test_approx_mode_learns_from_its_own_decisions() -> None:
    now = [0.0]
    router = Router("lpm", "approx", 4, ttl_ms=1000.0, seed=1, clock=lambda: now[0])
    for w in range(4):
        router.add_worker(w)
    keys = [bytes([i]) * 16 for i in range(3)]
    first = router.route(RouteRequest("a", keys, 12))
    assert router.route(RouteRequest("b", keys, 12)) == first
    now[0] = 5000.0  # past the TTL: the router no longer assumes the worker holds them
    placements = {router.route(RouteRequest(f"c{i}", [bytes([9, i]) * 8], 4)) for i in range(20)}
    assert len(placements) > 1


def test_router_takes_any_hashable_worker_ids() -> None:
    """Worker ids are the caller's (names, (host, port) pairs); policies hand back the same."""
    router = Router("lpm", "precise", 4, clock=lambda: 0.0)
    ids = [("10.0.0.1", 8000), ("10.0.0.2", 8000), "w3"]
    for w in ids:
        router.add_worker(w)  # type: ignore[arg-type]
    key = b"k" * 16
    router.on_events(ids[1], [BlockStored(key, b"", 0, "s")])  # type: ignore[arg-type]
    assert router.route(RouteRequest("a", [key], 4)) == ids[1]
    router.remove_worker(ids[1])  # type: ignore[arg-type]
    assert router.route(RouteRequest("b", [key], 4)) in (ids[0], ids[2])
