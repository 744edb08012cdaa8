"""FGM: flow generator matching, one step (docs/methods.md §5). Data-free.

An online flow v_ψ learns the generator's flow on detached samples; the generator then follows
L₂ = E[2 (u_w(x_t) - v_ψ(x_t)) · (v_ψ(x_t) - (n - x₀))] with ψ frozen but gradients flowing through
x₀ and x_t = (1 - t) x₀ + t n into every term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.flow import (
    check_guidance_range,
    draw_guidance_scales,
    guided_velocity,
    interpolate,
    null_condition,
    prior_batch,
)
from distill.models import FakeFlow
from distill.trainer import Setup


@dataclass
class FGMConfig:
    guidance_min: float = 1.0  # guidance scales the student is trained over: from guidance_min ...
    guidance_max: float = 2.0  # ... to guidance_max, uniformly
    t_min: float = 0.02  # the teacher's velocity is stiff near t = 0; the paper samples t away from it

    def __post_init__(self) -> None:
        check_guidance_range(self.guidance_min, self.guidance_max)


def fgm_generator_loss(teacher, fake, x0, noise, t, label, w) -> torch.Tensor:
    """L₂ with the online flow's weights frozen; x₀ carries the generator's graph."""
    x_t = interpolate(x0, noise, t)
    u = guided_velocity(teacher.velocity, x_t, t, label, w, null_condition(teacher, label))
    fake.requires_grad_(False)  # ψ is a constant here: gradients reach only the generator, through x₀
    try:
        v = fake.velocity(x_t, t, label, w)
    finally:
        fake.requires_grad_(True)
    return (2 * (u - v) * (v - (noise - x0))).flatten(1).mean(1).mean()


class FGM:
    """Trainer method: one flow-matching update of v_ψ on sg(x₀), then one generator update."""

    ema_name = "student"

    def __init__(self, setup: Setup):
        self.trainable = {"student": setup.student, "fake": FakeFlow.from_teacher(setup.teacher)}
        self.teacher, self.shape, self.config = setup.teacher, setup.shape, setup.config
        self.batch_size, self.device = setup.batch_size, torch.device(setup.device)

    def _draw(self, generator):
        batch = self.batch_size
        noise = torch.randn((batch, *self.shape), generator=generator).to(self.device)
        t = (self.config.t_min + (1 - self.config.t_min) * torch.rand(batch, generator=generator)).to(self.device)
        return noise, t

    def losses(self, generator, logs):
        config, batch = self.config, self.batch_size
        student, fake = self.trainable["student"], self.trainable["fake"]
        z, label = prior_batch(batch, self.shape, self.teacher, generator, self.device)
        w = draw_guidance_scales(batch, config.guidance_min, config.guidance_max, generator).to(self.device)
        one, zero = torch.ones(batch, device=self.device), torch.zeros(batch, device=self.device)
        x0 = student.jump(z, one, zero, label, w)
        noise, t = self._draw(generator)
        fake_loss = F.mse_loss(fake.velocity(interpolate(x0.detach(), noise, t), t, label, w), noise - x0.detach())
        logs["fake"] = fake_loss.item()
        yield "fake", fake_loss
        noise, t = self._draw(generator)
        loss = fgm_generator_loss(self.teacher, fake, x0, noise, t, label, w)
        logs["fgm"] = loss.item()
        yield "student", loss
