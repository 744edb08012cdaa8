"""The dynamic batcher's contract, against a small fake engine (milliseconds), and once against the
real onnxruntime engine of the committed bundle; and the event loop's lag probe beside it."""

import asyncio
import time

import numpy as np
import pytest

from server.batcher import DeadlineExceeded, DynamicBatcher, EngineFailure
from server.engines import OnnxRuntimeEngine, padded_size
from server.metrics import Metrics

from serving import BUNDLE


class FakeEngine:
    """Each output row is its input row's tag times 10 plus the batch size it ran in, so a test sees
    both which row came back and in which batch; a tag of -1 makes the whole batch fail."""

    name, max_batch = "fake", 64

    def __init__(self, buckets=()):
        self.buckets, self.batches = buckets, []

    def run(self, feeds):
        tags = feeds["tag"]
        self.batches.append(tags.tolist())
        if (tags == -1).any():
            raise RuntimeError("a poisoned row")
        return tags * 10 + len(tags)


def tagged(*tags):
    return {"tag": np.asarray(tags, np.float64)}


def run(coro):
    return asyncio.run(coro)


async def started(engine, max_batch_size=64, delay_ms=1.0, metrics=None):
    batcher = DynamicBatcher(engine, max_batch_size, delay_ms, metrics)
    batcher.start()
    return batcher


def far():
    return time.monotonic() + 30


def test_requests_share_a_batch_and_each_gets_its_own_rows_back():
    engine = FakeEngine()

    async def scenario():
        batcher = await started(engine, delay_ms=20.0)
        outputs = await asyncio.gather(*(batcher.infer(tagged(*range(i * 3, i * 3 + 1 + i % 3)), far())
                                         for i in range(6)))
        await batcher.stop()
        return outputs

    outputs = run(scenario())
    assert len(engine.batches) == 1  # six requests, one engine run
    size = len(engine.batches[0])
    for i, out in enumerate(outputs):
        assert out.tolist() == [10 * tag + size for tag in range(i * 3, i * 3 + 1 + i % 3)]


def test_a_large_request_is_split_into_max_batch_chunks_and_joined_back():
    engine = FakeEngine()

    async def scenario():
        batcher = await started(engine, max_batch_size=16)
        out = await batcher.infer(tagged(*range(50)), far())
        await batcher.stop()
        return out

    out = run(scenario())
    assert [len(b) for b in engine.batches] == [16, 16, 16, 2]
    assert out.tolist() == [10 * tag + (16 if tag < 48 else 2) for tag in range(50)]


def test_a_large_request_to_an_engine_answering_tensors_is_joined_as_a_tensor():
    """The torch backend's decoder answers tensors on its device: a request split across its batches gets its
    rows joined there (numpy would copy them to the host, or fail on a GPU's)."""
    torch = pytest.importorskip("torch")

    class TensorEngine(FakeEngine):
        def run(self, feeds):
            return torch.as_tensor(super().run(feeds))

    async def scenario():
        batcher = await started(TensorEngine(), max_batch_size=16)
        out = await batcher.infer(tagged(*range(40)), far())
        await batcher.stop()
        return out

    out = run(scenario())
    assert isinstance(out, torch.Tensor)
    assert out.tolist() == [10 * tag + (16 if tag < 32 else 8) for tag in range(40)]


def test_batches_are_padded_to_the_engine_buckets_and_the_padding_is_dropped():
    engine = FakeEngine(buckets=(8, 16, 32, 64))

    async def scenario():
        batcher = await started(engine)
        out = await batcher.infer(tagged(4, 5, 6), far())
        await batcher.stop()
        return out

    out = run(scenario())
    assert engine.batches == [[4, 5, 6, 6, 6, 6, 6, 6]]  # the last row repeated up to the bucket
    assert out.tolist() == [48, 58, 68]
    assert padded_size(5, (1, 2, 4, 8, 16)) == 8 and padded_size(16, (1, 2, 4, 8, 16)) == 16
    assert padded_size(5, ()) == 5


GPU_BUCKETS = (1, 2, 4, 8, 16)


