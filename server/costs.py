"""What one engine run costs, learnt from the runs themselves: admission asks it how long a
request's work will take, the batcher tells it how long each batch took."""

from __future__ import annotations

import math
import time
from collections import deque


def bucket(rows: int) -> int:
    """The power of two at or above `rows`: batch costs are kept per bucket."""
    return 1 << max(0, math.ceil(math.log2(max(rows, 1))))


class BatchCost:
    """Seconds per engine run at each batch-size bucket (an exponential moving average per bucket).

    A bucket not yet measured borrows the smallest measured bucket above it (never an underestimate
    for a smaller batch), or scales the largest one below it linearly in rows.
    """

    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self._seconds: dict[int, float] = {}

    @property
    def measured(self) -> bool:
        return bool(self._seconds)

    def reset(self) -> None:
        self._seconds.clear()

    def observe(self, rows: int, seconds: float) -> None:
        key = bucket(rows)
        old = self._seconds.get(key)
        self._seconds[key] = seconds if old is None else (1 - self.smoothing) * old + self.smoothing * seconds

    def seconds(self, rows: int) -> float:
        key = bucket(rows)
        above = [b for b in self._seconds if b >= key]
        if above:
            return self._seconds[min(above)]
        largest = max(self._seconds)
        return self._seconds[largest] * key / largest

    def seconds_per_row(self) -> float:
        """The cheapest measured cost of one row: the engine's speed when its batches are full."""
        return min(seconds / b for b, seconds in self._seconds.items())


class DrainMeter:
    """Rows released per second over the last `window_s` seconds: how fast a full queue empties."""

    def __init__(self, window_s: float = 2.0, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._events: deque[tuple[float, int]] = deque()
        self._rows = 0

    def record(self, rows: int) -> None:
        self._events.append((self.clock(), rows))
        self._rows += rows
        self._trim()

    def rows_per_s(self) -> float:
        self._trim()
        return self._rows / self.window_s

    def _trim(self) -> None:
        horizon = self.clock() - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._rows -= self._events.popleft()[1]
