"""DMD2: distribution matching with a fake velocity network (docs/methods.md §6), the baseline.

A fake flow g_ψ (initialised from the teacher) tracks the generator's samples by flow matching,
k updates per generator update (TTUR); x̂_fake = x_t - t g_ψ(x_t, t). Backward simulation runs the
M-step sampler and re-noises each intermediate prediction with fresh noise, as DMD2 does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.flow import (
    bcast,
    check_guidance_scale,
    guided_velocity,
    interpolate,
    null_condition,
    prior_batch,
    time_grid,
)
from distill.losses import dmd_loss
from distill.models import FakeFlow
from distill.trainer import Setup


@dataclass
class DMD2Config:
    ttur: int = 5  # fake-flow updates per generator update
    sim_steps: int = 1  # M of the backward simulation
    dm_guidance_scale: float = 1.5  # guidance of the real side of the DMD term

    def __post_init__(self) -> None:
        check_guidance_scale("dm_guidance_scale", self.dm_guidance_scale)


def simulate(student, z, label, w, steps: int, generator) -> torch.Tensor:
    """M-step generation that re-noises: x̂₀ = f(x, τ_i, 0), then x = (1 - τ_{i+1}) x̂₀ + τ_{i+1} n_fresh;
    the gradient flows through the last jump only."""
    grid, x = time_grid(steps, z.device), z
    ones = torch.ones(z.shape[0], device=z.device)
    for i in range(steps):
        last = i == steps - 1
        with torch.set_grad_enabled(last and torch.is_grad_enabled()):
            x0 = student.jump(x.detach(), ones * float(grid[i]), ones * 0.0, label, w)
        if last:
            return x0
        fresh = torch.randn(z.shape, generator=generator).to(z)
        x = interpolate(x0.detach(), fresh, ones * float(grid[i + 1]))
    return x


class DMD2:
    """Trainer method: `ttur` fake-flow updates on fresh detached samples, then one DMD generator update."""

    ema_name = "student"

    def __init__(self, setup: Setup):
        self.trainable = {"student": setup.student, "fake": FakeFlow.from_teacher(setup.teacher)}
        self.teacher, self.shape, self.config = setup.teacher, setup.shape, setup.config
        self.batch_size, self.device = setup.batch_size, torch.device(setup.device)
        self.fake_updates = 0  # counted for the TTUR test

    def _conditions(self, generator):
        batch = self.batch_size
        z, label = prior_batch(batch, self.shape, self.teacher, generator, self.device)
        return z, label, torch.full((batch,), self.config.dm_guidance_scale, device=self.device)

    def losses(self, generator, logs):
        student, fake = self.trainable["student"], self.trainable["fake"]
        for _ in range(self.config.ttur):
            z, label, w = self._conditions(generator)
            with torch.no_grad():
                x0 = simulate(student, z, label, w, self.config.sim_steps, generator)
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            t = torch.rand(x0.shape[0], generator=generator).to(x0)
            fake_loss = F.mse_loss(fake.velocity(interpolate(x0, noise, t), t, label, w), noise - x0)
            logs["fake"] = fake_loss.item()
            self.fake_updates += 1
            yield "fake", fake_loss
        z, label, w = self._conditions(generator)
        x0 = simulate(student, z, label, w, self.config.sim_steps, generator)
        t = torch.rand(x0.shape[0], generator=generator).clamp(min=1e-3).to(x0)
        x_t = interpolate(x0.detach(), torch.randn(x0.shape, generator=generator).to(x0), t)
        with torch.no_grad():
            real = x_t - bcast(t, x_t) * guided_velocity(self.teacher.velocity, x_t, t, label, w,
                                                        null_condition(self.teacher, label))
            fake_denoised = x_t - bcast(t, x_t) * fake.velocity(x_t, t, label, w)
        loss = dmd_loss(x0, real, fake_denoised)
        logs["dm"] = loss.item()
        yield "student", loss