def bucketed_batches(costs_ms: dict[int, float], requests: list[int], split_to_buckets: bool = True):
    """The batches a bucketed engine runs (tags, padding included) when `requests` (rows each, in deadline order)
    are queued at once under these measured costs per bucket; every request's output checked on the way."""
    engine = FakeEngine(buckets=GPU_BUCKETS)

    async def scenario():
        metrics = Metrics()
        batcher = DynamicBatcher(engine, 16, 30.0, metrics, split_to_buckets)
        for size, ms in costs_ms.items():
            batcher.cost.observe(size, ms / 1000)
        batcher.start()
        now, tags = time.monotonic(), iter(range(100))
        feeds = [tagged(*(next(tags) for _ in range(rows))) for rows in requests]
        calls = [batcher.infer(feed, now + 10 + i) for i, feed in enumerate(feeds)]
        outputs = await asyncio.wait_for(asyncio.gather(*calls), 5)  # a row lost in a split would hang here
        await batcher.stop()
        return feeds, outputs, metrics.engine(engine.name).padded_rows._value.get()

    feeds, outputs, padded = run(scenario())
    sizes = {tag: len(batch) for batch in engine.batches for tag in batch}
    for feed, out in zip(feeds, outputs, strict=True):
        assert out.tolist() == [10 * tag + sizes[tag] for tag in feed["tag"]]
    return engine.batches, padded


LINEAR_MS = {1: 2.0, 2: 3.0, 4: 5.0, 8: 9.0, 16: 17.0}  # a row costs the same in any batch: padding is waste


def test_rows_that_would_pad_far_run_as_the_bucket_below_and_the_rest_next():
    batches, padded = bucketed_batches(LINEAR_MS, [1] * 9)
    assert batches == [list(range(8)), [8]]  # 9 ms + 2 ms, not 17 ms for 16 rows; the latest deadline waits
    assert padded == 0
    batches, padded = bucketed_batches(LINEAR_MS, [3, 3, 3])  # whole requests: 6 rows (padded to 8) then 3 (4)
    assert [len(batch) for batch in batches] == [8, 4] and batches[0][:6] == list(range(6)) and padded == 3


def test_a_split_that_costs_more_than_the_padding_is_not_made():
    flat = {size: 10.0 for size in GPU_BUCKETS}  # a GPU at small batches: 16 rows cost what 1 does
    assert [len(batch) for batch in bucketed_batches(flat, [1] * 9)[0]] == [16]
    assert [len(batch) for batch in bucketed_batches(LINEAR_MS, [1] * 15)[0]] == [16]  # 9 + 9 ms > 17 ms
    unmeasured = {1: 2.0, 16: 17.0}  # 8 rows' cost unknown: it borrows 16's, and the split loses
    assert [len(batch) for batch in bucketed_batches(unmeasured, [1] * 9)[0]] == [16]
    batches, padded = bucketed_batches(LINEAR_MS, [1] * 9, split_to_buckets=False)
    assert [len(batch) for batch in batches] == [16] and padded == 7


def test_rows_leave_earliest_deadline_first():
    engine = FakeEngine()

    async def scenario():
        batcher = await started(engine, max_batch_size=2, delay_ms=50.0)  # all four queued before the first batch
        now = time.monotonic()
        calls = [batcher.infer(tagged(tag), now + deadline)
                 for tag, deadline in ((1, 40.0), (2, 30.0), (3, 10.0), (4, 20.0))]
        outputs = await asyncio.gather(*calls)
        await batcher.stop()
        return outputs

    outputs = run(scenario())
    assert [o[0] for o in outputs] == [12, 22, 32, 42]  # every caller got its own row back
    assert engine.batches == [[3, 4], [2, 1]]


def test_expired_rows_are_dropped_before_they_run():
    engine = FakeEngine()

    async def scenario():
        batcher = await started(engine, delay_ms=100.0)
        with pytest.raises(DeadlineExceeded):
            await batcher.infer(tagged(1), time.monotonic() + 0.01)  # expires while the batch gathers
        await batcher.stop()

    run(scenario())
    assert engine.batches == []


