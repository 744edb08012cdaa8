"""JPEG on the GPU: a request's images encoded in one batched nvJPEG call through
`torchvision.io.encode_jpeg` on device tensors (the torch backend on CUDA, `output_format=jpeg`).
Pixels are quantised exactly as server/imaging.py's `to_uint8` does (clip, scale, round half to even)."""

from __future__ import annotations

import numpy as np


class CudaJpeg:
    """Batched JPEG encoding on a CUDA device (or any device torchvision encodes on)."""

    def __init__(self, device: str = "cuda"):
        import torch
        import torchvision.io

        self.torch, self.io, self.device = torch, torchvision.io, torch.device(device)

    def uint8(self, images) -> object:
        """[N, C, H, W] in [-1, 1] (numpy or a tensor) -> uint8 [N, C, H, W] on the device."""
        x = self.torch.as_tensor(images).to(self.device, non_blocking=True)
        return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(self.torch.uint8)

    def encode(self, images, quality: int, upscale: int = 1) -> list[bytes]:
        pixels = self.uint8(images)
        if upscale > 1:
            pixels = pixels.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
        encoded = self.io.encode_jpeg(list(pixels.contiguous()), quality=max(1, quality))
        return [np.asarray(data.cpu()).tobytes() for data in encoded]
