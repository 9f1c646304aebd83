"""Dynamic batching for the prediction service: concurrent requests with the same key share one model call."""
from __future__ import annotations

import asyncio
import collections
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence


class QueueFull(RuntimeError):
    """The queue holds max_queue requests already: the client should retry later."""


class Closed(RuntimeError):
    """The batcher is draining for shutdown and takes no new work."""


@dataclass
class Job:
    key: Hashable
    item: Any
    future: asyncio.Future
    arrived: float = field(default=0.0)


class Batcher:
    """A bounded queue in front of run_batch(items) -> results, called in executor on up to max_batch items of one key.

    A batch starts when max_batch jobs of the oldest job's key are waiting, or when that job has waited max_wait_s,
    so no job waits longer than max_wait_s for company. Jobs whose future was cancelled (the client timed out) are
    dropped before they reach the model. on_batch(size) and on_depth(waiting) report to the metrics.
    """

    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], executor: Executor, max_batch: int,
                 max_wait_s: float, max_queue: int, on_batch: Callable[[int], None] = lambda size: None,
                 on_depth: Callable[[int], None] = lambda waiting: None):
        self.run_batch, self.executor = run_batch, executor
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.on_batch, self.on_depth = on_batch, on_depth
        self.pending: collections.deque[Job] = collections.deque()
        self.wakeup = asyncio.Event()
        self.closed = False
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def check_room(self) -> None:
        """Raise QueueFull or Closed if a job submitted now would be refused."""
        if self.closed:
            raise Closed("the service is shutting down")
        self._drop_cancelled()
        if len(self.pending) >= self.max_queue:
            raise QueueFull(f"{len(self.pending)} requests are already waiting (--max-queue {self.max_queue})")

    def submit(self, key: Hashable, item: Any) -> asyncio.Future:
        """Queue item; the future gets its result. Raises QueueFull or Closed instead of waiting."""
        self.check_room()
        loop = asyncio.get_running_loop()
        job = Job(key, item, loop.create_future(), loop.time())
        self.pending.append(job)
        self.on_depth(len(self.pending))
        self.wakeup.set()
        return job.future

    async def close(self) -> None:
        """Refuse new jobs, run the queued ones without waiting for company, and stop."""
        self.closed = True
        self.wakeup.set()
        if self.task is not None:
            await self.task

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self.pending:
                if self.closed:
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            first = self.pending[0]
            deadline = first.arrived + self.max_wait_s
            while (not self.closed and not first.future.done() and self._waiting(first.key) < self.max_batch
                   and loop.time() < deadline):
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            batch = self._take(first.key)
            if batch:
                await self._run(batch)

    def _waiting(self, key: Hashable) -> int:
        return sum(1 for job in self.pending if job.key == key and not job.future.done())

    def _take(self, key: Hashable) -> list[Job]:
        """Remove and return up to max_batch live jobs of key, oldest first."""
        batch, rest = [], collections.deque()
        for job in self.pending:
            if job.future.done():
                continue
            (batch if job.key == key and len(batch) < self.max_batch else rest).append(job)
        self.pending = rest
        self.on_depth(len(rest))
        return batch

    def _drop_cancelled(self) -> None:
        if any(job.future.done() for job in self.pending):
            self.pending = collections.deque(job for job in self.pending if not job.future.done())
            self.on_depth(len(self.pending))

    async def _run(self, batch: list[Job]) -> None:
        self.on_batch(len(batch))
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.run_batch, [job.item for job in batch])
        except Exception as e:  # the requests' handlers report it; the loop must keep serving the others
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        for job, result in zip(batch, results):
            if not job.future.done():  # cancelled meanwhile: its client has had a 504
                job.future.set_result(result)
