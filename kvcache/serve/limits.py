"""The front's connection limits: time to send a request's headers and body, connections in total
and per client address, and log volume under abuse.

- **Header time.** aiohttp arms its keep-alive timer when a connection opens and again after each
  answer, and closes a connection still short of a complete request line and headers when it
  fires; ``header_timeout_s`` is that timer (aiohttp's default is an hour). A client trickling
  half a request line is closed after it, whatever it sends meanwhile. The body has
  ``body_timeout_s`` (checked by the front when it reads it).
- **Connections.** ``ConnectionGuard`` counts open connections in total and per client address.
  A connection that takes one past ``max_connections`` (or its address past
  ``max_connections_per_client``) closes the *idle* connection of that set that was active
  longest ago (open, but not inside a request: a slowloris connection, or a keep-alive
  connection between requests); when every one of them is inside a request, the new connection
  is closed at once. A connection serving a request is therefore never closed for a limit, and a
  new client (``/health``, a tenant's request) gets in as long as some connection is idle.
- **Logs.** Nothing is logged per connection: closes for a limit are counted and summarized at
  most once per ``SUMMARY_S``. ``RepeatFilter`` caps what aiohttp's and asyncio's per-connection
  loggers (and the front's) may write per message per window; the first line let through after a
  drop says how many were dropped.
- **File descriptors.** Each client connection may hold one connection to a worker, so
  ``fd_budget`` raises the soft ``RLIMIT_NOFILE`` to fit ``2 x max_connections`` plus a reserve, and
  chooses the default ``max_connections`` within what the process may open, so the limits, not
  file-descriptor exhaustion (which refuses everyone and makes asyncio log every failed accept),
  decide who is closed.

Not here: what a request may ask for (``front``), per-tenant seats (``fairness``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from kvcache.cache.lru import LRU
from kvcache.errors import ConfigError

log = logging.getLogger("kvcache.front")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0
MAX_CONNECTIONS = 4096
FD_RESERVE = 256  # Redis, the listening socket, logs, model files: what is not a client's
SUMMARY_S = 10.0
QUIETED_LOGGERS = ("aiohttp.server", "asyncio", "kvcache.front")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """``max_connections_per_client`` ``None``: a quarter of ``max_connections``."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_client: int | None = None

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise ConfigError(f"{name}={value!r} must be a finite number of seconds > 0")
        for name in ("max_connections", "max_connections_per_client"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")

    @property
    def per_client(self) -> int:
        if self.max_connections_per_client is not None:
            return min(self.max_connections_per_client, self.max_connections)
        return max(1, self.max_connections // 4)


def fd_budget(max_connections: int | None) -> int:
    """The ``max_connections`` this process can hold: ``max_connections`` itself (the soft
    ``RLIMIT_NOFILE`` raised toward the hard one to fit it; ``ConfigError`` when it cannot fit),
    or, for ``None``, ``MAX_CONNECTIONS`` or fewer so that it fits."""
    import resource

    want = max_connections or MAX_CONNECTIONS
    need = 2 * want + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return want
    fits = (soft - FD_RESERVE) // 2
    if max_connections is not None or fits < 1:
        raise ConfigError(
            f"--max-connections {want} needs {need} file descriptors; this process may open "
            f"{soft} (ulimit -n): raise the limit or give --max-connections {max(1, fits)} "
            "or fewer"
        )
    return fits


@dataclass(slots=True)
class _Conn:
    peer: str
    transport: Any  # asyncio.Transport
    busy: bool = False


@dataclass(slots=True)
class _Shed:
    """Connections closed for a limit since the last summary."""

    evicted: int = 0  # idle connections closed to make room
    refused: int = 0  # new connections closed because every other one was busy
    by_peer: dict[str, int] = field(default_factory=dict)


class ConnectionGuard:
    """Enforces ``limits`` on one aiohttp ``web.Server`` (``attach``) with its ``middleware``
    marking the connections that are inside a request."""

    def __init__(self, limits: ConnectionLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._conns: dict[Any, _Conn] = {}  # request handler (one per connection) -> its state
        self._idle: LRU[Any, None] = LRU()  # idle handlers, least recently active first
        self._by_peer: dict[str, LRU[Any, None]] = {}  # address -> its handlers, oldest first
        self._shed = _Shed()
        self._last_summary = -SUMMARY_S  # the first close is reported at once, then one line per window
        self.num_evicted = 0
        self.num_refused = 0

    @property
    def num_open(self) -> int:
        return len(self._conns)

    def attach(self, server: web.Server) -> None:
        """Watch ``server``'s connections (its ``connection_made``/``connection_lost`` hooks, which
        every request handler calls when its connection opens and closes)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: Any) -> None:
            made(handler, transport)
            self._opened(handler, transport)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            lost(handler, exc)
            self._forget(handler)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = self._conns.get(request.protocol)
        if conn is None:
            return await handler(request)
        conn.busy = True
        self._idle.pop(request.protocol)
        try:
            return await handler(request)
        finally:
            if self._conns.get(request.protocol) is conn:
                conn.busy = False
                self._idle.put(request.protocol, None)  # most recently active: evicted last

    # ---- bookkeeping -----------------------------------------------------------------------------

    def _opened(self, handler: Any, transport: Any) -> None:
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else "?"
        self._conns[handler] = _Conn(peer, transport)
        self._idle.put(handler, None)
        mine = self._by_peer.get(peer)
        if mine is None:
            mine = self._by_peer[peer] = LRU()
        mine.put(handler, None)
        if len(mine) > self.limits.per_client:
            self._make_room(handler, (h for h in mine if h in self._idle))
        if handler in self._conns and len(self._conns) > self.limits.max_connections:
            self._make_room(handler, iter(self._idle))

    def _make_room(self, new: Any, idle: Iterator[Any]) -> None:
        """Close the first of ``idle`` that is not ``new``; with none, close ``new``."""
        victim = next((h for h in idle if h is not new), None)
        if victim is None:
            victim = new
            self.num_refused += 1
            self._shed.refused += 1
        else:
            self.num_evicted += 1
            self._shed.evicted += 1
        peer = self._conns[victim].peer
        self._shed.by_peer[peer] = self._shed.by_peer.get(peer, 0) + 1
        transport = self._conns[victim].transport
        self._forget(victim)  # now: its close completes on a later loop turn
        transport.close()
        self._summarize()

    def _forget(self, handler: Any) -> None:
        conn = self._conns.pop(handler, None)
        if conn is None:
            return
        self._idle.pop(handler)
        mine = self._by_peer.get(conn.peer)
        if mine is not None:
            mine.pop(handler)
            if not mine:
                del self._by_peer[conn.peer]

    def _summarize(self) -> None:
        now = self.clock()
        if now - self._last_summary < SUMMARY_S:
            return
        shed, self._shed = self._shed, _Shed()
        self._last_summary = now
        top = sorted(shed.by_peer.items(), key=lambda kv: -kv[1])[:3]
        log.warning(
            "connection limits (%d in all, %d per client address): closed %d idle connection(s) to "
            "make room and refused %d new one(s) within %.0f s; most from %s; %d open now",
            self.limits.max_connections,
            self.limits.per_client,
            shed.evicted,
            shed.refused,
            SUMMARY_S,
            ", ".join(f"{p} ({n})" for p, n in top),
            len(self._conns),
        )


@dataclass(slots=True)
class _Window:
    start: float
    count: int = 0
    dropped: int = 0


class RepeatFilter(logging.Filter):
    """Lets through at most ``burst`` records of one message (logger and format string) per
    ``window_s``; the first record of a message let through after a drop says how many were
    dropped."""

    def __init__(
        self, burst: int = 5, window_s: float = SUMMARY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._windows: dict[tuple[str, str], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        key = (record.name, str(record.msg))
        window = self._windows.get(key)
        if window is None or now - window.start >= self.window_s:
            if len(self._windows) > 1024:  # format strings are few; expired windows hold no count
                self._windows = {k: w for k, w in self._windows.items() if now - w.start < self.window_s}
            dropped = window.dropped if window is not None else 0
            self._windows[key] = window = _Window(now)
            if dropped:
                record.msg = f"{record.msg} [{dropped} more like this dropped in {self.window_s:g} s]"
        window.count += 1
        if window.count > self.burst:
            window.dropped += 1
            return False
        return True


@contextmanager
def quiet_repeats(names: tuple[str, ...] = QUIETED_LOGGERS) -> Iterator[RepeatFilter]:
    """A ``RepeatFilter`` on the loggers ``names`` while the context lasts."""
    repeat = RepeatFilter()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(repeat)
    try:
        yield repeat
    finally:
        for logger in loggers:
            logger.removeFilter(repeat)


class GuardedRunner(web.AppRunner):
    """An ``AppRunner`` whose server is watched by ``guard`` (attached when the server is made)."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=guard.limits.header_timeout_s, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        self.guard.attach(server)
        return server
