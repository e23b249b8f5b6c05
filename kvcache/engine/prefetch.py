"""Tier prefetch for waiting requests: their spilled prefix blocks move up to host memory (G2)
on a background thread while they queue, so their load at admission runs at G2 speed.

    prefetcher = Prefetcher(hierarchy, max_blocks=512)
    prefetcher.submit(request_id, keys)           # engine thread, when a request is queued
    with prefetcher.settle(request_id, keys) as settled:   # engine thread, at admission
        settled.num_loaded = hierarchy.load(keys).shape[0]  # under the lock of the hit count
    prefetcher.cancel(request_id)                 # aborted or failed before admission

- Mechanism: one worker thread calls ``Hierarchy.promote`` on ``chunk_blocks`` keys at a time,
  the hierarchy's own lookup and load path; G3 blocks are read and verified, pod-tier (ICMS)
  blocks fetched and verified, and each is stored in the first tier, where it counts against
  its capacity like any other block (the slab is pinned when CUDA is present).
- Bounded: at most ``max_blocks`` blocks are reserved by requests that wait (queued, in flight,
  or moved and not yet loaded); a request that would pass the cap prefetches only its leading
  blocks that fit, and the rest load from their tier at admission as without prefetch.
- Locking: every tier access and every job's state is under ``Hierarchy.lock``; the worker holds
  it for one chunk at a time, so the engine's step thread (evictions, loads) waits at most one
  chunk's I/O. A job is cancelled under that lock; the worker checks before each chunk.
- Failure: a block that fails to load (damaged, lost, backend down) is a counted error and stays
  where it was; an exception out of a tier is counted and logged, and ends only that job. The
  request then loads (or recomputes) what is left at admission, as without prefetch.

Not here: which blocks a request needs (the engine passes the keys after its pool hit), the
admission decision (``scheduler``), the tier lookup itself (``kvcache.tiers.Hierarchy``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from kvcache.tiers import Hierarchy

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefetchStats:
    """``blocks``/``bytes``: moved into the first tier. ``hits``: of those, found there and loaded
    at admission. ``wasted``: moved but not loaded (aborted, evicted meanwhile, or computed by
    another request first). ``errors``: blocks that failed to load, plus jobs a tier exception
    ended. ``capped_blocks``: blocks not prefetched because of ``max_blocks``."""

    requests: int = 0
    blocks: int = 0
    bytes: int = 0
    hits: int = 0
    wasted: int = 0
    errors: int = 0
    cancelled: int = 0
    capped_blocks: int = 0
    reserved_blocks: int = 0  # reserved now by waiting requests

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class Settled:
    """One admission's view of its prefetch: ``num_loaded`` set by the loader, ``hits`` after."""

    num_loaded: int = 0
    hits: int = 0


@dataclass(slots=True)
class _Job:
    keys: list[bytes]
    cancelled: bool = False
    done: bool = False
    moved: list[bytes] = field(default_factory=list)


class Prefetcher:
    def __init__(self, hierarchy: Hierarchy, max_blocks: int, chunk_blocks: int = 4) -> None:
        assert max_blocks >= 1 and chunk_blocks >= 1
        self.hierarchy = hierarchy
        self.lock = hierarchy.lock  # one lock: tiers, jobs and counters
        self.max_blocks = max_blocks
        self.chunk_blocks = chunk_blocks
        self._jobs: dict[Hashable, _Job] = {}
        self._stats = PrefetchStats()
        self._pool: ThreadPoolExecutor | None = None  # started on first use
        self._idle = threading.Condition(self.lock)
        self._running = 0

    def submit(self, request_id: Hashable, keys: Sequence[bytes]) -> int:
        """Start fetching ``keys`` (a waiting request's blocks after its pool hit); returns how
        many were reserved (0: nothing to do, or the cap is reached)."""
        with self.lock:
            if request_id in self._jobs or not keys:
                return 0
            room = self.max_blocks - self._stats.reserved_blocks
            take = max(0, min(len(keys), room))
            self._stats.capped_blocks += len(keys) - take
            if take == 0:
                return 0
            job = _Job(list(keys[:take]))
            self._jobs[request_id] = job
            self._stats.reserved_blocks += take
            self._stats.requests += 1
            self._running += 1
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcache-prefetch")
        self._pool.submit(self._run, job)
        return take

    def _run(self, job: _Job) -> None:
        h, nbytes = self.hierarchy, self.hierarchy.layout.block_nbytes
        try:
            for start in range(0, len(job.keys), self.chunk_blocks):
                chunk = job.keys[start : start + self.chunk_blocks]
                with self.lock:
                    if job.cancelled:
                        return
                    got = h.promote(chunk)
                    job.moved += got.moved
                    s = self._stats
                    s.blocks += len(got.moved)
                    s.bytes += len(got.moved) * nbytes
                    s.errors += got.failed
                    if got.held < len(chunk) or got.failed:
                        return  # the held prefix ends here: later blocks are not loadable
        except Exception:  # a tier bug or an unexpected I/O error: this job only
            with self.lock:
                self._stats.errors += 1
            log.exception("tier prefetch failed; the request loads or recomputes at admission")
        finally:
            with self.lock:
                job.done = True
                self._running -= 1
                self._idle.notify_all()

    @contextmanager
    def settle(self, request_id: Hashable, keys: Sequence[bytes]) -> Iterator[Settled]:
        """At admission: stop the request's job and note which of its moved blocks among ``keys``
        (the blocks about to load) the first tier holds, with the lock held, so the caller's load
        inside the block sees exactly those; the caller sets ``num_loaded``, and the hits are the
        noted blocks among the first ``num_loaded`` keys."""
        with self.lock:
            job = self._jobs.pop(request_id, None)
            done = Settled()
            if job is None:
                yield done
                return
            self._end(job)
            wanted = set(keys)
            candidates = [k for k in job.moved if k in wanted]
            present = self.hierarchy.first_holds(candidates)
            try:
                yield done
            finally:
                loaded = set(keys[: done.num_loaded])
                done.hits = sum(
                    1 for k, held in zip(candidates, present, strict=True) if held and k in loaded
                )
                self._stats.hits += done.hits
                self._stats.wasted += len(job.moved) - done.hits

    def cancel(self, request_id: Hashable) -> bool:
        """Drop a request's job (aborted, failed); blocks it already moved stay in the first tier
        as ordinary cached blocks, counted as wasted. Returns whether it had one."""
        with self.lock:
            job = self._jobs.pop(request_id, None)
            if job is None:
                return False
            self._end(job)
            self._stats.cancelled += 1
            self._stats.wasted += len(job.moved)
            return True

    def _end(self, job: _Job) -> None:
        job.cancelled = True
        self._stats.reserved_blocks -= len(job.keys)

    def pending(self) -> list[Hashable]:
        """Request ids with a job not yet settled or cancelled."""
        with self.lock:
            return list(self._jobs)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until no job is running (tests, benchmarks); returns False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout_s)

    def stats(self) -> PrefetchStats:
        with self.lock:
            return PrefetchStats(**self._stats.as_dict())

    def close(self) -> None:
        """Cancel every job and stop the worker thread (waits for the chunk in progress)."""
        for rid in self.pending():
            self.cancel(rid)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
