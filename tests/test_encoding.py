"""Image encodings: each format decodes to the pixels it was given (exactly for png), settings are
checked, and the thread pool gives the same bytes as encoding inline."""

import asyncio
import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from server.encoding import Encoder, OutputFormat, encode_b64, encode_image
from server.imaging import MAX_SIDE, join_rows, largest_upscale, parse_size, to_uint8


def smooth_image(side: int, channels: int) -> np.ndarray:
    ramp = np.linspace(0, 255, side, dtype=np.float64)
    image = (ramp[:, None] + ramp[None, :]) / 2
    return np.repeat(image[..., None], channels, axis=2).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("fmt", "tolerance"), [("png", 0), ("jpeg", 3), ("webp", 3)])
@pytest.mark.parametrize("side", [8, 256])
def test_every_format_decodes_to_its_pixels(channels, fmt, tolerance, side):
    pixels = smooth_image(side, channels)
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(pixels, OutputFormat(fmt)))).convert(
        "L" if channels == 1 else "RGB"), np.float64)
    error = np.abs(decoded - (pixels[..., 0] if channels == 1 else pixels)).mean()
    assert error <= tolerance, f"{fmt}: mean error {error:.2f}"


def test_upscaling_repeats_pixels():
    pixels = smooth_image(8, 1)
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(pixels, OutputFormat("png", upscale=4)))))
    assert decoded.shape == (32, 32) and np.array_equal(decoded[::4, ::4], pixels[..., 0])


@pytest.mark.parametrize("height, width", [(8, 8), (64, 128), (100, 30), (MAX_SIDE, MAX_SIDE), (2 * MAX_SIDE, 16)])
def test_the_largest_upscale_is_the_largest_size_a_request_may_ask(height, width):
    """The warm-up times the largest upscale a request may ask: the one parse_size accepts and the next it refuses."""
    scale = largest_upscale(height, width)
    assert parse_size(f"{width * scale}x{height * scale}", height, width) == scale
    with pytest.raises(ValueError, match="up to 1024 pixels a side"):
        parse_size(f"{width * (scale + 1)}x{height * (scale + 1)}", height, width)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="output_format must be one of png, jpeg, webp"):
        OutputFormat("gif")
    with pytest.raises(ValueError, match="output_compression must lie in 0..100"):
        OutputFormat("jpeg", 101)


def test_the_pool_and_inline_encoding_give_the_same_bytes():
    images = np.random.default_rng(0).uniform(-1, 1, (3, 3, 256, 256)).astype(np.float32)
    small = images[:, :1, :8, :8]
    output = OutputFormat("jpeg", 90)

    async def scenario():
        encoder = Encoder(2)
        try:
            return await encoder.encode(images, output), await encoder.encode(small, output)
        finally:
            encoder.close()

    pooled, inline = asyncio.run(scenario())
    assert pooled == encode_b64(images, output) and inline == encode_b64(small, output)
    assert base64.b64decode(pooled[0])[:2] == b"\xff\xd8"  # a JPEG


def test_gpu_jpeg_takes_rgb_only_and_a_failure_falls_back_to_the_cpu():
    """nvJPEG encodes no grayscale (the digits bundle's images), and an admitted request gets its images
    even when the GPU encoder fails. The GPU encoder here is a stand-in that records what it was given."""
    class FailingGpuJpeg:
        def __init__(self):
            self.given = []

        def encode(self, images, quality, upscale=1):
            self.given.append(images.shape)
            raise RuntimeError("nvJPEG is out of memory")

    output = OutputFormat("jpeg", 90)
    gray = np.random.default_rng(0).uniform(-1, 1, (2, 1, 64, 64)).astype(np.float32)
    rgb = np.random.default_rng(1).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)

    async def scenario(encoder):
        try:
            return await encoder.encode(gray, output), await encoder.encode(rgb, output)
        finally:
            encoder.close()

    encoder = Encoder(2, gpu_jpeg_min_side=64)
    encoder.gpu_jpeg = FailingGpuJpeg()
    assert not encoder.on_gpu(gray, output) and encoder.on_gpu(rgb, output)
    assert not encoder.on_gpu(rgb, OutputFormat("png"))
    from_gray, from_rgb = asyncio.run(scenario(encoder))
    assert encoder.gpu_jpeg.given == [rgb.shape]  # tried for the RGB images alone
    assert from_gray == encode_b64(gray, output) and from_rgb == encode_b64(rgb, output)


