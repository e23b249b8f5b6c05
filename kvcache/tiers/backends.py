"""Where the pod-shared tier (ICMS emulation) keeps its bytes: in this process, or in Redis.

A backend maps a name (layout digest + block key) to a value (the writer's worker id, then the
``codec`` bytes). It only stores; the ``icms`` tier adds the link model, write-behind, prestaging
and verification. Both backends are volatile, like the tier they stand for: a lost value is a
miss and the block is recomputed.

- ``InProcessBackend``: one object shared by every worker of a pod that lives in this process;
  LRU within ``capacity_blocks``; thread-safe.
- ``RedisBackend``: a Redis server (``kvcache.redis_server.start_redis``) shared by processes or
  machines; capacity is the server's ``maxmemory`` with ``allkeys-lru``. Any Redis failure raises
  ``BackendUnavailable``, which the tier turns into a counted miss.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

from kvcache.cache.lru import LRU
from kvcache.errors import KVCacheError, TierError


class BackendUnavailable(KVCacheError):
    """The backend could not be reached; the tier counts a miss and carries on."""


class Backend(Protocol):
    capacity_blocks: int
    shared: bool  # reachable by other processes (and whoever can write there): needs a tier secret

    def get_many(self, names: Sequence[bytes]) -> list[bytes | None]: ...

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None: ...

    def contains_many(self, names: Sequence[bytes]) -> list[bool]: ...

    def delete(self, name: bytes) -> bool: ...

    def count(self) -> int: ...

    @property
    def evictions(self) -> int: ...


class InProcessBackend:
    shared = False

    def __init__(self, capacity_blocks: int) -> None:
        if not isinstance(capacity_blocks, int) or capacity_blocks <= 0:
            raise TierError(f"ICMS capacity_blocks={capacity_blocks!r} must be a positive integer")
        self.capacity_blocks = capacity_blocks
        self._values: LRU[bytes, bytes] = LRU(capacity_blocks)
        self._lock = threading.Lock()
        self._evictions = 0

    @property
    def evictions(self) -> int:
        return self._evictions

    def get_many(self, names: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            values = self._values
            out = []
            for name in names:
                value = values.get(name)
                if value is not None:
                    values.touch(name)
                out.append(value)
            return out

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        with self._lock:
            values = self._values
            for name, value in items:
                self._evictions += len(values.put(name, value))

    def contains_many(self, names: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [name in self._values for name in names]

    def delete(self, name: bytes) -> bool:
        with self._lock:
            return self._values.pop(name) is not None

    def count(self) -> int:
        return len(self._values)


class RedisBackend:
    """Values under ``prefix + name``. Short socket timeouts: a dead server costs a miss, not a stall."""

    shared = True

    def __init__(
        self, url: str, capacity_blocks: int, prefix: bytes = b"kvcache:icms:", timeout_s: float = 0.5
    ) -> None:
        import redis

        self.capacity_blocks = capacity_blocks
        self.prefix = prefix
        self._redis: Any = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

    @property
    def evictions(self) -> int:
        info = self._call(lambda: self._redis.info("stats"))
        return int(info.get("evicted_keys", 0))

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except self._errors as exc:
            raise BackendUnavailable(f"Redis: {exc}") from exc

    def get_many(self, names: Sequence[bytes]) -> list[bytes | None]:
        if not names:
            return []
        return list(self._call(lambda: self._redis.mget([self.prefix + n for n in names])))

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        if items:
            self._call(lambda: self._redis.mset({self.prefix + n: v for n, v in items}))

    def contains_many(self, names: Sequence[bytes]) -> list[bool]:
        if not names:
            return []

        def run() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for n in names:
                pipe.exists(self.prefix + n)
            return list(pipe.execute())

        return [bool(x) for x in self._call(run)]

    def delete(self, name: bytes) -> bool:
        return bool(self._call(lambda: self._redis.delete(self.prefix + name)))

    def count(self) -> int:
        return int(self._call(lambda: self._redis.dbsize()))
