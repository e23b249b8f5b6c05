"""Public prefixes in the server: what an operator declares every tenant may share.

A public prefix (a system prompt, a tool catalogue, a document) is keyed in the public scope
(``BlockManager.set_published``), so its blocks are computed once and hit by every tenant from
its first request, while whatever follows it stays in the tenant's own scope. Operators declare
them in the config file (``[[public_prefixes]]``, ``config.PublicPrefixSpec``) and through the
front's admin endpoint (admin keys only)::

    POST   /admin/public-prefixes        {"system": "..."} | {"text": "..."} | {"token_ids": [...]}
    GET    /admin/public-prefixes        the set, its version, and which workers applied it
    DELETE /admin/public-prefixes/{id}

An id is a digest of the prefix's token ids, so adding the same prefix twice changes nothing and
answers the same id; removing an absent id answers ``"deleted": false``. The set is the
deployment's, kept in Redis (below): a change through any front applies to every front, and
outlives a front's restart as long as Redis keeps it (``kvcache serve`` without ``--redis`` starts
a new Redis each time). A front that starts adds its config's prefixes to the set (nothing changes
when they are there already); a prefix taken out of a config stays until it is deleted here.

Rendering: ``system`` is a system message as chat requests render it (the chat template), cut
to the tokens every conversation starting with that message shares, whatever comes next (the
common prefix of several continuations), so a chat request whose messages start with it matches
it token for token; ``text`` is tokenized as a completion prompt is; ``token_ids`` are taken as
given.

Distribution: each front holds the set and keeps it in step with Redis (``wire.PUBLIC_KEY``: a
notice signed with the deployment's notice key, ``auth``, with a version that only grows), at once
on a change of its own and every ``wire.HEARTBEAT_S``. A newer set another front wrote replaces
its own, and the changes made here since apply to it again, so two fronts' concurrent changes
both hold (where they leave the set as stored, the front takes the stored version). A front
writes its set where Redis lacks it (a change, a flushed or restarted Redis, an older set) with
a conditional write (``WATCH``/``MULTI``: a front never overwrites a set it has not read) and a
version above the stored one: the version in Redis never goes back and never flips between two
fronts' sets. Fronts started with different configs serve the union of their configs' prefixes;
give every front the same config. Each worker reads the key on its heartbeats from the second on
(so the front has admitted it and indexes the blocks the prefill stores): a newer, valid set
replaces the engine's published prefixes and each prefix is prefilled once (one token generated,
in the scope ``WARM_TENANT``, which creates no private block) so the first request of every
tenant hits it. A worker that joins later reads the same key. Each worker acknowledges the version
it applied (``wire.public_ack_key``, signed too), which the admin listing reports. A set that does
not verify, or an older version (a replay), is ignored: ``PublicSetReader`` reads and checks the
key for workers and for ``kvcache route`` (``vllm.public``), which keys the public blocks of
kvcache workers' vLLM event streams.

The front keys prompts through the same published prefixes (``hashing.key_prompt``), so its
router sees the public blocks every worker holds.

Not here: keying (``hashing``), the engine (``worker``), the config file (``config``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from kvcache.cache import hashing
from kvcache.errors import ConfigError, KVCacheError, ProtocolError
from kvcache.model.tokenize import Tokenizer
from kvcache.serve import protocol, wire
from kvcache.serve.auth import DeploymentKeys
from kvcache.serve.config import PublicPrefixSpec, ServeConfig

log = logging.getLogger("kvcache.public")
SET_KIND = "public-prefixes"
ACK_KIND = "public-prefixes-ack"
WARM_TENANT = "kvcache:public-warm"  # the scope of a worker's own prefill of a published prefix
# Second messages whose renderings a system prompt's public part must prefix: the cut is where
# any continuation could change a token (a tokenizer may merge a role marker with the content).
_CONTINUATIONS = (("user", "a"), ("user", "Z9"), ("user", " x"), ("user", "\n"), ("assistant", "a"))


@dataclass(frozen=True, slots=True)
class PublicPrefix:
    prefix_id: str
    source: str  # system, text or token_ids: what the operator gave
    token_ids: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.prefix_id,
            "source": self.source,
            "num_tokens": len(self.token_ids),
            "token_ids": list(self.token_ids),
        }


def prefix_id(token_ids: tuple[int, ...]) -> str:
    return "pp-" + hashlib.blake2b(hashing.tokens_to_bytes(token_ids), digest_size=8).hexdigest()


def chat_prefix(tokenizer: Tokenizer, system: str) -> list[int]:
    """The tokens every chat request whose messages start with ``("system", system)`` begins with."""
    renders = [tokenizer.encode_chat([("system", system), message]) for message in _CONTINUATIONS]
    common = renders[0]
    for other in renders[1:]:
        n = 0
        while n < min(len(common), len(other)) and common[n] == other[n]:
            n += 1
        common = common[:n]
    return common


def render(spec: PublicPrefixSpec, tokenizer: Tokenizer) -> PublicPrefix:
    """A declared prefix as token ids; ``ConfigError`` when it renders to none."""
    if spec.source == "system":
        assert isinstance(spec.value, str)
        tokens = chat_prefix(tokenizer, spec.value)
    elif spec.source == "text":
        assert isinstance(spec.value, str)
        tokens = tokenizer.encode(spec.value)
    else:
        tokens = list(spec.value)  # type: ignore[arg-type]
    if not tokens:
        raise ConfigError(f"the public prefix ({spec.source}) renders to no tokens")
    ids = tuple(int(t) for t in tokens)
    return PublicPrefix(prefix_id(ids), spec.source, ids)


def open_set(keys: DeploymentKeys, raw: bytes | str) -> tuple[int, list[list[int]]] | None:
    """The version and prefixes of a signed set, or None when it is malformed, forged or altered."""
    notice = keys.open_notice(raw)
    if notice is None:
        return None
    try:
        data = json.loads(notice)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("kind") != SET_KIND:
        return None
    version, prefixes = data.get("version"), data.get("prefixes")
    if type(version) is not int or not isinstance(prefixes, list):
        return None
    if not all(isinstance(p, list) and all(type(t) is int for t in p) for p in prefixes):
        return None
    return version, prefixes


class PublicPrefixes:
    """The deployment's public prefixes as this front holds them, by id, kept in step with the
    set in Redis (shared by every front of the deployment); see the module docstring."""

    def __init__(self, keys: DeploymentKeys) -> None:
        self.keys = keys
        self.prefixes: dict[str, PublicPrefix] = {}
        self.version = 0
        self._base = 0  # the version of the Redis set that ``prefixes`` last took in
        # Changes made here since: (True: added | False: removed, the prefix), in order; applied
        # again on the newer set of another front when Redis holds one (``_rebase``).
        self._unsynced: list[tuple[bool, PublicPrefix]] = []
        self._changed: asyncio.Event | None = None  # made on the event loop, by ``run``

    def add(self, prefix: PublicPrefix) -> bool:
        """Add ``prefix``; False when it was already there (nothing changes)."""
        if prefix.prefix_id in self.prefixes:
            return False
        self.prefixes[prefix.prefix_id] = prefix
        self._unsynced.append((True, prefix))
        self._bump()
        return True

    def remove(self, prefix_id: str) -> bool:
        prefix = self.prefixes.pop(prefix_id, None)
        if prefix is None:
            return False
        self._unsynced.append((False, prefix))
        self._bump()
        return True

    def _bump(self, above: int = 0) -> None:
        # Grows across front restarts too (wall-clock nanoseconds), so workers take a restarted
        # front's set and refuse an older one replayed into Redis; above ``above``: the set in Redis.
        self.version = max(self.version + 1, above + 1, time.time_ns())
        if self._changed is not None:
            self._changed.set()

    def token_lists(self) -> list[list[int]]:
        """The prefixes' token ids (safe to call from another thread than the one that changes them)."""
        return [list(p.token_ids) for p in list(self.prefixes.values())]

    def signed(self) -> str:
        body = json.dumps({"kind": SET_KIND, "version": self.version, "prefixes": self.token_lists()})
        return self.keys.sign_notice(body)

    def applied_by(self, raw_ack: bytes | None, instance: str) -> bool:
        """Whether a worker's acknowledgement says its ``instance`` applied the current version."""
        notice = self.keys.open_notice(raw_ack) if raw_ack is not None else None
        try:
            ack = json.loads(notice) if notice is not None else None
        except ValueError:
            return False
        return (
            isinstance(ack, dict)
            and ack.get("kind") == ACK_KIND
            and ack.get("instance") == instance
            and ack.get("version") == self.version
        )

    def _rebase(self, version: int, token_lists: list[list[int]]) -> None:
        """Take in another front's newer set (``version``, ``token_lists``): it replaces ours, then
        the changes made here since ``_base`` apply to it again. Only when that changes the set
        does it get a new version (above both); else this front adopts the stored version."""
        known = self.prefixes
        stored: dict[str, PublicPrefix] = {}
        for tokens in token_lists:
            ids = tuple(tokens)
            pid = prefix_id(ids)
            stored[pid] = known.get(pid) or PublicPrefix(pid, "token_ids", ids)
        merged = dict(stored)
        for added, prefix in self._unsynced:
            if added:
                merged.setdefault(prefix.prefix_id, prefix)
            else:
                merged.pop(prefix.prefix_id, None)
        self.prefixes, self._base = merged, version
        if merged.keys() == stored.keys():
            self.version = version
            self._unsynced.clear()
        else:
            self._bump(above=version)

    async def sync(self, client: Any) -> bool:
        """One exchange with Redis: take in a newer set another front wrote there (with the changes
        made here since applied again), and write ours where Redis lacks it: a changed set, a
        flushed Redis, an older set (replayed, or written by a front that had not yet taken ours
        in). The write is conditional (``WATCH``): when another front wrote between the read and
        it, nothing is written and this answers False (start over from that front's set); True
        when Redis holds this front's set."""
        import redis

        async with client.pipeline(transaction=True) as pipe:
            await pipe.watch(wire.PUBLIC_KEY)
            raw = await pipe.get(wire.PUBLIC_KEY)
            opened = open_set(self.keys, raw) if raw is not None else None
            if opened is not None and opened[0] > self._base:
                self._rebase(*opened)
            if opened is not None and opened[0] == self.version:
                return True
            version, num_changes = self.version, len(self._unsynced)
            pipe.multi()
            pipe.set(wire.PUBLIC_KEY, self.signed())
            try:
                await pipe.execute()
            except redis.WatchError:
                return False
        self._base = version
        del self._unsynced[:num_changes]  # those made while writing go out on the next exchange
        return True

    async def run(self, redis_url: str | None) -> None:
        """``sync`` at once on every change and every heartbeat period (a lost race at once again)."""
        import redis.asyncio as aioredis

        self._changed = asyncio.Event()
        if redis_url is None:
            return
        client: Any = aioredis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=1.0)
        try:
            while True:
                self._changed.clear()
                try:
                    if not await self.sync(client):
                        continue  # another front wrote meanwhile: take its set in now
                except Exception as exc:  # Redis down: the next period tries again
                    log.debug("public prefixes not synced (%s)", type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=wire.HEARTBEAT_S)
        finally:
            await client.aclose()


