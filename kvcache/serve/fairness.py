"""Seats per tenant: how many requests one tenant may have in flight on one worker.

A worker runs ``max_num_seqs`` sequences per step and lets ``--max-waiting`` more wait; neither
knows tenants, so without a rule one tenant's long streams take every running seat and every
waiting one, and another tenant waits for them to end or is refused. The front therefore counts
each tenant's requests in flight on each worker (from the call to the worker until its answer
ends, waiting on the worker included) and sends a request only to a worker where its tenant
holds fewer than ``seats(tenant)``: ``max_share x max_num_seqs``, at least 1 (a share of 1 is no
cap: the tenant may take every running seat and every waiting one). With shares below 1,
every worker keeps running seats that one tenant cannot take, so another tenant's request is
admitted at the worker's next step instead of after the flood. A tenant at its seats on every
worker is answered 429 with ``Retry-After`` at once; nothing is queued for it.

The rule is a static cap per key, as nginx's ``limit_conn`` and Envoy's per-cluster
``max_requests`` are, not borrowing: a tenant alone on the deployment still stops at its share.
Running seats cannot be taken back without preempting a stream, which the engine does only
for memory; a cap that holds at all times is what keeps another tenant's time to first token
bounded by one step plus its own prefill.

Not here: which worker among the allowed ones (the router), the tenants' shares (``config``).
"""

from __future__ import annotations

import math

from kvcache.serve.config import TenantSpec


class TenantSeats:
    """In-flight requests by (tenant, worker) against each tenant's per-worker seats."""

    def __init__(self, max_num_seqs: int) -> None:
        assert max_num_seqs >= 1
        self.max_num_seqs = max_num_seqs
        self._held: dict[tuple[str, str], int] = {}

    def seats(self, tenant: TenantSpec) -> int | None:
        """The tenant's requests in flight allowed on one worker; ``None``: no cap."""
        if tenant.max_share >= 1:
            return None
        return max(1, math.floor(tenant.max_share * self.max_num_seqs + 1e-9))

    def held(self, tenant: str, worker_id: str) -> int:
        return self._held.get((tenant, worker_id), 0)

    def has_room(self, tenant: TenantSpec, worker_id: str) -> bool:
        seats = self.seats(tenant)
        return seats is None or self.held(tenant.name, worker_id) < seats

    def take(self, tenant: str, worker_id: str) -> None:
        key = (tenant, worker_id)
        self._held[key] = self._held.get(key, 0) + 1

    def give(self, tenant: str, worker_id: str) -> None:
        key = (tenant, worker_id)
        left = self._held[key] - 1
        assert left >= 0
        if left:
            self._held[key] = left
        else:
            del self._held[key]  # the dict holds only seats in use