def test_images_below_the_gpu_jpeg_side_are_encoded_on_the_cpu_and_each_encoder_counts_its_images():
    """Small images go to the CPU's encoder (beside the engines' kernels nvJPEG was the slower at 256 px); the
    longer side counts after upscaling; the counter says which encoder made each image."""
    from prometheus_client import CollectorRegistry, Counter

    class RecordingGpuJpeg:
        def __init__(self):
            self.given = []

        def encode(self, images, quality, upscale=1):
            self.given.append((images.shape, upscale))
            return [encode_image(pixels, OutputFormat("jpeg", quality, upscale)) for pixels in to_uint8(images)]

    registry = CollectorRegistry()
    encoded = Counter("encoded", "images by encoder", ["encoder"], registry=registry)
    wide = np.random.default_rng(3).uniform(-1, 1, (2, 3, 48, 96)).astype(np.float32)  # longer side 96
    encoder = Encoder(2, gpu_jpeg_min_side=96, encoded=encoded)
    encoder.gpu_jpeg = RecordingGpuJpeg()
    narrow = wide[:, :, :, :48]

    async def scenario():
        try:
            return [await encoder.encode(images, output) for images, output in (
                (wide, OutputFormat("jpeg", 90)), (narrow, OutputFormat("jpeg", 90)),
                (narrow, OutputFormat("jpeg", 90, upscale=2)), (narrow, OutputFormat("png")))]
        finally:
            encoder.close()

    results = asyncio.run(scenario())
    assert encoder.gpu_jpeg.given == [(wide.shape, 1), (narrow.shape, 2)]  # 96 wide, and 48 upscaled to 96
    assert results[1] == encode_b64(narrow, OutputFormat("jpeg", 90))  # the CPU's 4:2:0 bytes
    assert registry.get_sample_value("encoded_total", {"encoder": "nvjpeg"}) == 4
    assert registry.get_sample_value("encoded_total", {"encoder": "cpu"}) == 4


def test_a_gpu_jpeg_encoder_that_cannot_start_leaves_jpeg_to_the_cpu(caplog):
    """No torchvision (or one built for another torch), or no such device: the server starts and encodes JPEG on
    the CPU, and says why once."""
    rgb = np.random.default_rng(2).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    output = OutputFormat("jpeg", 90)
    encoder = Encoder(1, jpeg_device="cuda:99")  # no machine here has a hundredth GPU
    try:
        assert encoder.gpu_jpeg is None and "JPEG is encoded on the CPU" in caplog.text
        assert asyncio.run(encoder.encode(rgb, output)) == encode_b64(rgb, output)
    finally:
        encoder.close()


def test_the_encoder_times_its_waits_its_copies_and_its_encoding():
    """With one thread and two requests at once, the second waits about as long as the first takes to encode: the
    wait is counted apart from the encoding, and so is the quantising to 8-bit pixels (a host array's copy)."""
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    seconds = Counter("encode_seconds", "time by step", ["step"], registry=registry)
    encoder = Encoder(1, seconds=seconds)
    images = np.random.default_rng(4).uniform(-1, 1, (1, 3, 768, 768)).astype(np.float32)

    async def two_at_once():
        try:
            return await asyncio.gather(*(encoder.encode(images, OutputFormat("png")) for _ in range(2)))
        finally:
            encoder.close()

    asyncio.run(two_at_once())
    spent = {step: registry.get_sample_value("encode_seconds_total", {"step": step}) for step in ("wait", "copy",
                                                                                                  "encode")}
    assert 0 < spent["copy"] < spent["encode"]  # quantising costs less than a PNG's compression
    assert 0.3 * spent["encode"] < spent["wait"] < spent["encode"]  # one request waited for the other's encoding


def test_an_encoding_job_is_timed_by_its_kind_for_admission():
    """Admission counts a request's encoding: the time jobs of its kind (format, quality, size) took so far."""
    encoder = Encoder(1)
    big, png = OutputFormat("webp", 90, upscale=4), OutputFormat("png")
    images = np.random.default_rng(0).uniform(-1, 1, (4, 3, 64, 64)).astype(np.float32)
    assert encoder.job_seconds(4, (3, 64, 64), big) == 0.0  # nothing timed yet: nothing to refuse on
    try:
        started = time.perf_counter()
        asyncio.run(encoder.encode(images, big))
        elapsed = time.perf_counter() - started  # the job, and the hop to its thread and back
        asyncio.run(encoder.encode(images[:1], png))
    finally:
        encoder.close()
    assert 0 < encoder.job_seconds(4, (3, 64, 64), big) <= elapsed  # the job's own time, for its four images
    per_image = encoder.job_seconds(1, (3, 64, 64), big)
    assert per_image > 0 and encoder.job_seconds(8, (3, 64, 64), big) == pytest.approx(8 * per_image)
    assert encoder.job_seconds(1, (3, 64, 64), png) < per_image  # 64 px png against 256 px webp
    # a kind not timed yet: the nearest timed kind of its format, by pixels (256 px webp here, 128 px asked)
    assert encoder.job_seconds(2, (3, 32, 32), big) == pytest.approx(2 * per_image / 4)
    assert encoder.job_seconds(1, (3, 64, 64), OutputFormat("webp")) == pytest.approx(per_image / 16)
    assert encoder.job_seconds(1, (3, 64, 64), OutputFormat("jpeg")) == 0.0  # no jpeg timed: nothing to refuse on


