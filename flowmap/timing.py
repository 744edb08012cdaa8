"""Timing one call: the loop every benchmark's per-call milliseconds come from."""

from __future__ import annotations

import time


def timed_ms(run, repeats: int) -> float:
    """Milliseconds of one call, after one call that warms up."""
    run()
    tick = time.perf_counter()
    for _ in range(repeats):
        run()
    return 1000 * (time.perf_counter() - tick) / repeats
