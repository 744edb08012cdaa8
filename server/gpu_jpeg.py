"""JPEG on the GPU: a request's images encoded in one batched nvJPEG call through
`torchvision.io.encode_jpeg` on device tensors (the torch backend on CUDA, `output_format=jpeg`).
Pixels are quantised exactly as server/imaging.py's `to_uint8` does (clip, scale, round half to even).

The quantising runs on a CUDA stream of this encoder's own, so it never waits behind an engine's batch, and
is finished before nvJPEG starts: torchvision encodes on a stream of its own that waits for none of ours."""

from __future__ import annotations

import contextlib

import numpy as np


def quantised(images):
    """[N, C, H, W] in [-1, 1], a tensor -> uint8 [N, C, H, W] where it is: server/imaging.py's `to_uint8` (clip,
    scale, round half to even) in torch, so a device's pixels are the host's to the bit."""
    import torch

    return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


class CudaJpeg:
    """Batched JPEG encoding on a CUDA device (or any device torchvision encodes on)."""

    def __init__(self, device: str = "cuda"):
        import torch
        import torchvision.io

        self.torch, self.io, self.device = torch, torchvision.io, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def uint8(self, images) -> object:
        """[N, C, H, W] in [-1, 1] (numpy or a tensor) -> uint8 [N, C, H, W] on the device."""
        return quantised(self.torch.as_tensor(images).to(self.device, non_blocking=True))

    def encode(self, images, quality: int, upscale: int = 1) -> list[bytes]:
        """JPEG bytes of [N, C, H, W] images in [-1, 1]: a host array, or a device tensor that is ready or being
        made on the caller's current stream."""
        with self._on_stream():
            pixels = self.uint8(images)
            if upscale > 1:
                pixels = pixels.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
            pixels = pixels.contiguous()
            if self.stream is not None:
                self.stream.synchronize()
        # on the default stream, outside ours: torchvision retrieves each encoded image on it, so the copies below
        # come after
        encoded = self.io.encode_jpeg(list(pixels), quality=max(1, quality))
        return [np.asarray(data.cpu()).tobytes() for data in encoded]

    def _on_stream(self):
        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_stream(self.torch.cuda.current_stream(self.device))  # a producer on the caller's stream
        return self.torch.cuda.stream(self.stream)
