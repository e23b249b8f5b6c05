"""Prometheus metrics of the server, named like vLLM's where vLLM has one.

- ``kvcache:prefix_cache_queries`` / ``kvcache:prefix_cache_hits`` (counters, tokens) by ``tier``
  and ``worker`` (and ``tenant``, in the per-tenant rendering only): a tier is queried for the
  prompt tokens the tiers above it missed, and hits the tokens it supplies (``device`` first,
  then lower tiers), so per-tier hit rates read as in vLLM and the sum of hits over tiers is the
  request's ``cached_tokens``;
- ``kvcache:time_to_first_token_seconds``, ``kvcache:inter_token_latency_seconds``,
  ``kvcache:request_queue_time_seconds``, ``kvcache:e2e_request_latency_seconds`` (histograms, by
  worker, measured at the front);
- ``kvcache:num_requests_running``, ``kvcache:num_requests_waiting``, ``kvcache:kv_cache_usage_perc``
  (gauges by worker: the load each worker last reported with its event batches);
- ``kvcache:public_prefix_queries`` / ``kvcache:public_prefix_hits`` (counters, tokens, by
  ``worker``): prompt tokens that lie in published public prefixes, and how many of them the
  worker served from its cache (``serve.public``);
- ``kvcache:requests`` (counter by status code), ``kvcache:request_retries`` (re-sent to another
  worker after one failed), ``kvcache:worker_busy_answers`` (a worker's waiting queue was full),
  ``kvcache:tier_errors`` (lower-tier accesses that failed, by worker:
  Redis unreachable; each is a miss, never a failed request), ``kvcache:workers`` (gauge),
  ``kvcache:router_indexed_blocks`` (gauge by worker: blocks the router believes a worker
  caches, from its events).

``WorkerMetrics`` is a worker's own page (``GET /metrics`` on the worker): the same three gauges
read from its engine when scraped, the four histograms measured at the worker (queue time is
the engine's wait for admission), and ``kvcache:requests_rejected`` (503s for a full waiting
queue).

Every metric lives in the ``ServeMetrics`` object's own registries, never in the process-global
one. ``render()`` gives the public page: no tenant names, since a tenant's counters rise by exactly
its prompt lengths. ``render(per_tenant=True)`` (for admin keys) gives the same families with the
cache counters split by tenant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LOAD_HELP = {
    "num_requests_running": "Requests in the engine's running batch",
    "num_requests_waiting": "Requests waiting for the engine to admit them",
    "kv_cache_usage_perc": "Fraction of the KV block pool in use (0..1)",
}


def _latency(registry: CollectorRegistry, labels: list[str], where: str) -> dict[str, Histogram]:
    """The four latency histograms as vLLM names them, measured ``where``."""
    specs = (
        ("ttft", "time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS),
        ("itl", "inter_token_latency_seconds", "Time between two tokens of a stream", ITL_BUCKETS),
        ("queue", "request_queue_time_seconds", "Time waiting for a worker's engine", QUEUE_BUCKETS),
        ("e2e", "e2e_request_latency_seconds", "Request latency", TTFT_BUCKETS),
    )
    return {
        key: Histogram(f"kvcache:{name}", f"{text} {where}", labels, buckets=buckets, registry=registry)
        for key, name, text, buckets in specs
    }


class WorkerMetrics:
    """One worker's page; ``load`` returns its ``wire.WorkerLoad`` (read when scraped)."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self.registry = r = CollectorRegistry()
        hist = _latency(r, [], "at the worker")
        self.ttft, self.itl, self.queue, self.e2e = hist["ttft"], hist["itl"], hist["queue"], hist["e2e"]
        self.rejected = Counter(
            "kvcache:requests_rejected", "Requests refused with 503: waiting queue full", registry=r
        )
        for name, attr in (
            ("num_requests_running", "num_running"),
            ("num_requests_waiting", "num_waiting"),
            ("kv_cache_usage_perc", "kv_usage"),
        ):
            gauge = Gauge(f"kvcache:{name}", _LOAD_HELP[name], registry=r)
            gauge.set_function(lambda attr=attr: float(getattr(load(), attr)))  # type: ignore[misc]

    def observe_first(self, ttft_s: float, queue_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.queue.observe(queue_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._cache = CollectorRegistry()  # cache counters by tier and worker: public
        self._tenant_cache = CollectorRegistry()  # the same by tenant too: admin keys only
        self.queries, self.hits = self._cache_counters(["tier", "worker"], self._cache)
        self.tenant_queries, self.tenant_hits = self._cache_counters(
            ["tier", "worker", "tenant"], self._tenant_cache
        )
        hist = _latency(r, ["worker"], "at the front")
        self.ttft, self.itl, self.queue, self.e2e = hist["ttft"], hist["itl"], hist["queue"], hist["e2e"]
        self.running, self.waiting, self.kv_usage = (
            Gauge(f"kvcache:{name}", f"{text}, as the worker last reported", ["worker"], registry=r)
            for name, text in _LOAD_HELP.items()
        )
        self.requests = Counter(
            "kvcache:requests", "Requests answered, by HTTP status", ["status"], registry=r
        )
        self.retries = Counter(
            "kvcache:request_retries", "Requests re-sent after a worker failed", registry=r
        )
        self.busy = Counter(
            "kvcache:worker_busy_answers",
            "503 + Retry-After answers from workers whose waiting queue was full",
            registry=r,
        )
        self.tier_errors = Counter(
            "kvcache:tier_errors", "Lower-tier lookups that failed (counted misses)", ["worker"], registry=r
        )
        self.workers = Gauge("kvcache:workers", "Workers the router routes to", registry=r)
        self.public_queries = Counter(
            "kvcache:public_prefix_queries",
            "Prompt tokens in published public prefixes",
            ["worker"],
            registry=r,
        )
        self.public_hits = Counter(
            "kvcache:public_prefix_hits",
            "Prompt tokens in published public prefixes served from the cache",
            ["worker"],
            registry=r,
        )
        self.indexed = Gauge(
            "kvcache:router_indexed_blocks",
            "Blocks the router believes a worker caches",
            ["worker"],
            registry=r,
        )

    @staticmethod
    def _cache_counters(labels: list[str], registry: CollectorRegistry) -> tuple[Counter, Counter]:
        queries = Counter(
            "kvcache:prefix_cache_queries",
            "Prompt tokens looked up in a cache tier",
            labels,
            registry=registry,
        )
        hits = Counter(
            "kvcache:prefix_cache_hits", "Prompt tokens served from a cache tier", labels, registry=registry
        )
        return queries, hits

    def record_cache(self, worker: str, tenant: str, prompt_tokens: int, tier_hits: dict[str, int]) -> None:
        """Count one request's lookups: ``tier_hits`` in lookup order, device first."""
        remaining = prompt_tokens
        for tier, hit_tokens in tier_hits.items():
            assert 0 <= hit_tokens <= remaining, (tier, hit_tokens, remaining)
            self.queries.labels(tier, worker).inc(remaining)
            self.hits.labels(tier, worker).inc(hit_tokens)
            self.tenant_queries.labels(tier, worker, tenant).inc(remaining)
            self.tenant_hits.labels(tier, worker, tenant).inc(hit_tokens)
            remaining -= hit_tokens

    def record_public(self, worker: str, public_tokens: int, cached_tokens: int) -> None:
        """One request's public part: ``public_tokens`` lead the prompt and are matched first, so the
        cached ones among them are ``min(public_tokens, cached_tokens)``."""
        if public_tokens:
            self.public_queries.labels(worker).inc(public_tokens)
            self.public_hits.labels(worker).inc(min(public_tokens, cached_tokens))

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0.0 when absent): for tests and the benchmark report."""
        labels = labels or {}
        registries = (self._tenant_cache,) if "tenant" in labels else (self._cache, self.registry)
        for registry in registries:
            value = registry.get_sample_value(name, labels)
            if value is not None:
                return value
        return 0.0

    def render(self, per_tenant: bool = False) -> bytes:
        cache = self._tenant_cache if per_tenant else self._cache
        return generate_latest(self.registry) + generate_latest(cache)
