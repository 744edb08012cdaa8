"""The host-memory part of `flowmap bench stages`: each served operation adds less resident memory than its
whole-array form, measured in fresh processes (here at 256 px, where the difference is already clear)."""

from flowmap.host_memory import memory_rows, memory_table


def test_the_served_array_handling_holds_less_than_the_whole_array_forms():
    rows = {row["operation"]: row for row in memory_rows(side=256, images=16, condition=(128, 1024), search=64)}
    join = rows["join a request's decoder batches"]
    assert join["data_mb"] == 12.0 and join["whole_array_x"] > 0.9 and join["served_x"] < 0.75  # a batch, not all
    gather = rows["gather and pad a batch's conditions"]
    assert gather["whole_array_x"] > 1.7 and gather["served_x"] < 1.2  # one copy, not two
    assert rows["clip the candidates for the verifier"]["served_x"] < 0.2 < rows[
        "clip the candidates for the verifier"]["whole_array_x"]
    search = rows["one prompt's conditions for a search"]
    assert search["served_x"] < 0.2 and search["whole_array_x"] > 0.8
    table = memory_table(list(rows.values()))
    assert len(table) == 2 + 5 and table[2].startswith("| join a request's decoder batches | 16 images of 256 px")
