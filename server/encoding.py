"""Images out, in the format a request asks for (OpenAI Images: `output_format` png | jpeg | webp,
`output_compression` 0-100), encoded off the event loop in a bounded thread pool.

The encoders are what `flowmap bench stages` measured fastest on a photograph (docs/stages.md): for
JPEG simplejpeg with 4:2:0 subsampling (as fast as PyTurboJPEG, which needs a system libjpeg-turbo 3,
and unlike Pillow it releases the GIL); for WebP Pillow at method 0 (2.5x faster than its default for
about 10% more bytes); for PNG our own writer up to 128x128 (three times Pillow's speed on the
small images class bundles serve) and Pillow at compression level 1 above (as fast as ours there, and
smaller). Large requests are encoded in a bounded thread pool, since those encoders release the GIL;
small ones inline, where the hop to a thread would cost more than the encoding. A format's bytes
depend only on the pixels and the settings: the same seed gives the same bytes in any batch. On the
torch backend on CUDA, RGB JPEG of GPU_JPEG_MIN_SIDE pixels or more goes to the GPU instead (server/gpu_jpeg.py:
one nvJPEG call a request), which torchvision encodes with 4:4:4 chroma: larger files than the CPU's 4:2:0, and
other bytes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from server.imaging import DeviceImages, largest_upscale, on_host, png_bytes, to_uint8

log = logging.getLogger("flowmap.encoding")

FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# for an encode thread; the images to the host as 8-bit pixels; pixels to bytes
ENCODE_STEPS = ("wait", "copy", "encode")
# OpenAI's default: 100 is the least compression (the best quality) for jpeg and webp
DEFAULT_COMPRESSION = 100
OWN_PNG_MAX_PIXELS = 128 * 128  # our PNG writer wins up to this size, Pillow's level 1 beyond
INLINE_MAX_PIXELS = 128 * 128  # a request with fewer pixels in all is encoded on the event loop
# The shortest longer side nvJPEG encodes; smaller images go to the CPU, in the CPU backend's 4:2:0 (smaller files,
# the same bytes on either backend). Alone on an H200 nvJPEG took 0.28 ms a 256 px image and simplejpeg 1.3 ms;
# served there, a 256 px request's encoding takes simplejpeg 2.43 ms (docs/gpu.md), and nvJPEG served no more
# images/s than it in the one run that compared them, which a gate on the event loop (since removed) held. At
# 1024 px the CPU took 31 ms an image, 14x nvJPEG; between, unmeasured.
GPU_JPEG_MIN_SIDE = 768


def kind_pixels(kind: tuple) -> int:
    """The pixels one image of an encoding kind ((output, [C, H, W], on_gpu)) is encoded at, upscaling included."""
    output, (_, height, width), _ = kind
    return height * width * output.upscale ** 2


@dataclass(frozen=True)
class OutputFormat:
    format: str = "png"
    compression: int = DEFAULT_COMPRESSION  # jpeg/webp quality 0-100; ignored by png, which is lossless
    upscale: int = 1  # whole-number nearest-neighbour upscaling before encoding

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"output_format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0 <= self.compression <= 100:
            raise ValueError(f"output_compression must lie in 0..100, got {self.compression}")


def formats_for(shape: tuple[int, ...]) -> tuple[str, ...]:
    """The formats images of `shape` ([C, H, W]) can be encoded in: JPEG holds no alpha channel."""
    return tuple(name for name in FORMATS if not (shape[0] == 4 and name == "jpeg"))


def encode_image(pixels: np.ndarray, output: OutputFormat) -> bytes:
    """One [H, W, C] uint8 image (C = 1 or 3) as bytes of `output.format`."""
    if output.upscale > 1:
        pixels = pixels.repeat(output.upscale, axis=0).repeat(output.upscale, axis=1)
    if output.format == "png" and pixels.shape[0] * pixels.shape[1] <= OWN_PNG_MAX_PIXELS:
        return png_bytes(pixels)
    if output.format == "jpeg":
        import simplejpeg

        colorspace = "GRAY" if pixels.shape[2] == 1 else "RGB"
        return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=max(1, output.compression),
                                      colorspace=colorspace, colorsubsampling="420")
    from PIL import Image

    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    if output.format == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="WEBP", quality=output.compression, method=0)
    return buffer.getvalue()


def encode_b64(images: np.ndarray, output: OutputFormat) -> list[str]:
    """[N, C, H, W] images in [-1, 1] -> base64 strings of the encoded images."""
    return encode_pixels_b64(to_uint8(images), output)


def encode_pixels_b64(pixels: np.ndarray, output: OutputFormat) -> list[str]:
    """[N, H, W, C] uint8 images -> base64 strings of the encoded images."""
    return [base64.b64encode(encode_image(image, output)).decode() for image in pixels]


class Encoder:
    """A bounded pool of encoding threads: a request's images are encoded in one job, at most
    `workers` jobs at a time (the rest wait their turn in the pool's queue), so the event loop never waits on an
    encoder.
    `encoded`, where given, is a counter labelled by encoder ("nvjpeg" or "cpu") that each image adds one to;
    `seconds` one labelled by step (ENCODE_STEPS) that each request adds its time in that step to."""

    def __init__(self, workers: int, jpeg_device: str | None = None, gpu_jpeg_min_side: int = GPU_JPEG_MIN_SIDE,
                 encoded=None, seconds=None):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encode")
        # each series bound once: a label lookup per request would cost more than the count
        self.encoded = None if encoded is None else {name: encoded.labels(encoder=name) for name in ("nvjpeg", "cpu")}
        self.seconds = None if seconds is None else {step: seconds.labels(step=step) for step in ENCODE_STEPS}
        # the torch backend on CUDA: JPEG in one batched nvJPEG call per request (server/gpu_jpeg.py)
        self.gpu_jpeg, self.gpu_jpeg_min_side = None, gpu_jpeg_min_side
        self._seconds_per_image: dict[tuple, float] = {}  # by kind of job (`_kind`), measured
        if jpeg_device is not None:
            try:
                from server.gpu_jpeg import CudaJpeg

                self.gpu_jpeg = CudaJpeg(jpeg_device)
            except Exception as err:  # no torchvision, or one built for another torch: the CPU encoder serves
                log.warning("no GPU JPEG on %s (%s: %s); JPEG is encoded on the CPU (`pip install torchvision` "
                            "matching torch for nvJPEG)", jpeg_device, type(err).__name__, err)

    def on_gpu(self, images: np.ndarray, output: OutputFormat) -> bool:
        """Whether these images go to the GPU encoder: RGB JPEG only (nvJPEG encodes no grayscale), with a longer
        side, once upscaled, of at least `gpu_jpeg_min_side` pixels."""
        return self._shape_on_gpu(tuple(images.shape[1:]), output)

    def _shape_on_gpu(self, shape: tuple[int, ...], output: OutputFormat) -> bool:
        side = max(shape[1:]) * output.upscale
        return (self.gpu_jpeg is not None and output.format == "jpeg" and shape[0] == 3
                and side >= self.gpu_jpeg_min_side)

    def job_seconds(self, images: int, shape: tuple[int, ...], output: OutputFormat) -> float:
        """About how long one job encoding `images` images of `shape` ([C, H, W], before upscaling) takes, from the
        jobs of that kind (format, quality, size, encoder) timed so far; a kind not timed yet, from the kind of its
        format and encoder nearest it in pixels, scaled by pixels (the warm-up times each format at the bundle's
        size); 0 where its format has no kind timed."""
        kind = self._kind(shape, output)
        if kind in self._seconds_per_image:
            return images * self._seconds_per_image[kind]
        pixels = kind_pixels(kind)
        alike = [(abs(math.log(kind_pixels(timed) / pixels)), seconds / kind_pixels(timed))
                 for timed, seconds in self._seconds_per_image.items()
                 if timed[0].format == output.format and timed[2] == kind[2]]
        return images * pixels * min(alike)[1] if alike else 0.0

    def _kind(self, shape: tuple[int, ...], output: OutputFormat) -> tuple:
        return output, tuple(shape), self._shape_on_gpu(tuple(shape), output)

    def warm_up(self, shape: tuple[int, ...], seed: int = 0) -> None:
        """Time one job of each format at its default quality on an image of `shape` ([C, H, W]), natively and
        upscaled to the largest size a request may ask, so admission knows what a first request's encoding costs
        (a size between scales from the nearer of the two: a small image's time is mostly fixed costs, which
        scaled to 1024 px would refuse requests that fit). The image is noise, the slowest to compress, so the
        estimates err long until real jobs of their kind replace them. Not counted in the metrics."""
        images = np.random.default_rng(seed).uniform(-1, 1, (1, *shape)).astype(np.float32)
        largest = largest_upscale(*shape[1:])
        for name, upscale in ((name, upscale) for name in formats_for(shape) for upscale in sorted({1, largest})):
            output = OutputFormat(name, upscale=upscale)
            for _ in range(2):  # the first pays for one-time set-ups (nvJPEG's, an encoder's tables): the second kept
                self._seconds_per_image.pop(self._kind(shape, output), None)
                self._encode(images, output, metered=False)

    def _learn(self, images, output: OutputFormat, seconds: float) -> None:
        """One job's time per image into the moving average of its kind (what `job_seconds` answers from)."""
        kind, per_image = self._kind(tuple(images.shape[1:]), output), seconds / max(len(images), 1)
        old = self._seconds_per_image.get(kind)
        self._seconds_per_image[kind] = per_image if old is None else 0.8 * old + 0.2 * per_image

    def _encode(self, images, output: OutputFormat, metered: bool = True) -> list[str]:
        """`images` encoded, the job's time learnt for admission (`_learn`), and, where `metered`, counted in the
        metrics."""
        started = time.perf_counter()
        if self.on_gpu(images, output):
            try:
                on_device = images.images if isinstance(images, DeviceImages) else images
                encoded = [base64.b64encode(data).decode()
                           for data in self.gpu_jpeg.encode(on_device, output.compression, output.upscale)]
                spent = time.perf_counter() - started
                self._learn(images, output, spent)
                if metered:
                    self._spent("encode", spent)
                    self._count("nvjpeg", encoded)
                return encoded
            except Exception:  # an admitted request gets its images: the CPU encoder makes the same format
                log.exception("GPU JPEG encoding failed; encoding this request on the CPU")
                started = time.perf_counter()
        # the torch backend's decoder quantised its batch on the device and copied it to the host once
        pixels = images.pixels if isinstance(images, DeviceImages) else to_uint8(on_host(images))
        copied = time.perf_counter()
        encoded = encode_pixels_b64(pixels, output)
        finished = time.perf_counter()
        self._learn(images, output, finished - started)
        if metered:
            self._spent("copy", copied - started)
            self._spent("encode", finished - copied)
            self._count("cpu", encoded)
        return encoded

    def _count(self, encoder: str, encoded: list[str]) -> None:
        if self.encoded is not None:
            self.encoded[encoder].inc(len(encoded))

    def _spent(self, step: str, seconds: float) -> None:
        if self.seconds is not None:
            self.seconds[step].inc(seconds)

    async def encode(self, images, output: OutputFormat) -> list[str]:
        """Base64 strings of `images` ([N, C, H, W] in [-1, 1]: a numpy array, or the torch backend's tensor on
        its device or DeviceImages) in the requested format."""
        # on the event loop only host images for the CPU: a GPU encode, or a tensor's copy, waits for the device
        inline = isinstance(images, np.ndarray) and not self.on_gpu(images, output)
        pixels = images.shape[2] * images.shape[3] * output.upscale ** 2 * len(images)
        if inline and pixels <= INLINE_MAX_PIXELS:
            return self._encode(images, output)
        # the job waits its turn in the pool's own queue, not on the event loop: under load a loop-side gate cost
        # every job a loop pass to enter and another to hand its thread on, and a busy loop's passes are slow
        return await asyncio.wrap_future(self.pool.submit(self._encode_queued, time.perf_counter(), images, output))

    def _encode_queued(self, queued: float, images, output: OutputFormat) -> list[str]:
        self._spent("wait", time.perf_counter() - queued)
        return self._encode(images, output)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
