"""Images out: [-1, 1] floats to uint8, nearest-neighbour upscaling, PNG and .npy encoding."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DeviceImages:
    """A batch of images as the torch backend's decoder hands them on: `images` in [-1, 1], [N, C, H, W], a tensor
    on its device (what scoring, raw arrays and nvJPEG read), and `pixels`, their 8-bit [N, H, W, C] quantising
    (`to_uint8`'s) made on the device and copied to the host in one go per batch (what the CPU encoders read: no
    request copies its own images, nor quantises them on the CPU). Rows slice and join as an array's do.
    `images` is None once only the pixels are needed (`pixels_only`)."""

    images: object
    pixels: np.ndarray

    def __getitem__(self, rows) -> DeviceImages:
        return DeviceImages(None if self.images is None else self.images[rows], self.pixels[rows])

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> tuple[int, ...]:
        """[N, C, H, W], as the float images' (the pixels are [N, H, W, C])."""
        rows, height, width, channels = self.pixels.shape
        return rows, channels, height, width

    def pixels_only(self) -> DeviceImages:
        """The same images without their floats: what a CPU encoder reads, holding no device memory."""
        return DeviceImages(None, self.pixels)


def on_host(images) -> np.ndarray:
    """Images as a numpy array: a torch tensor (the torch backend keeps a decoder's images on its device until
    they are encoded), or DeviceImages' `images`, is copied to the host; a numpy array is returned as it is."""
    if isinstance(images, DeviceImages):
        if images.images is None:
            raise ValueError("on_host: these images' floats were dropped (pixels_only); only their pixels remain")
        images = images.images
    return images if isinstance(images, np.ndarray) else images.cpu().numpy()


async def to_host(images) -> np.ndarray:
    """`on_host` off the event loop for a tensor: copying a device's images waits for the device."""
    if isinstance(images, np.ndarray):
        return images
    return await asyncio.to_thread(on_host, images)


def join_rows(parts: list):
    """Row blocks joined in order where they are: numpy arrays on the host, the torch backend's tensors on their
    device, DeviceImages on both (a decoder's images split across its batches). It empties `parts`: each block is
    dropped once copied, so a 512-candidate search decoded 8 rows a batch peaks at its images and one batch more,
    not twice its images (6.4 GB more at 1024 px)."""
    if not parts:
        raise ValueError("join_rows: no rows to join")
    if all(isinstance(part, DeviceImages) for part in parts):
        images, pixels = [part.images for part in parts], [part.pixels for part in parts]
        parts.clear()
        return DeviceImages(join_rows(images), join_rows(pixels))
    if all(isinstance(part, np.ndarray) for part in parts):
        joined = np.empty((sum(len(part) for part in parts), *parts[0].shape[1:]), np.result_type(*parts))
    else:
        import torch  # only the torch backend hands tensors over

        parts[:] = [torch.as_tensor(part) for part in parts]
        joined = torch.empty((sum(len(part) for part in parts), *parts[0].shape[1:]), dtype=parts[0].dtype,
                             device=parts[0].device)
    fill_rows(joined, parts)
    return joined


def fill_rows(out, blocks: list) -> int:
    """Copy the blocks' rows in order into `out` (an array or a tensor with room for them), dropping each block
    from `blocks` once it is copied, so its memory can go before the next is copied; returns the rows copied."""
    start = 0
    while blocks:
        block = blocks.pop(0)
        out[start:start + len(block)] = block
        start += len(block)
    return start


QUANTISE_VALUES = 1 << 23  # floats quantised at once by to_uint8 (32 MB of float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] uint8 (values clipped, rounded half to even; server/gpu_jpeg.py's
    `quantised` is the same on a device)."""
    pixels = np.empty(images.shape, np.uint8)
    # a few images at a time: the float temporaries of a whole request are twice its images (6.4 GB for 256 at
    # 1024 px), a chunk's about 32 MB
    rows = max(1, QUANTISE_VALUES // max(1, math.prod(images.shape[1:])))
    for start in range(0, len(images), rows):
        chunk = np.clip(images[start:start + rows], -1.0, 1.0)
        chunk += 1.0
        chunk *= 127.5
        pixels[start:start + rows] = np.rint(chunk, out=chunk)
    return pixels.transpose(0, 2, 3, 1)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPE = {1: 0, 3: 2, 4: 6}  # grey, RGB, RGBA


def png_bytes(pixels: np.ndarray, scale: int = 1) -> bytes:
    """One [H, W, C] uint8 image as an 8-bit PNG, upscaled `scale` times by pixel repetition.

    Written directly (IHDR, one zlib IDAT, IEND): for small images this is several times faster than
    going through PIL, and the bytes depend only on the pixels.
    """
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    height, width, channels = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, width * channels)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, COLOUR_TYPE[channels], 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))


def b64_npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


MAX_SIDE = 1024  # the longest side, in pixels, a request's `size` may upscale to (a native image may be larger)


def parse_size(size: str | None, height: int, width: int, max_side: int = MAX_SIDE) -> int:
    """The integer upscale factor for an OpenAI-style "WxH" size: native or a whole multiple of it."""
    if size is None or size == f"{width}x{height}":
        return 1
    try:
        sides = size.lower().split("x")
        if not all(side.isascii() and side.isdigit() for side in sides):  # int() takes " 16", "1_6" and "１６"
            raise ValueError(size)
        w, h = (int(side) for side in sides)
    except ValueError:
        raise ValueError(f"size must look like '{width}x{height}' or a whole multiple such as "
                         f"'{8 * width}x{8 * height}', got {size!r}") from None
    scale = w // width
    if w != scale * width or h != scale * height or scale < 1 or max(w, h) > max_side:
        raise ValueError(f"size must be the native {width}x{height} or a whole multiple of it up to {max_side} "
                         f"pixels a side (e.g. '{8 * width}x{8 * height}'), got {size!r}")
    return scale


def largest_upscale(height: int, width: int, max_side: int = MAX_SIDE) -> int:
    """The largest whole upscale `parse_size` allows images `height` x `width`: 1 where native is the largest."""
    return max(1, max_side // max(height, width))
