"""A VAE's decoder as a bundle graph: latent [B, c, h, w] -> image [B, 3, H, W] in [-1, 1].

The decoder of a diffusers autoencoder saved with `save_pretrained` (AutoencoderKL as Stable Diffusion,
SD3 and FLUX use it, AutoencoderTiny, AutoencoderDC as SANA uses it). The VAE's scaling and shift are
baked in, so the graph takes latents exactly as the denoiser produces them: diffusers encodes
z = (E(x) - shift) * scale, so the graph decodes D(z / scale + shift).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

# diffusers autoencoders whose decode(z).sample is an image in [-1, 1]
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny", "AutoencoderDC")
DECODER_PARITY_BATCHES = (1, 3)  # a real-size decoder costs seconds per image on a CPU
DECODER_TOLERANCE = 1e-3  # outputs of order 1, many more operations than a denoiser's step


def load_vae(folder: str | Path) -> nn.Module:
    """A diffusers autoencoder from a `save_pretrained` folder, frozen, in eval mode."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--decoder {folder}: no config.json; give the folder a diffusers autoencoder was saved "
                         "to (AutoencoderKL.save_pretrained(...), or the vae/ folder of a diffusers pipeline)")
    class_name = json.loads(config_path.read_text()).get("_class_name")
    if class_name not in VAE_CLASSES:
        raise ValueError(f"--decoder {folder}: a {class_name!r} is not a decoder we export; supported: "
                         f"{', '.join(VAE_CLASSES)}")
    import diffusers

    vae = getattr(diffusers, class_name).from_pretrained(folder, low_cpu_mem_usage=False,  # no accelerate warning
                                                         local_files_only=True)
    return vae.eval().requires_grad_(False)


def decoding_half(vae: nn.Module) -> nn.Module:
    """A shallow copy of `vae` without its encoder, which decoding never reads: a torch.export program keeps
    every parameter of the module it was traced from (SD-VAE's encoder is 34M of them), the ONNX file does not.
    The decoding submodules are `vae`'s own (moving the copy to a device moves them); its registries of
    children, parameters, buffers and hooks are its own, so `vae` keeps its encoder."""
    import copy

    view = copy.copy(vae)
    for key, value in vars(vae).items():
        if key.startswith("_") and isinstance(value, dict | set):
            view.__dict__[key] = copy.copy(value)
    for name in ("encoder", "quant_conv"):
        view._modules.pop(name, None)
    return view


class DecoderGraph(nn.Module):
    """latent -> image in [-1, 1], the VAE's scaling and shift inside."""

    input_names = ("latent",)
    output_name = "image"
    # onnxscript's optimizer (0.7) takes any constant within 1e-8 of zero for zero and drops `x + eps`:
    # SANA's AutoencoderDC divides by `sum + 1e-15` and the graph then makes 0/0 = NaN. diffusers code
    # is not ours to vet op by op, so its graphs skip that pass (onnxruntime and TensorRT optimise anyway).
    onnx_optimize = False

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = decoding_half(vae)
        self.scale = float(getattr(vae.config, "scaling_factor", None) or 1.0)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, latent):
        return self.vae.decode(latent / self.scale + self.shift).sample.clamp(-1, 1)

    @torch.no_grad()
    def image_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The image a latent of `latent_shape` decodes to (one trial decode)."""
        return tuple(self(torch.zeros((1, *latent_shape))).shape[1:])
