"""flowmap/bucket_batching.py: the runs behind docs/stages.md's bucket-split table serve every arrival under both
policies, over the real onnxruntime engine of the committed shapes bundle padded to the GPU backends' buckets."""

from pathlib import Path

import numpy as np
import pytest

from flowmap.bucket_batching import arrival_times, bucket_rows, bucket_table, bucketed_engine

SHAPES = Path(__file__).resolve().parents[1] / "models" / "shapes"


def test_arrivals_are_a_poisson_process_of_the_rate_asked_and_repeat_with_their_seed():
    times = arrival_times(1000.0, 10.0, seed=3)
    assert 9700 < len(times) < 10300 and (np.diff(times) > 0).all() and times[-1] < 10.0
    gaps = np.diff(times)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05  # exponential gaps: as spread as they are long
    assert np.array_equal(times, arrival_times(1000.0, 10.0, seed=3))


@pytest.mark.skipif(not (SHAPES / "manifest.json").is_file(), reason=f"no bundle at {SHAPES}")
def test_both_policies_answer_every_arrival_one_row_each_on_a_bucketed_engine():
    engine, feeds = bucketed_engine(str(SHAPES), 4)
    assert engine.buckets == (1, 2, 4) and all(len(value) == 1 for value in feeds.values())
    rows = bucket_rows(engine, feeds, (0.5,), seconds=0.4, rounds=1)
    assert [row["split"] for row in rows] == [False, True]
    assert rows[0]["requests"] == rows[1]["requests"] > 0  # the same arrivals, each answered
    assert all(row["rows"] == row["requests"] and row["padding_per_row"] >= 0 for row in rows)
    lines = bucket_table(rows)
    assert len(lines) == 4 and "| padded |" in lines[2] and "| split at buckets |" in lines[3]
