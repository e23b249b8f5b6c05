"""Public prefixes on vLLM's side: how many leading blocks of a request ``kvcache route`` keys in
the public scope, so that it keys requests exactly as kvcache workers' event bridges publish them.

A kvcache worker keys a prompt's public head (its longest run of leading full blocks that belong
to a published prefix, ``hashing.public_head``) in the public scope, and its event bridge
publishes those blocks under the same vLLM keys whichever tenant stored them (``vllm.keys``,
``public_blocks``). ``PublicHead`` holds the deployment's published prefixes as the workers do:
it reads the signed set from the deployment's Redis (``wire.PUBLIC_KEY``) through
``serve.public.PublicSetReader`` every ``period_s`` (a set that does not verify, or an older one,
is ignored with one error line) and counts a prompt's public blocks with ``hashing.public_head``,
the block manager's rule. Without Redis it counts none: every block is keyed in the caller's own
scope, and it says so once in its log.

``public_salt`` is the public scope's ``cache_salt``: the deployment's keyed pseudonym of
``tenancy.PUBLIC_SCOPE``. No tenant can send it: a tenant's salt is the pseudonym of its own chain
scope (``tenant:``, ``group:``, ``salted:``), never ``public``, and a body's ``cache_salt`` only
narrows that scope.

Not here: the key scheme (``keys``), the set's signing and distribution (``serve.public``),
routing (``proxy``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from kvcache.cache import hashing
from kvcache.cache.tenancy import PUBLIC_SCOPE
from kvcache.errors import KVCacheError
from kvcache.serve import wire
from kvcache.serve.auth import DeploymentKeys
from kvcache.serve.public import PublicSetReader

log = logging.getLogger("kvcache.route")
# Only this process compares these keys (to count public blocks), so no model or secret enters them.
_HEAD_MODEL = "kvcache-route-public-head"


def public_salt(keys: DeploymentKeys) -> str:
    """The ``cache_salt`` of the public scope in a kvcache deployment (see the module docstring)."""
    return keys.pseudonym(PUBLIC_SCOPE)


class PublicHead:
    """The deployment's published prefixes, followed from Redis; ``num_public_blocks`` of a prompt."""

    def __init__(
        self,
        block_size: int,
        keys: DeploymentKeys,
        redis_url: str | None,
        *,
        period_s: float = wire.HEARTBEAT_S,
    ) -> None:
        self.hasher = hashing.Hasher(block_size=block_size, model_id=_HEAD_MODEL)
        self.reader = PublicSetReader(keys)
        self.redis_url = redis_url
        self.period_s = period_s
        self.published: hashing.Published = {}
        self.version = 0  # of the set in ``published``; 0: none yet

    def set(self, version: int, prefixes: Sequence[Sequence[int]]) -> None:
        """Make ``prefixes`` the published ones; ``InvalidTokensError`` (nothing changes) when one is
        not a list of token ids."""
        published: hashing.Published = {}
        for tokens in prefixes:
            hashing.publish_prefix(self.hasher, hashing.tokens_to_bytes(tokens), published)
        self.published, self.version = published, version

    def num_public_blocks(self, token_ids: Sequence[int]) -> int:
        """How many leading full blocks of ``token_ids`` the workers key in the public scope."""
        if not self.published:
            return 0
        keys, _ = hashing.public_head(self.hasher, hashing.tokens_to_bytes(token_ids), self.published)
        return len(keys)

    async def refresh(self, client: Any) -> bool:
        """Read the set once from ``client`` (a Redis client); whether a newer one was taken."""
        opened = await self.reader.read(client)
        if opened is None:
            return False
        try:
            self.set(*opened)
        except KVCacheError as exc:
            log.error("public prefixes (version %d) not applied: %s", opened[0], exc)
            return False
        log.info("keying %d public prefix(es), version %d", len(opened[1]), opened[0])
        return True

    async def follow(self) -> None:
        """Read the set every ``period_s`` until cancelled; without Redis, log that once and return."""
        if self.redis_url is None:
            log.warning(
                "no Redis for the deployment (--connect or KVCACHE_REDIS_URL): public prefixes are "
                "not followed, and every block is keyed in the caller's scope"
            )
            return
        import redis.asyncio as aioredis

        client: Any = aioredis.Redis.from_url(self.redis_url, socket_timeout=2.0, socket_connect_timeout=1.0)
        try:
            while True:
                try:
                    await self.refresh(client)
                except Exception as exc:  # Redis down: the last set stays, the next period tries again
                    log.debug("public prefixes not read (%s)", type(exc).__name__)
                await asyncio.sleep(self.period_s)
        finally:
            await client.aclose()
