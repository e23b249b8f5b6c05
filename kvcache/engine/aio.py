"""An asyncio front for the engine: many coroutines stream tokens while one thread runs the steps.

Every engine call (add, step, abort) runs on one dedicated worker thread, so the engine stays
single-threaded and the event loop never blocks on the model. A background task steps the engine
while any request is unfinished and hands each step's outputs to the waiting streams. A stream
that is closed or cancelled before it finished aborts its request (within one step), also
when it is cancelled while its request is being added. ``after_step`` (optional) runs on the
engine thread after every step with that step's outputs (and after an abort, with none): the
place for a server to read the engine's state (events, load) without a second thread touching it.

Not here: HTTP (``kvcache.serve``), scheduling (``scheduler``).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncGenerator, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvcache.cache.tenancy import Scope
from kvcache.engine.engine import Engine, GenerationStep, RequestOutput
from kvcache.engine.sampling import SamplingParams
from kvcache.errors import RequestError

_End = tuple[str, BaseException | None]


class AsyncEngine:
    def __init__(
        self, engine: Engine, after_step: Callable[[list[RequestOutput]], None] | None = None
    ) -> None:
        self.engine = engine
        self.after_step = after_step
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcache-engine")
        self._queues: dict[Hashable, asyncio.Queue[GenerationStep | _End]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._request_ids = itertools.count()

    async def stream(
        self,
        tokens: Sequence[int],
        scope: Scope | str | None = None,
        params: SamplingParams | None = None,
        request_id: Hashable | None = None,
    ) -> AsyncGenerator[GenerationStep, None]:
        loop = asyncio.get_running_loop()
        if request_id is None:
            request_id = ("aio", next(self._request_ids))
        elif request_id in self._queues:
            in_use = f"request id {request_id!r} is already in use"
            raise RequestError(f"{in_use}; wait for it to finish or abort it")
        # The queue is in place before the add: the engine thread may step the request before this
        # coroutine resumes, and a step's outputs go to the queue registered for them.
        queue: asyncio.Queue[GenerationStep | _End] = asyncio.Queue()
        self._queues[request_id] = queue
        cancelled = threading.Event()

        def add() -> Hashable:
            rid = self.engine.add_request(tokens, scope, params, request_id)
            if cancelled.is_set():  # the stream was cancelled while this waited for the engine thread
                self._abort(rid)
            return rid

        added = loop.run_in_executor(self._executor, add)
        try:
            rid = await asyncio.shield(added)
        except asyncio.CancelledError:
            self._queues.pop(request_id, None)
            cancelled.set()
            added.add_done_callback(self._abort_added)  # the add still runs: undo it once it has
            raise
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        self._start(loop)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, tuple):
                    finished = True
                    if item[1] is not None:
                        raise item[1]
                    return
                yield item
        finally:
            self._queues.pop(rid, None)
            if not finished:
                await loop.run_in_executor(self._executor, self._abort, rid)

    async def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the engine thread, between steps (e.g. a server's bookkeeping)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def _abort_added(self, added: asyncio.Future[Hashable]) -> None:
        if not added.cancelled() and added.exception() is None:
            self._executor.submit(self._abort, added.result())

    def _abort(self, rid: Hashable) -> None:
        seq = self.engine._seqs.get(rid)
        if seq is not None and not seq.is_finished:
            self.engine.abort(rid)
            if self.after_step is not None:
                self.after_step([])

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())

    def _step(self) -> tuple[list[RequestOutput], BaseException | None, list[Hashable]]:
        """On the engine thread: one step; an error ends every request it failed."""
        outputs: list[RequestOutput] = []
        error: BaseException | None = None
        failed: list[Hashable] = []
        try:
            outputs = self.engine.step()
        except Exception as exc:  # the model failed: its sequences are already failed
            error = exc
            failed = [rid for rid, seq in self.engine._seqs.items() if seq.error is exc]
        if self.after_step is not None:
            self.after_step(outputs)
        return outputs, error, failed

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            outputs, error, failed = await loop.run_in_executor(self._executor, self._step)
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is None:
                    continue
                if out.step is not None:
                    queue.put_nowait(out.step)
                if out.finished:
                    queue.put_nowait((out.finish_reason or "", out.error))
            for rid in failed:
                queue = self._queues.get(rid)
                if queue is not None:
                    queue.put_nowait(("error", error))
