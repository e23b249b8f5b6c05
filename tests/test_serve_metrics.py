"""Prefix-cache counters per tier, worker and tenant."""

from __future__ import annotations

from kvcache.serve.metrics import ServeMetrics


def test_tiers_are_queried_for_what_the_tiers_above_missed() -> None:
    m = ServeMetrics()
    m.record_cache("w0", "acme", 100, {"device": 32, "pod": 48})
    m.record_cache("w0", "acme", 50, {"device": 0, "pod": 0})
    q = "kvcache:prefix_cache_queries_total"
    h = "kvcache:prefix_cache_hits_total"
    dev = {"tier": "device", "worker": "w0", "tenant": "acme"}
    pod = {**dev, "tier": "pod"}
    assert (m.value(q, dev), m.value(h, dev)) == (150.0, 32.0)
    assert (m.value(q, pod), m.value(h, pod)) == (118.0, 48.0)
    assert m.value(q, {**dev, "tenant": "other"}) == 0.0
    text = m.render(per_tenant=True).decode()
    assert 'kvcache:prefix_cache_hits_total{tenant="acme",tier="pod",worker="w0"} 48.0' in text
    public = m.render().decode()  # what any caller of /metrics gets: aggregates, no tenant names
    assert 'kvcache:prefix_cache_hits_total{tier="pod",worker="w0"} 48.0' in public
    assert 'kvcache:prefix_cache_queries_total{tier="device",worker="w0"} 150.0' in public
    assert "tenant=" not in public and "acme" not in public


def test_each_instance_has_its_own_registry() -> None:
    a, b = ServeMetrics(), ServeMetrics()
    a.retries.inc()
    assert (a.value("kvcache:request_retries_total"), b.value("kvcache:request_retries_total")) == (1.0, 0.0)