def test_rows_of_a_cancelled_request_are_skipped():
    engine = FakeEngine()

    async def scenario():
        metrics = Metrics()
        batcher = await started(engine, delay_ms=50.0, metrics=metrics)
        gone = asyncio.ensure_future(batcher.infer(tagged(1, 2), far()))
        kept = asyncio.ensure_future(batcher.infer(tagged(3), far()))
        await asyncio.sleep(0)
        gone.cancel()  # the client left while its rows waited
        out = await kept
        await batcher.stop()
        return out, metrics.rejected.labels(reason="cancelled")._value.get()

    out, skipped = run(scenario())
    assert engine.batches == [[3]] and out.tolist() == [31] and skipped == 1


def test_an_engine_error_fails_only_its_batch():
    engine = FakeEngine()

    async def scenario():
        metrics = Metrics()
        batcher = await started(engine, max_batch_size=2, delay_ms=20.0, metrics=metrics)
        bad = asyncio.ensure_future(batcher.infer(tagged(-1, 5), far()))
        good = asyncio.ensure_future(batcher.infer(tagged(7, 8), far()))  # the next batch
        with pytest.raises(EngineFailure, match="failed on a batch of 2 rows"):
            await bad
        out = await good
        await batcher.stop()
        return out, metrics.engine(engine.name).engine_errors._value.get()

    out, errors = run(scenario())
    assert out.tolist() == [72, 82] and errors == 1


def test_the_batcher_learns_what_each_batch_size_costs():
    async def scenario():
        batcher = await started(FakeEngine())
        await batcher.infer(tagged(*range(30)), far())
        await batcher.stop()
        return batcher.cost

    cost = run(scenario())
    assert cost.measured and cost.seconds(30) > 0 and cost.seconds_per_row() > 0


@pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(), reason=f"no bundle at {BUNDLE}")
def test_the_real_engine_batched_equals_the_real_engine_alone():
    engine = OnnxRuntimeEngine(BUNDLE / "student_w1.5.onnx", "student", max_batch=64)
    rng = np.random.default_rng(0)

    def rows(n, seed):
        generator = np.random.default_rng(seed)
        return {"x": generator.standard_normal((n, 1, 8, 8), dtype=np.float32), "t": np.ones(n, np.float32),
                "s": np.zeros(n, np.float32), "label": generator.integers(0, 10, n)}

    requests = [rows(int(rng.integers(1, 4)), seed) for seed in range(12)]

    async def scenario():
        batcher = await started(engine, delay_ms=50.0)
        outputs = await asyncio.gather(*(batcher.infer(r, far()) for r in requests))
        await batcher.stop()
        return outputs

    for request, output in zip(requests, run(scenario()), strict=True):
        assert np.abs(output - engine.run(request)).max() <= 1e-5


def test_noise_follows_the_documented_recipe():
    from server.noise import noise_for

    seeds = [0, 1, 2**63 - 1, 123456789]
    expected = np.stack([np.random.default_rng(s).standard_normal((1, 8, 8), dtype=np.float32) for s in seeds])
    assert np.array_equal(noise_for(seeds, (1, 8, 8)), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_encoding_round_trips(channels):
    import io

    from PIL import Image

    from server.imaging import png_bytes

    pixels = np.random.default_rng(channels).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(pixels, scale=3))))
    expected = pixels.repeat(3, 0).repeat(3, 1)
    assert np.array_equal(decoded, expected[..., 0] if channels == 1 else expected)


def test_the_loop_lag_probe_sees_the_loop_held():
    """A coroutine that blocks the event loop for 200 ms shows as one wake-up about 200 ms late."""
    from prometheus_client import CollectorRegistry, Histogram

    from server.metrics import watch_loop_lag

    registry = CollectorRegistry()
    lag = Histogram("lag_seconds", "wake-up lateness", registry=registry)

    async def held():
        probe = asyncio.create_task(watch_loop_lag(lag, period_s=0.01))
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # the loop's own work, or a thread holding the GIL
        await asyncio.sleep(0.05)
        probe.cancel()

    asyncio.run(held())
    total, wakes = (registry.get_sample_value(f"lag_seconds_{key}") for key in ("sum", "count"))
    assert 0.18 < total < 0.3 and wakes >= 5
    # the rest woke about on time: lateness, not the sleep itself
    assert registry.get_sample_value("lag_seconds_bucket", {"le": "0.005"}) >= wakes / 2
