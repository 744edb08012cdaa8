"""How long a thread back from GIL-free work waits for the GIL: the server's encode job (one 256 px JPEG, as a request
asks for it) timed in two threads beside busy pure-Python threads (standing in for the event loop and the engines'
glue), at several GIL switch intervals. CPython lets a busy thread keep the GIL for up to the interval (5 ms by
default) while another waits, and an encode job waits like that each time it comes back from the encoder, so
beside busy threads a job of a fraction of a millisecond can take several; a shorter interval shortens the wait and
costs the busy threads some throughput. `flowmap bench stages --parts handoffs` reports it."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np


def busy_python(stop: threading.Event, loops: list[int], slot: int) -> None:
    """Pure-Python work until `stop`, counting loops in `loops[slot]`: a thread that never lets go of the GIL on its
    own."""
    while not stop.is_set():
        sum(i * i for i in range(2000))
        loops[slot] += 1


def handoff_trial(job, interval_ms: float, busy_threads: int, seconds: float, job_threads: int = 2) -> dict:
    """`job` run over and over in `job_threads` threads for `seconds` beside `busy_threads` busy ones, the switch
    interval set to `interval_ms` (and put back): the job's mean and 90th-percentile ms, jobs a second, and the busy
    threads' loops a second."""
    previous = sys.getswitchinterval()
    stop, loops, jobs_s = threading.Event(), [0] * busy_threads, []

    def jobs() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            job()
            jobs_s.append(time.perf_counter() - started)

    threads = ([threading.Thread(target=busy_python, args=(stop, loops, slot)) for slot in range(busy_threads)]
               + [threading.Thread(target=jobs) for _ in range(job_threads)])
    sys.setswitchinterval(interval_ms / 1000)
    try:
        for thread in threads:
            thread.start()
        time.sleep(seconds)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(previous)
    spent = np.asarray(jobs_s)
    return {"interval_ms": interval_ms, "busy_threads": busy_threads, "job_ms": round(1000 * float(spent.mean()), 3),
            "job_p90_ms": round(1000 * float(np.percentile(spent, 90)), 3), "jobs_per_s": round(len(spent) / seconds),
            "busy_loops_per_s": round(sum(loops) / seconds)}


def handoff_rows(pixels: np.ndarray, intervals_ms: tuple[float, ...], busy_threads: tuple[int, ...],
                 seconds: float) -> list[dict]:
    """A trial per busy-thread count and interval, the job being the server's encode of `pixels` ([H, W, 3] uint8) as
    a JPEG request asks for it (quality 90, base64)."""
    from server.encoding import OutputFormat, encode_pixels_b64

    output = OutputFormat("jpeg", 90)
    batch = pixels[None]
    return [handoff_trial(lambda: encode_pixels_b64(batch, output), interval, busy, seconds)
            for busy in busy_threads for interval in intervals_ms]


def handoff_table(rows: list[dict]) -> list[str]:
    """The trials as markdown rows, each busy-thread count's throughput beside its trial at the first interval."""
    first = {}
    for row in rows:
        first.setdefault(row["busy_threads"], row)
    lines = ["| busy Python threads | switch interval | encode job ms | p90 ms | jobs/s (2 threads) "
             "| busy threads' work vs the first interval |", "|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        base = first[row["busy_threads"]]["busy_loops_per_s"]
        work = f"{row['busy_loops_per_s'] / base:.2f}x" if base else ""
        lines.append(f"| {row['busy_threads']} | {row['interval_ms']:g} ms | {row['job_ms']} | {row['job_p90_ms']} "
                     f"| {row['jobs_per_s']} | {work} |")
    return lines
