"""flowmap/gil_handoff.py: the trials behind docs/stages.md's hand-off table run their jobs beside their busy threads
at the interval asked, and put Python's interval back."""

import sys
import time

import numpy as np

from flowmap.gil_handoff import handoff_rows, handoff_table, handoff_trial


def test_a_trial_runs_its_jobs_beside_its_busy_threads_at_its_interval_and_puts_the_interval_back():
    before, seen = sys.getswitchinterval(), set()
    row = handoff_trial(lambda: (seen.add(sys.getswitchinterval()), time.sleep(0.001)), 2.0, 1, 0.2)
    assert seen == {0.002} and sys.getswitchinterval() == before
    assert row["interval_ms"] == 2.0 and row["busy_threads"] == 1
    assert row["jobs_per_s"] > 0 and row["busy_loops_per_s"] > 0 and row["job_ms"] >= 1 and row["job_p90_ms"] >= 1
    alone = handoff_trial(lambda: time.sleep(0.001), 2.0, 0, 0.1)
    assert alone["busy_loops_per_s"] == 0 and alone["jobs_per_s"] > 0


def test_the_rows_encode_a_jpeg_per_job_and_the_table_compares_each_count_with_its_first_interval():
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rows = handoff_rows(pixels, (5.0, 0.5), (0, 1), 0.1)
    assert [(row["busy_threads"], row["interval_ms"]) for row in rows] == [(0, 5.0), (0, 0.5), (1, 5.0), (1, 0.5)]
    rows[3]["busy_loops_per_s"] = rows[2]["busy_loops_per_s"] // 2
    lines = handoff_table(rows)
    assert len(lines) == 6 and lines[4].endswith("| 1.00x |") and lines[5].endswith("| 0.50x |")
    assert lines[2].endswith("|  |")  # no busy threads, nothing to compare
