"""Dynamic batching, one batcher per engine.

Rows from many requests wait until `max_batch_size` rows are there or the oldest has waited
`max_queue_delay_ms`; the batch runs in the engine's own worker thread (the event loop never blocks)
and the output rows go back to their requests. The batcher never refuses: admission (admission.py)
bounds what reaches it, once per request. Rows leave in deadline order, so an older request's next
step goes before a newer request's first and admitted work finishes in the order it was promised.
Expired rows are dropped (DeadlineExceeded -> 504), rows of a cancelled request (client gone,
deadline hit) are skipped, and an engine error fails only the requests of that batch.

An engine with batch buckets (the GPU backends) runs a batch padded up to its next bucket. Where the
batches' measured costs say padding costs more than running the largest bucket below now and the rest
next, the batcher does that instead: 9 rows as 8 and then 1, not as 16 (`split_to_buckets`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from server.costs import BatchCost
from server.engines import Engine, padded_size, stack_rows
from server.imaging import join_rows
from server.metrics import Metrics


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
    def __init__(self, engine: Engine, max_batch_size: int, max_queue_delay_ms: float,
                 metrics: Metrics | None = None, split_to_buckets: bool = True):
        self.engine, self.split_to_buckets = engine, split_to_buckets
        self.max_batch_size = min(max_batch_size, engine.max_batch)
        self.max_delay_s = max_queue_delay_ms / 1000
        self.metrics = metrics
        self.engine_metrics = metrics.engine(engine.name) if metrics else None
        self.cost = BatchCost()  # seconds per run by batch size, for admission's estimates
        # a heap of (deadline, arrival, item): earliest deadline first, a request's chunks in order
        self._items: list[tuple[float, int, WorkItem]] = []
        self._arrivals = itertools.count()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{engine.name}")
        self._task: asyncio.Task | None = None

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

    async def infer(self, feeds: dict[str, np.ndarray], deadline: float) -> np.ndarray:
        """Run `feeds` ([rows, ...] arrays) through the engine, in chunks of at most `max_batch_size`."""
        rows = next(iter(feeds.values())).shape[0]
        loop, now = asyncio.get_running_loop(), time.monotonic()
        was_empty = not self._items
        futures = []
        for start in range(0, rows, self.max_batch_size):
            chunk = {k: v[start:start + self.max_batch_size] for k, v in feeds.items()}
            item = WorkItem(chunk, next(iter(chunk.values())).shape[0], loop.create_future(), now, deadline)
            heapq.heappush(self._items, (deadline, next(self._arrivals), item))
            self._queued_rows += item.rows
            futures.append(item.future)
        self._set_depth()
        # Wake the loop only when it has something new to decide: work after idleness, or a full batch.
        if was_empty or self._queued_rows >= self.max_batch_size:
            self._wakeup.set()
        parts = await asyncio.gather(*futures)
        futures.clear()  # they hold the parts too: join_rows frees each part once it is copied
        return parts[0] if len(parts) == 1 else join_rows(parts)

    def _set_depth(self) -> None:
        if self.metrics:
            self.engine_metrics.queue_depth.set(self._queued_rows)

    async def _loop(self) -> None:
        while True:
            if not self._items:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for a full batch or until the most urgent row has waited max_queue_delay_ms.
            close_at = self._items[0][2].enqueued + self.max_delay_s
            while self._queued_rows < self.max_batch_size and (remaining := close_at - time.monotonic()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch, rows = [], 0
            while self._items and rows + self._items[0][2].rows <= self.max_batch_size:
                entry = heapq.heappop(self._items)
                self._queued_rows -= entry[2].rows
                if self._admit(entry[2]):
                    batch.append(entry)
                    rows += entry[2].rows
            keep = self._run_now(batch, rows) if self.split_to_buckets else len(batch)
            for entry in batch[keep:]:  # back in the queue, in their place, for the next batch
                heapq.heappush(self._items, entry)
                self._queued_rows += entry[2].rows
                rows -= entry[2].rows
            batch = batch[:keep]
            self._set_depth()
            if batch:
                await self._run([entry[2] for entry in batch], rows)

    def _run_now(self, batch: list, rows: int) -> int:
        """How many of the batch's items (in deadline order, `rows` in all) to run now: all, or the most that fit
        the largest bucket below their rows, where the measured costs say that batch and then the rest's beat one
        batch padded to the bucket above. A cost not yet measured borrows a larger batch's, so an unknown split
        never wins."""
        buckets = self.engine.buckets
        below = [size for size in buckets if size < rows]
        if not below or padded_size(rows, buckets) == rows or not self.cost.measured:
            return len(batch)
        count, first = 0, 0
        while count < len(batch) and first + batch[count][2].rows <= below[-1]:
            first += batch[count][2].rows
            count += 1
        if first == 0:
            return len(batch)
        split = self.cost.seconds(padded_size(first, buckets)) + self.cost.seconds(padded_size(rows - first, buckets))
        return count if split < self.cost.seconds(padded_size(rows, buckets)) else len(batch)

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
            feeds[name] = stack_rows([item.feeds[name] for item in batch], size)
        started = time.monotonic()
        try:
            output = await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.run, feeds)
        except Exception as err:  # an engine error fails this batch's requests only
            failure = EngineFailure(f"the {self.engine.name} engine failed on a batch of {rows} rows: {err}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failure)
            if self.metrics:
                self.engine_metrics.engine_errors.inc()
            return
        finished = time.monotonic()
        # the wall time, the loop's hand-offs included: what a request waits for (a lone outlier the cost clamps)
        self.cost.observe(size, finished - started)
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(output[offset:offset + item.rows])
            offset += item.rows
        if self.metrics:
            self.engine_metrics.observe_batch(batch, rows, size, started, finished)