class PublicSetReader:
    """Reads the deployment's signed set from Redis (``wire.PUBLIC_KEY``): the newest one that
    verifies. Whoever follows the set (a worker's ``PublicFollower``, ``kvcache route``) reads it
    through this, so the check is one piece of code."""

    def __init__(self, keys: DeploymentKeys) -> None:
        self.keys = keys
        self.version = 0  # of the newest set ``read`` returned
        self._refused: bytes | None = None

    async def read(self, client: Any) -> tuple[int, list[list[int]]] | None:
        """The set in Redis when it is newer than the last one returned, else None: absent, the same
        version, an older one (a replay), or one that does not verify (one error line per value)."""
        raw = await client.get(wire.PUBLIC_KEY)
        if raw is None:
            return None
        opened = open_set(self.keys, raw)
        if opened is None:
            if raw != self._refused:
                log.error(
                    "ignored public prefixes in Redis that do not verify (another deployment, or forged)"
                )
                self._refused = raw
            return None
        if opened[0] <= self.version:
            return None
        self.version = opened[0]
        return opened


class PublicFollower:
    """A worker's side: applies the newest valid set from Redis (``apply`` sets and prefills it)
    in the background, so a long prefill never delays a heartbeat, and acknowledges it."""

    def __init__(
        self,
        keys: DeploymentKeys,
        worker_id: str,
        instance: str,
        apply: Callable[[list[list[int]]], Awaitable[None]],
    ) -> None:
        self.keys, self.worker_id, self.instance, self.apply = keys, worker_id, instance, apply
        self.version = 0  # applied
        self.reader = PublicSetReader(keys)  # its version: taken up (being applied, or failed)
        self._task: asyncio.Task[None] | None = None
        self._beats = 0

    async def sync(self, client: Any) -> None:
        """On each heartbeat: read the set, start applying a newer one, acknowledge what is applied."""
        # The front admits a worker within a poll of its first registration and drops its events
        # until then: prefilling from the second heartbeat on, the router learns the public blocks.
        self._beats += 1
        if self._beats > 1 and (self._task is None or self._task.done()):
            opened = await self.reader.read(client)
            if opened is not None:
                self._task = asyncio.create_task(self._apply(*opened))
        ack = json.dumps({"kind": ACK_KIND, "instance": self.instance, "version": self.version})
        await client.set(
            wire.public_ack_key(self.worker_id), self.keys.sign_notice(ack), ex=wire.PUBLIC_ACK_TTL_S
        )

    async def _apply(self, version: int, prefixes: list[list[int]]) -> None:
        try:
            await self.apply(prefixes)
        except KVCacheError as exc:
            log.error("public prefixes (version %d) not applied: %s", version, exc)
            return
        self.version = version
        log.info("published %d public prefix(es), version %d", len(prefixes), version)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class PublicAdmin:
    """``/admin/public-prefixes`` on the front: admin keys only (401 without a key, 403 with another)."""

    def __init__(
        self,
        public: PublicPrefixes,
        config: ServeConfig,
        tokenizer: Tokenizer,
        pool: Any,
        redis_url: str | None,
        served_names: set[str],
    ) -> None:
        self.public, self.config, self.tokenizer, self.pool = public, config, tokenizer, pool
        self.redis_url, self.served_names = redis_url, served_names

    def declare(self, specs: tuple[PublicPrefixSpec, ...]) -> None:
        """The config's prefixes for this server's model (``model`` absent or one of its names)."""
        for spec in specs:
            if spec.model is None or spec.model in self.served_names:
                self.public.add(render(spec, self.tokenizer))

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/admin/public-prefixes", self.show)
        app.router.add_post("/admin/public-prefixes", self.add)
        app.router.add_delete("/admin/public-prefixes/{prefix_id}", self.remove)

    def _refuse(self, request: web.Request) -> web.Response | None:
        authorization = request.headers.get("Authorization")
        if self.config.is_admin(authorization):
            return None
        if not authorization:
            return protocol.error_response(
                "missing admin key; send 'Authorization: Bearer <admin key>'", status=401
            )
        return protocol.error_response(
            "public prefixes are managed with an admin key (admin_keys)", status=403
        )

    async def show(self, request: web.Request) -> web.Response:
        refused = self._refuse(request)
        if refused is not None:
            return refused
        applied: dict[str, bool] = {}
        if self.redis_url is not None and self.pool.workers:
            import redis.asyncio as aioredis

            client: Any = aioredis.Redis.from_url(
                self.redis_url, socket_timeout=2.0, socket_connect_timeout=1.0
            )
            try:
                for worker_id, state in list(self.pool.workers.items()):
                    raw = await client.get(wire.public_ack_key(worker_id))
                    applied[worker_id] = self.public.applied_by(raw, state.reg.instance)
            except Exception as exc:
                return protocol.error_response(
                    f"Redis is unreachable ({type(exc).__name__}); retry later", status=503
                )
            finally:
                await client.aclose()
        return web.json_response(
            {
                "object": "list",
                "version": self.public.version,
                "applied": applied,
                "data": [p.to_json() for p in self.public.prefixes.values()],
            }
        )

    async def add(self, request: web.Request) -> web.Response:
        refused = self._refuse(request)
        if refused is not None:
            return refused
        try:
            body = protocol.loads(await request.read())
            spec = PublicPrefixSpec.from_dict(body, "the body")
            if spec.model is not None and spec.model not in self.served_names:
                return protocol.error_response(
                    f"model {spec.model!r} is not served here",
                    status=404,
                    param="model",
                    code="model_not_found",
                )
            prefix = await asyncio.to_thread(render, spec, self.tokenizer)
        except (ProtocolError, ConfigError) as exc:
            return protocol.error_response(str(exc), status=400)
        reg = self.pool.first
        if reg is not None:
            top = max(prefix.token_ids)
            if top >= reg.vocab_size:
                return protocol.error_response(
                    f"token id {top} is not below the model's vocab_size {reg.vocab_size}",
                    status=400,
                    param="token_ids",
                )
            if len(prefix.token_ids) < reg.block_size:
                return protocol.error_response(
                    f"the prefix has {len(prefix.token_ids)} tokens, fewer than one "
                    f"block ({reg.block_size}): nothing would be shared",
                    status=400,
                )
        added = self.public.add(prefix)
        return web.json_response(
            {**prefix.to_json(), "added": added, "version": self.public.version}, status=201 if added else 200
        )

    async def remove(self, request: web.Request) -> web.Response:
        refused = self._refuse(request)
        if refused is not None:
            return refused
        prefix_id = request.match_info["prefix_id"]
        deleted = self.public.remove(prefix_id)
        return web.json_response({"id": prefix_id, "deleted": deleted, "version": self.public.version})
