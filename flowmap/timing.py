"""Timing one call: the loop every benchmark's per-call milliseconds come from; and a measurement run in a
process of its own, so that its memory and threads start clean."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor


def in_fresh_process(function, *args):
    """`function(*args)` in a new (spawned) process, its result returned."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def timed_ms(run, repeats: int) -> float:
    """Milliseconds of one call, after one call that warms up."""
    run()
    tick = time.perf_counter()
    for _ in range(repeats):
        run()
    return 1000 * (time.perf_counter() - tick) / repeats
