"""A small classifier trained on the same data: evaluation features and Best-of-N scores."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill.checkpoint import load_checkpoint, module_state
from distill.data import Dataset


@dataclass
class VerifierConfig:
    width: int = 32  # channels of the first convolution (doubled after)
    feature_dim: int = 128  # size of the feature vector FD and precision/recall use
    noise_std: float = 0.1  # augmentation: generated samples are never exactly on the data manifold
    max_shift: int = 1  # augmentation: random translation in pixels (images only)
    val_fraction: float = 0.15  # held out to report accuracy


class Verifier(nn.Module):
    """logits = head(features(x)); the penultimate `features` are what FD and precision/recall use."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, config: VerifierConfig | None = None):
        super().__init__()
        config = config or VerifierConfig()
        self.shape, self.num_classes = tuple(shape), num_classes
        if len(self.shape) == 3:
            channels, height, width = self.shape
            self.body = nn.Sequential(
                nn.Conv2d(channels, config.width, 3, padding=1), nn.SiLU(),
                nn.Conv2d(config.width, 2 * config.width, 3, padding=1, stride=2), nn.SiLU(),
                nn.Conv2d(2 * config.width, 2 * config.width, 3, padding=1), nn.SiLU(),
                nn.Flatten(),
                nn.Linear(2 * config.width * math.ceil(height / 2) * math.ceil(width / 2), config.feature_dim),
                nn.SiLU(),
            )
        else:
            self.body = nn.Sequential(
                nn.Flatten(), nn.Linear(math.prod(self.shape), 4 * config.width), nn.SiLU(),
                nn.Linear(4 * config.width, config.feature_dim), nn.SiLU(),
            )
        self.head = nn.Linear(config.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def split(data: Dataset, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train / validation index split."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(data)))
    return order[n_val:], order[:n_val]


def augment(x: torch.Tensor, config: VerifierConfig, generator: torch.Generator) -> torch.Tensor:
    if x.dim() == 4 and config.max_shift:
        shifts = torch.randint(-config.max_shift, config.max_shift + 1, (2,), generator=generator).tolist()
        padded = F.pad(x, [config.max_shift] * 4, value=-1.0)
        top, left = config.max_shift + shifts[0], config.max_shift + shifts[1]
        x = padded[..., top:top + x.shape[-2], left:left + x.shape[-1]]
    return x + config.noise_std * torch.randn(x.shape, generator=generator)


class VerifierTraining:
    """Trainer method: cross-entropy on the training split with light augmentation."""

    ema_name = "verifier"

    def __init__(self, verifier: Verifier, data: Dataset, config: VerifierConfig, batch_size: int):
        self.trainable = {"verifier": verifier}
        self.data, self.config, self.batch_size = data, config, batch_size
        self.train_index, _ = split(data, config.val_fraction)

    def losses(self, generator, logs):
        pick = self.train_index[torch.randint(0, len(self.train_index), (self.batch_size,), generator=generator)]
        x = augment(self.data.samples[pick], self.config, generator)
        loss = F.cross_entropy(self.trainable["verifier"](x), self.data.labels[pick])
        logs["loss"] = loss.item()
        yield "verifier", loss


@torch.no_grad()
def accuracy(verifier: Verifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    return (verifier(x).argmax(-1) == labels).float().mean().item()


def load_verifier(run_dir: str | Path, device: str = "cpu") -> Verifier:
    """The verifier of a run directory, from its EMA weights, frozen and in eval mode."""
    meta, tensors = load_checkpoint(run_dir, kind="verifier")
    verifier = Verifier(tuple(meta["data"]["shape"]), len(meta["data"]["classes"]), VerifierConfig(**meta["verifier"]))
    verifier.load_state_dict(module_state(tensors, "ema"))
    return verifier.to(device).eval().requires_grad_(False)
