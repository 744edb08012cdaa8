"""The dynamic batcher over a real onnxruntime engine, in process."""

import asyncio
import time

import numpy as np
import pytest

from server.batcher import DeadlineExceeded, DynamicBatcher, EngineFailure
from server.engines import OnnxRuntimeEngine, padded_size
from server.metrics import Metrics

from serving import BUNDLE

pytestmark = pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(), reason=f"no bundle at {BUNDLE}")


def rows(labels, seed=0):
    rng = np.random.default_rng(seed)
    n = len(labels)
    return {"x": rng.standard_normal((n, 1, 8, 8), dtype=np.float32), "t": np.ones(n, np.float32),
            "s": np.zeros(n, np.float32), "label": np.asarray(labels, np.int64)}


@pytest.fixture(scope="module")
def engine():
    return OnnxRuntimeEngine(BUNDLE / "student_w1.5.onnx", "student", max_batch=64)


def run(coro):
    return asyncio.run(coro)


def test_an_engine_error_fails_only_its_batch(engine):
    async def scenario():
        metrics = Metrics()
        batcher = DynamicBatcher(engine, 8, 1.0, metrics)
        batcher.start()
        far = time.monotonic() + 30
        # label 99 is outside the embedding table: onnxruntime raises for the whole batch
        bad = asyncio.ensure_future(batcher.infer(rows([3, 99]), far))
        with pytest.raises(EngineFailure, match="failed on a batch of 2 rows"):
            await bad
        good = await batcher.infer(rows([3, 4]), far)  # the next batch succeeds
        await batcher.stop()
        return good, metrics.engine_errors.labels(engine="student")._value.get()

    good, errors = run(scenario())
    assert good.shape == (2, 1, 8, 8) and np.isfinite(good).all() and errors == 1


def test_batches_merge_requests_and_split_them_back(engine):
    async def scenario():
        metrics = Metrics()
        batcher = DynamicBatcher(engine, 64, 50.0, metrics)
        batcher.start()
        far = time.monotonic() + 30
        requests = [rows([i % 10] * (1 + i % 3), seed=i) for i in range(12)]
        outputs = await asyncio.gather(*(batcher.infer(r, far) for r in requests))
        await batcher.stop()
        return requests, outputs, metrics

    requests, outputs, metrics = run(scenario())
    for request, output in zip(requests, outputs, strict=True):
        alone = engine.run(request)
        assert output.shape == alone.shape
        assert np.abs(output - alone).max() <= 1e-5  # each request got its own rows back
    assert metrics.exec_count.labels(engine="student")._value.get() < 12


def test_large_requests_are_chunked_to_the_max_batch(engine):
    async def scenario():
        batcher = DynamicBatcher(engine, 16, 1.0)
        batcher.start()
        request = rows(list(range(10)) * 5)
        out = await batcher.infer(request, time.monotonic() + 30)
        await batcher.stop()
        return request, out

    request, out = run(scenario())
    assert out.shape[0] == 50 and np.abs(out - engine.run(request)).max() <= 1e-5


class RecordingEngine:
    """A fake engine that returns its input and records the rows of every batch it ran."""

    name, max_batch, buckets = "fake", 64, ()

    def __init__(self):
        self.batches = []

    def run(self, feeds):
        self.batches.append(feeds["x"][:, 0].tolist())
        return feeds["x"]


def test_rows_leave_earliest_deadline_first():
    engine = RecordingEngine()

    async def scenario():
        batcher = DynamicBatcher(engine, 2, 50.0)  # batches of 2 rows, a long wait so all four are queued
        batcher.start()
        now = time.monotonic()
        # arrivals: late deadlines first, then an older request's next step (earlier deadline)
        calls = [batcher.infer({"x": np.full((1, 1), tag, np.float32)}, now + deadline)
                 for tag, deadline in ((1, 40.0), (2, 30.0), (3, 10.0), (4, 20.0))]
        outputs = await asyncio.gather(*calls)
        await batcher.stop()
        return outputs

    outputs = run(scenario())
    assert [o[0, 0] for o in outputs] == [1, 2, 3, 4]  # every caller got its own row back
    assert engine.batches == [[3, 4], [2, 1]]


def test_the_batcher_learns_what_each_batch_size_costs(engine):
    async def scenario():
        batcher = DynamicBatcher(engine, 64, 1.0)
        batcher.start()
        await batcher.infer(rows(list(range(10)) * 3), time.monotonic() + 30)
        await batcher.stop()
        return batcher.cost

    cost = run(scenario())
    assert cost.measured and cost.seconds(30) > 0 and cost.seconds_per_row() > 0


def test_expired_rows_are_dropped_before_they_run(engine):
    async def scenario():
        batcher = DynamicBatcher(engine, 64, 100.0)
        batcher.start()
        with pytest.raises(DeadlineExceeded):
            await batcher.infer(rows([1]), time.monotonic() + 0.01)  # expires while the batch gathers
        await batcher.stop()

    run(scenario())


def test_padding_to_buckets():
    assert padded_size(5, (1, 2, 4, 8, 16)) == 8
    assert padded_size(16, (1, 2, 4, 8, 16)) == 16
    assert padded_size(5, ()) == 5


def test_padded_batches_return_the_right_rows():
    engine = OnnxRuntimeEngine(BUNDLE / "student_w1.5.onnx", "student", max_batch=64)
    engine.buckets = (8, 16, 32, 64)  # as the TensorRT provider would ask for

    async def scenario():
        batcher = DynamicBatcher(engine, 64, 1.0)
        batcher.start()
        request = rows([1, 2, 3], seed=5)
        out = await batcher.infer(request, time.monotonic() + 30)
        await batcher.stop()
        return request, out

    request, out = run(scenario())
    assert out.shape[0] == 3 and np.abs(out - engine.run(request)).max() <= 1e-5


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
