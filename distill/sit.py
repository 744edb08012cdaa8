"""SiT checkpoints in their public layout (the SiT reference model: `x_embedder`, `t_embedder`,
`y_embedder`, `pos_embed`, `blocks.N.{attn,mlp,adaLN_modulation}`, `final_layer`) as our teachers.

`arch="sit"` in distill/nets.py is the same transformer in our convention: it feeds the network
1 - t and negates its output, since SiT's time runs from noise (0) to data (1) and it predicts x - eps.
The loader maps the public key names and shapes onto it: the patch embedding's convolution becomes a
linear map, and the final layer's outputs are reordered from SiT's (p, q, c) to our (c, p, q) per
patch, keeping the velocity channels (SiT's `learn_sigma` adds as many variance channels, unused).
So `flowmap distill --teacher sit:SiT-XL-2-256x256.pt` distils the official checkpoint. DiT's checkpoints share the
layout but predict DDPM noise over 1000 discrete steps: read this way they would load and be a wrong teacher.

Classifier-free guidance: SiT's null label is index `num_classes`, as ours. Its reference sampler
guides only the first three latent channels; ours guides all four, the standard way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.nets import NetConfig

# the public sizes: name -> (hidden size, depth, heads)
SIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def sit_config(size: str = "XL/2", latent: tuple[int, int, int] = (4, 32, 32), num_classes: int = 1000) -> NetConfig:
    """Our NetConfig of a public SiT size, e.g. "XL/2" on 4x32x32 latents (ImageNet 256 px)."""
    name, _, patch = size.partition("/")
    if name not in SIT_SIZES or not patch.isdigit():
        raise ValueError(f"unknown SiT size {size!r}; sizes are {', '.join(f'{n}/2' for n in SIT_SIZES)} (patch 2, 4 "
                         "or 8)")
    width, depth, heads = SIT_SIZES[name]
    return NetConfig(arch="sit", shape=latent, num_classes=num_classes, width=width, depth=depth, heads=heads,
                     patch=int(patch), mlp_ratio=4.0)


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a SiT/DiT checkpoint: a state dict, or a training checkpoint holding one under
    "ema" (preferred) or "model"; .pt/.pth or .safetensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("ema", "model", "state_dict"):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def config_of(state: dict[str, torch.Tensor]) -> NetConfig:
    """The architecture a public-layout state dict holds, read from its shapes."""
    try:
        patch_weight, pos = state["x_embedder.proj.weight"], state["pos_embed"]
        labels = state["y_embedder.embedding_table.weight"]
    except KeyError as err:
        raise ValueError(f"not a SiT/DiT checkpoint: it has no {err.args[0]!r} (expected the public layout: "
                         "x_embedder, t_embedder, y_embedder, pos_embed, blocks, final_layer)") from None
    width, channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[-1]
    grid = round(pos.shape[1] ** 0.5)
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    # heads are not in the weights: the public sizes have theirs, other widths get heads of 64 dims as DiT does
    heads = next((h for w, _, h in SIT_SIZES.values() if w == width), max(1, width // 64))
    return NetConfig(arch="sit", shape=(channels, grid * patch, grid * patch), num_classes=labels.shape[0] - 1,
                     width=width, depth=depth, heads=heads, patch=patch, mlp_ratio=state["blocks.0.mlp.fc1.weight"]
                     .shape[0] / width)


def to_flownet(state: dict[str, torch.Tensor], config: NetConfig) -> dict[str, torch.Tensor]:
    """Public SiT key names and shapes -> our FlowNet's state dict (arch="sit")."""
    channels, patch = config.shape[0], config.patch
    ours = {
        "patch_in.weight": state["x_embedder.proj.weight"].reshape(config.width, -1),
        "patch_in.bias": state["x_embedder.proj.bias"],
        "pos": state["pos_embed"],
        "y_embed.weight": state["y_embedder.embedding_table.weight"],
        "final.ada.1.weight": state["final_layer.adaLN_modulation.1.weight"],
        "final.ada.1.bias": state["final_layer.adaLN_modulation.1.bias"],
    }
    for index in (0, 2):
        for kind in ("weight", "bias"):
            ours[f"t_embed.mlp.{index}.{kind}"] = state[f"t_embedder.mlp.{index}.{kind}"]
    renames = {"attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2",
               "adaLN_modulation.1": "ada.1"}
    for block in range(config.depth):
        for theirs, mine in renames.items():
            for kind in ("weight", "bias"):
                ours[f"blocks.{block}.{mine}.{kind}"] = state[f"blocks.{block}.{theirs}.{kind}"]
    # SiT's output per patch token is ordered (p, q, c) over out_channels = c or 2c (learn_sigma);
    # ours is (c, p, q) over the c velocity channels.
    weight, bias = state["final_layer.linear.weight"], state["final_layer.linear.bias"]
    out_channels = weight.shape[0] // (patch * patch)
    order = torch.arange(patch * patch * out_channels).reshape(patch, patch, out_channels)[..., :channels]
    order = order.permute(2, 0, 1).reshape(-1)
    ours["final.linear.weight"], ours["final.linear.bias"] = weight[order], bias[order]
    return ours

