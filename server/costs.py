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
    for a smaller batch), or scales the largest one below it linearly in rows. One run counts as at most
    `max_jump` times the average: a lone slow run (a collection pause, a descheduled thread) moves the estimate
    by a step, where it once told refused clients to wait 30 times too long; a slowdown that lasts is
    followed within a few runs.
    """

    def __init__(self, smoothing: float = 0.2, max_jump: float = 4.0):
        self.smoothing, self.max_jump = smoothing, max_jump
        self._seconds: dict[int, float] = {}
        self._answers: dict[int, float] = {}  # seconds() by bucket since the last observation

    @property
    def measured(self) -> bool:
        return bool(self._seconds)

    def reset(self) -> None:
        self._seconds.clear()
        self._answers.clear()

    def observe(self, rows: int, seconds: float) -> None:
        key = bucket(rows)
        old = self._seconds.get(key)
        # what the bucket was thought to cost: its own average, else what it borrowed (a bucket's first run is
        # clamped too: an engine without batch buckets meets most of them first under live traffic)
        known = old if old is not None else self.seconds(rows) if self._seconds else None
        if known:
            seconds = min(seconds, self.max_jump * known)
        self._seconds[key] = seconds if old is None else (1 - self.smoothing) * old + self.smoothing * seconds
        self._answers.clear()

    def seconds(self, rows: int) -> float:
        key = bucket(rows)
        if key not in self._answers:  # asked per request, learnt per batch: remember the answer in between
            above = [b for b in self._seconds if b >= key]
            largest = max(self._seconds)
            self._answers[key] = self._seconds[min(above)] if above else self._seconds[largest] * key / largest
        return self._answers[key]

    def seconds_per_row(self) -> float:
        """The cheapest measured cost of one row: the engine's speed when its batches are full."""
        if 0 not in self._answers:
            self._answers[0] = min(seconds / b for b, seconds in self._seconds.items())
        return self._answers[0]


class DrainMeter:
    """Rows released per second over the last `window_s` seconds: how fast a full queue empties.

    The rate is measured over the span the releases in the window actually cover, and only once there
    are `min_events` of them: a few releases just after an idle spell say little about the rate."""

    def __init__(self, window_s: float = 2.0, min_events: int = 8, clock=time.monotonic):
        self.window_s, self.min_events, self.clock = window_s, min_events, clock
        self._events: deque[tuple[float, int]] = deque()
        self._rows = 0

    def record(self, rows: int) -> None:
        self._events.append((self.clock(), rows))
        self._rows += rows
        self._trim()

    def rows_per_s(self) -> float | None:
        """The measured rate, or None while too few releases were seen to measure it."""
        self._trim()
        if len(self._events) < self.min_events:
            return None
        return self._rows / max(self.clock() - self._events[0][0], 1e-3)

    def _trim(self) -> None:
        horizon = self.clock() - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._rows -= self._events.popleft()[1]
