"""A tiny latent bundle for tests: random diffusers VAEs written with save_pretrained, a teacher and a
FreeFlow student on 4x4x4 latents, a verifier on the 3x8x8 images the decoder makes of them."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.data import Dataset

LATENT, IMAGE, CLASSES = (4, 4, 4), (3, 8, 8), ["a", "b", "c"]
VAE_KINDS = ("AutoencoderKL", "AutoencoderTiny", "AutoencoderDC")


def tiny_vae(kind: str, folder: Path) -> Path:
    import diffusers

    torch.manual_seed(0)
    if kind == "AutoencoderKL":
        vae = diffusers.AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                                      up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
                                      scaling_factor=0.5, shift_factor=0.1)
    elif kind == "AutoencoderDC":  # SANA's: linear attention, whose `+ 1e-15` the exporter must keep
        vae = diffusers.AutoencoderDC(
            latent_channels=4, attention_head_dim=4, encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
            decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), scaling_factor=0.41)
    else:
        vae = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    vae.save_pretrained(folder)
    return folder


def random_data(shape, count=96, seed=0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset("random", torch.rand((count, *shape), generator=generator) * 2 - 1,
                   torch.arange(count) % len(CLASSES), CLASSES)


def build_latent_bundle(root: Path) -> tuple[Path, Path, dict[str, Path]]:
    """(bundle folder, training runs, VAE folders by class name) under `root`."""
    from distill.freeflow import FreeFlowConfig
    from distill.nets import NetConfig
    from distill.pipeline import distill_student, train_teacher, train_verifier
    from distill.teacher import TeacherConfig
    from distill.trainer import TrainConfig
    from distill.verifier import VerifierConfig
    from export.writer import export_bundle

    vaes = {kind: tiny_vae(kind, root / "vaes" / kind) for kind in VAE_KINDS}
    runs = root / "runs"
    quick = TrainConfig(steps=3, batch_size=16, lr=1e-2, ema_decay=0.0)
    net = NetConfig(arch="mlp", width=32, depth=1, mlp_ratio=2.0)
    train_teacher(random_data(LATENT), net, TeacherConfig(), quick, runs / "teacher", progress=False)
    train_verifier(random_data(IMAGE, seed=1), VerifierConfig(width=8, feature_dim=16), quick, runs / "verifier",
                   progress=False)
    distill_student("freeflow", str(runs / "teacher"), FreeFlowConfig(), quick, runs / "freeflow", progress=False,
                    data=random_data(LATENT))
    out = root / "latent"
    export_bundle(runs / "freeflow", str(runs / "teacher"), runs / "verifier", out, (1.5,), progress=False,
                  decoder=vaes["AutoencoderKL"], programs=True)  # programs: the torch backend too
    return out, runs, vaes
