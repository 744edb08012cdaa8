"""What `flowmap bench gpu` times: the random-weight stages at their real (or toy) sizes, the modes the torch
serving engine runs them in, and the FLOPs a GPU spends on one image of each (for MFU).

SiT-XL/2 on 4x32x32 latents and the SD-VAE decoder (256 px); SANA-600M's transformer shape on 32x32x32 DC-AE
latents with 300 text tokens and SANA's DC-AE decoder (1024 px).
"""

from __future__ import annotations

MODES = {  # name -> the torch engine's options (server/torch_engine.py's TorchOptions) beside device and cache
    "eager-fp32": {"dtype": "float32"},
    "eager-bf16": {"dtype": "bfloat16"},
    # eager kernels replayed as hand-captured CUDA graphs (what serving uses)
    "graphs-bf16": {"dtype": "bfloat16", "cuda_graphs": True},
    "compiled-bf16": {"dtype": "bfloat16", "compile": True},
    "compiled-graphs-bf16": {"dtype": "bfloat16", "compile": True, "cuda_graphs": True},  # "reduce-overhead"
    # each bucket compiled static with inductor's tuned matrix products, CUDA graphs: "max-autotune"
    "autotuned-graphs-bf16": {"dtype": "bfloat16", "compile": True, "cuda_graphs": True,
                              "compile_mode": "max-autotune"},
}

# in the order a run cut off by its time limit would want them: the goals' denoisers first
MODELS = ("sit-xl/2", "sana-1024", "sd-vae-256", "dc-ae-1024")
DECODERS = ("sd-vae-256", "dc-ae-1024")  # the rest are denoisers (judged on MFU)
# one-step text-to-image at 1024 px, (denoiser, decoder): set beside SANA-Sprint's figure
ONE_STEP = ("sana-1024", "dc-ae-1024")


def model(name: str, scale: str):
    """(graph module, inputs for batch b): the random-weight stage at its real or toy size."""
    import torch

    from export.onnx_export import TeacherGraph

    tiny = scale == "tiny"
    if name.startswith("sit"):
        from distill.models import Teacher
        from distill.sit import sit_config

        latent = (4, 8, 8) if tiny else (4, 32, 32)
        graph = TeacherGraph(Teacher(sit_config("S/2" if tiny else "XL/2", latent)), 1.0)
        with torch.no_grad():  # adaLN-Zero starts at zero: random there too, or outputs (and parity) are zero
            for parameter in graph.parameters():
                if not parameter.any():
                    parameter.normal_(0, 0.02)
        return graph, lambda batch: {"x": torch.randn(batch, *latent), "t": torch.rand(batch),
                                     "label": torch.randint(0, 1000, (batch,))}
    if name in DECODERS:
        from export.decoder import DecoderGraph

        make_vae, channels = (sd_vae, 4) if name.startswith("sd-vae") else (dc_ae, 32)
        side = 8 if tiny else 32
        return DecoderGraph(make_vae(tiny).eval()), lambda batch: {"latent": torch.randn(batch, channels, side, side)}
    return sana_graph(tiny)


def sd_vae(tiny: bool):
    """Stable Diffusion's AutoencoderKL (8x: 4x32x32 latents -> 256 px), or a toy one of the same kind."""
    import diffusers

    channels = [32, 32] if tiny else [128, 256, 512, 512]
    return diffusers.AutoencoderKL(block_out_channels=channels, layers_per_block=1 if tiny else 2,
                                   down_block_types=["DownEncoderBlock2D"] * len(channels),
                                   up_block_types=["UpDecoderBlock2D"] * len(channels), latent_channels=4,
                                   norm_num_groups=32, scaling_factor=0.18215)


def dc_ae(tiny: bool):
    """SANA 1.0's DC-AE (f32c32: 32x32x32 latents -> 1024 px; ResBlocks, then EfficientViT blocks with 5x5
    multi-scale linear attention), or a toy one of the same kind."""
    import diffusers

    channels, layers = ((16, 32), (1, 1)) if tiny else ((128, 256, 512, 512, 1024, 1024), (3,) * 6)
    kinds = ("ResBlock",) * (len(channels) // 2) + ("EfficientViTBlock",) * (len(channels) - len(channels) // 2)
    scales = tuple(() if kind == "ResBlock" else (5,) for kind in kinds)
    return diffusers.AutoencoderDC(
        latent_channels=32, attention_head_dim=8 if tiny else 32, encoder_block_types=kinds,
        decoder_block_types=kinds, encoder_block_out_channels=channels, decoder_block_out_channels=channels,
        encoder_layers_per_block=(1, 1) if tiny else (2, 2, 2, 3, 3, 3), decoder_layers_per_block=layers,
        encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales, downsample_block_type="conv",
        upsample_block_type="interpolate", scaling_factor=0.41407)


def sana_graph(tiny: bool):
    """SANA-600M's transformer shape (28 layers, width 1152, Gemma-2B text width 2304) on the 32x32x32
    latents of a 1024 px DC-AE, conditioned on 300 tokens; as one velocity call."""
    import diffusers
    import torch

    layers, heads, head, text, tokens, latent = (1, 2, 16, 64, 8, (32, 4, 4)) if tiny else (
        28, 16, 72, 2304, 300, (32, 32, 32))
    transformer = diffusers.SanaTransformer2DModel(
        in_channels=latent[0], out_channels=latent[0], num_attention_heads=heads, attention_head_dim=head,
        num_layers=layers, num_cross_attention_heads=heads, cross_attention_head_dim=head,
        cross_attention_dim=heads * head, caption_channels=text, sample_size=latent[1], patch_size=1).eval()

    class SanaVelocity(torch.nn.Module):
        input_names, output_name = ("x", "t", "label"), "velocity"

        def __init__(self):
            super().__init__()
            self.transformer = transformer

        def forward(self, x, t, label):
            return self.transformer(x, encoder_hidden_states=label, timestep=t * 1000, return_dict=False)[0]

    return SanaVelocity(), lambda batch: {"x": torch.randn(batch, *latent), "t": torch.rand(batch),
                                          "label": torch.randn(batch, tokens, text)}


def flops_per_image(graph, inputs) -> float:
    """Floating-point operations of one image's forward (torch's FLOP counter, batch 1), counted on the meta
    device: nothing is computed, and attention counts as a GPU runs it (the CPU's fused attention kernel has no
    FLOP formula, so a count on the CPU left SANA's cross-attention out). Moves `graph` to meta for good."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        graph.to("meta")(*(value.to("meta") for value in inputs(1).values()))
    return float(counter.get_total_flops())
