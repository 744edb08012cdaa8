"""Losses more than one method uses.

The DMD surrogate (docs/methods.md §4, §6): FSF-DMD's fake side is the EMA generator's own jump,
DMD2's a fake velocity network, and both move the generator's samples along the same gradient.
"""

from __future__ import annotations

import torch

from distill.flow import bcast


def dmd_loss(x0: torch.Tensor, denoised_real: torch.Tensor, denoised_fake: torch.Tensor) -> torch.Tensor:
    """L = ½|x0 - sg(x0 - g)|², g = (x̂_fake - x̂_real) / mean|x0 - x̂_real| per sample."""
    assert not (denoised_real.requires_grad or denoised_fake.requires_grad), "denoisers must be stop-gradient"
    norm = (x0.detach() - denoised_real).abs().flatten(1).mean(1)
    grad = (denoised_fake - denoised_real) / bcast(norm + 1e-6, x0)
    return 0.5 * (x0 - (x0 - grad).detach()).pow(2).flatten(1).mean(1).mean()
