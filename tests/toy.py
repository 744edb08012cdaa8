"""The 2-D toy's network and the distance the distillation tests measure on it."""

import torch

from distill.nets import NetConfig

TOY_NET = NetConfig(arch="mlp", width=64, depth=2, mlp_ratio=2.0)
SW_BOUND = 0.06  # teacher@1 step sits at ~0.12-0.2, a trained 1-NFE student at ~0.03


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256) -> float:
    """SW-2 between equal-size 2-D sample sets, with fixed random directions."""
    directions = torch.randn(projections, a.shape[1], generator=torch.Generator().manual_seed(0))
    directions = directions / directions.norm(dim=1, keepdim=True)
    pa, pb = (a @ directions.T).sort(0).values, (b @ directions.T).sort(0).values
    return (pa - pb).pow(2).mean().sqrt().item()