def test_the_warm_up_times_each_format_and_a_new_kind_scales_from_the_nearest_in_pixels():
    """At start the server times one image of each format at the bundle's size (not counted in the metrics), so a
    first request is admitted on an estimate; a size between two timed ones scales from the nearer of them."""
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    encoded = Counter("encoded", "images by encoder", ["encoder"], registry=registry)
    encoder = Encoder(1, encoded=encoded)
    try:
        encoder.warm_up((3, 64, 64))
        timed = {name: encoder.job_seconds(1, (3, 64, 64), OutputFormat(name)) for name in ("png", "jpeg", "webp")}
        assert all(seconds > 0 for seconds in timed.values()), timed
        assert registry.get_sample_value("encoded_total", {"encoder": "cpu"}) in (None, 0.0)
        # natively and at the largest size a request may ask: a 64 px image at 1024 px was timed as such, not
        # scaled from its native time (fixed costs and all)
        upscaled = encoder.job_seconds(1, (3, 64, 64), OutputFormat("png", upscale=16))
        assert upscaled > 0 and upscaled != pytest.approx(256 * timed["png"])
        encoder.warm_up((3, 512, 512))
        large = encoder.job_seconds(1, (3, 512, 512), OutputFormat("png"))
        assert encoder.job_seconds(1, (3, 96, 96), OutputFormat("png")) == pytest.approx(timed["png"] * 9 / 4)
        assert encoder.job_seconds(1, (3, 448, 448), OutputFormat("png")) == pytest.approx(large * 49 / 64)
        assert encoder.job_seconds(1, (3, 128, 128), OutputFormat("png", upscale=4)) == pytest.approx(large)
    finally:
        encoder.close()


def test_a_request_cancelled_while_its_job_waits_for_a_thread_is_never_encoded():
    """A client gone (or its deadline passed) while its job waits in the pool's queue: the job is dropped, not
    encoded for nobody, and the request before it still gets its images."""
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    encoded = Counter("encoded", "images by encoder", ["encoder"], registry=registry)
    encoder = Encoder(1, encoded=encoded)
    first = np.random.default_rng(5).uniform(-1, 1, (2, 3, 768, 768)).astype(np.float32)  # long enough to queue behind
    second = first[:1]

    async def scenario():
        try:
            running = asyncio.create_task(encoder.encode(first, OutputFormat("png")))
            waiting = asyncio.create_task(encoder.encode(second, OutputFormat("png")))
            await asyncio.sleep(0.01)  # both submitted; the one thread holds the first
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            return await running
        finally:
            encoder.close()

    images = asyncio.run(scenario())
    assert images == encode_b64(first, OutputFormat("png"))
    assert registry.get_sample_value("encoded_total", {"encoder": "cpu"}) == 2  # the first's two, not the third


def test_quantising_and_joining_a_few_rows_at_a_time_change_no_value(monkeypatch):
    """At 1024 px a request's float temporaries matter: to_uint8 quantises a few images at a time, and join_rows
    copies each block once and drops it. Both give exactly what one operation on the whole array gives."""
    import torch

    import server.imaging

    images = np.random.default_rng(0).normal(0, 0.8, (7, 3, 4, 5)).astype(np.float32)
    expected = np.rint((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    monkeypatch.setattr(server.imaging, "QUANTISE_VALUES", 2 * 3 * 4 * 5)  # two images a chunk, the last alone
    np.testing.assert_array_equal(to_uint8(images), expected)
    parts = [images[:3], images[3:4], images[4:]]
    assert np.array_equal(join_rows(parts), images) and parts == []
    tensors = [torch.from_numpy(images[:2]), torch.from_numpy(images[2:])]
    assert torch.equal(join_rows(tensors), torch.from_numpy(images)) and tensors == []
