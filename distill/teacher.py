"""Teacher training by conditional flow matching (docs/methods.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.data import Dataset
from distill.flow import drop_condition, interpolate, logit_normal, null_condition
from distill.models import Teacher


@dataclass
class TeacherConfig:
    label_dropout: float = 0.1  # probability of the null label, so the teacher supports guidance
    time_sampling: str = "logit_normal"  # or "uniform"
    time_mean: float = 0.0  # logit-normal t: location ...
    time_std: float = 1.0  # ... and spread

    def __post_init__(self) -> None:
        if self.time_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"time_sampling must be 'logit_normal' or 'uniform', got {self.time_sampling!r}")


def flow_matching_loss(teacher: Teacher, x: torch.Tensor, label: torch.Tensor, config: TeacherConfig,
                       generator: torch.Generator) -> torch.Tensor:
    """L = E |u(x_t, t, c~) - (eps - x)|^2 with c~ = null with probability `label_dropout`."""
    batch = x.shape[0]
    eps = torch.randn(x.shape, generator=generator).to(x)
    if config.time_sampling == "uniform":
        t = torch.rand(batch, generator=generator)
    else:
        t = logit_normal(batch, config.time_mean, config.time_std, generator)
    t = t.to(x)
    drop = torch.rand(batch, generator=generator).to(x.device) < config.label_dropout
    label = drop_condition(label, drop, null_condition(teacher, label))
    return F.mse_loss(teacher.velocity(interpolate(x, eps, t), t, label), eps - x)


class TeacherTraining:
    """Trainer method: one flow-matching update of the teacher per step."""

    ema_name = "teacher"

    def __init__(self, teacher: Teacher, data: Dataset, config: TeacherConfig, batch_size: int, device="cpu"):
        self.trainable = {"teacher": teacher}
        self.data, self.config, self.batch_size, self.device = data, config, batch_size, device

    def losses(self, generator, logs):
        x, label = self.data.batch(self.batch_size, generator)
        loss = flow_matching_loss(self.trainable["teacher"], x.to(self.device), label.to(self.device),
                                  self.config, generator)
        logs["loss"] = loss.item()
        yield "teacher", loss
