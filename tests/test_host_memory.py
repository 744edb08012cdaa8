"""The host-memory part of `flowmap bench stages`: each served operation adds less resident memory than its
whole-array form, measured in fresh processes (here at 256 px, where the difference is already clear); a search
of 192 candidates holds a chunk of them and its best, not all."""

from flowmap.host_memory import memory_rows, memory_table


def test_the_served_array_handling_holds_less_than_the_whole_array_forms():
    rows = {row["operation"]: row for row in memory_rows(side=256, images=16, condition=(128, 1024), search=192)}
    join = rows["join a request's decoder batches"]
    assert join["data_mb"] == 12.0 and join["whole_array_x"] > 0.9 and join["served_x"] < 0.75  # a batch, not all
    gather = rows["gather and pad a batch's conditions"]
    assert gather["whole_array_x"] > 1.7 and gather["served_x"] < 1.2  # one copy, not two
    assert rows["clip the candidates for the verifier"]["served_x"] < 0.2 < rows[
        "clip the candidates for the verifier"]["whole_array_x"]
    search = rows["one prompt's conditions for a search"]
    assert search["served_x"] < 0.2 and search["whole_array_x"] > 0.8
    chunked = rows["a search's candidates, decoded and scored (top_k 4)"]
    assert chunked["whole_array_x"] > 0.9 and chunked["served_x"] < 0.6  # (64 + 2 x 4) / 192 of the images
    table = memory_table(list(rows.values()))
    assert len(table) == 2 + 6 and table[2].startswith("| join a request's decoder batches | 16 images of 256 px")
