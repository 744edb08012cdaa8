"""Dynamic batching, one batcher per engine.

Rows from many requests wait in a bounded queue until `max_batch_size` rows are there or the oldest
has waited `max_queue_delay_ms`; the batch runs in the engine's own worker thread (the event loop
never blocks) and the output rows go back to their requests. A full queue refuses at once
(QueueFull -> 429), expired rows are dropped (DeadlineExceeded -> 504), rows of a cancelled request
(client gone, deadline hit) are skipped, and an engine error fails only the requests of that batch.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from server.engines import Engine, padded_size
from server.metrics import Metrics


class QueueFull(Exception):
    def __init__(self, engine: str, queued: int, limit: int, retry_after_s: int):
        super().__init__(f"the {engine} queue is full ({queued} of {limit} rows waiting); retry after "
                         f"{retry_after_s} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    pass


class EngineFailure(Exception):
    pass


@dataclass
class WorkItem:
    feeds: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future
    enqueued: float
    deadline: float


class DynamicBatcher:
    def __init__(self, engine: Engine, max_batch_size: int, max_queue_delay_ms: float, max_queue_size: int,
                 metrics: Metrics | None = None):
        self.engine = engine
        self.max_batch_size = min(max_batch_size, engine.max_batch)
        self.max_delay_s = max_queue_delay_ms / 1000
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self._items: deque[WorkItem] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{engine.name}")
        self._task: asyncio.Task | None = None
        self._batch_seconds = 0.01  # running estimate, for Retry-After

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.engine.name}")

    async def stop(self) -> None:
        """Finish what is queued, then stop the loop and the worker thread."""
        while self._items:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def retry_after_s(self) -> int:
        batches_ahead = self._queued_rows / self.max_batch_size + 1
        return int(min(60, max(1, math.ceil(batches_ahead * self._batch_seconds))))

    async def infer(self, feeds: dict[str, np.ndarray], deadline: float) -> np.ndarray:
        """Run `feeds` ([rows, ...] arrays) through the engine, in chunks of at most `max_batch_size`.

        The capacity check covers all chunks at once, so a request is queued whole or refused whole.
        """
        rows = next(iter(feeds.values())).shape[0]
        if self._queued_rows + rows > self.max_queue_size:
            if self.metrics:
                self.metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFull(self.engine.name, self._queued_rows, self.max_queue_size, self.retry_after_s())
        loop, now = asyncio.get_running_loop(), time.monotonic()
        was_empty = not self._items
        futures = []
        for start in range(0, rows, self.max_batch_size):
            chunk = {k: v[start:start + self.max_batch_size] for k, v in feeds.items()}
            item = WorkItem(chunk, next(iter(chunk.values())).shape[0], loop.create_future(), now, deadline)
            self._items.append(item)
            self._queued_rows += item.rows
            futures.append(item.future)
        self._set_depth()
        # Wake the loop only when it has something new to decide: work after idleness, or a full batch.
        if was_empty or self._queued_rows >= self.max_batch_size:
            self._wakeup.set()
        parts = await asyncio.gather(*futures)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(engine=self.engine.name).set(self._queued_rows)

    async def _loop(self) -> None:
        while True:
            if not self._items:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for a full batch or until the oldest row has waited max_queue_delay_ms.
            close_at = self._items[0].enqueued + self.max_delay_s
            while self._queued_rows < self.max_batch_size and (remaining := close_at - time.monotonic()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch, rows = [], 0
            while self._items and rows + self._items[0].rows <= self.max_batch_size:
                item = self._items.popleft()
                self._queued_rows -= item.rows
                if self._admit(item):
                    batch.append(item)
                    rows += item.rows
            self._set_depth()
            if batch:
                await self._run(batch, rows)

    def _admit(self, item: WorkItem) -> bool:
        if item.future.done():  # cancelled: the client left or its deadline already fired
            if self.metrics:
                self.metrics.rejected.labels(reason="cancelled").inc()
            return False
        if time.monotonic() > item.deadline:
            item.future.set_exception(DeadlineExceeded(f"the request's deadline passed while it waited for "
                                                       f"the {self.engine.name} engine"))
            if self.metrics:
                self.metrics.rejected.labels(reason="deadline").inc()
            return False
        return True

    async def _run(self, batch: list[WorkItem], rows: int) -> None:
        size = padded_size(rows, self.engine.buckets)
        feeds = {}
        for name in batch[0].feeds:
            joined = np.concatenate([item.feeds[name] for item in batch])
            if size > rows:  # pad to the engine's bucket by repeating the last row
                joined = np.concatenate([joined, np.repeat(joined[-1:], size - rows, axis=0)])
            feeds[name] = joined
        started = time.monotonic()
        try:
            output = await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.run, feeds)
        except Exception as err:  # an engine error fails this batch's requests only
            failure = EngineFailure(f"the {self.engine.name} engine failed on a batch of {rows} rows: {err}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failure)
            if self.metrics:
                self.metrics.engine_errors.labels(engine=self.engine.name).inc()
            return
        finished = time.monotonic()
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (finished - started)
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(output[offset:offset + item.rows])
            offset += item.rows
        if self.metrics:
            self.metrics.observe_batch(self.engine.name, batch, rows, started, finished)
