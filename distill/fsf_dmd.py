"""FSF-DMD: distribution matching without a fake-score network (docs/methods.md §4).

The fake side of DMD is the generator's own EMA jump to data, x̂_fake = f_ema(x_t, t, 0): under the
generator's ODE coupling the endpoint posterior collapses to a point. No fake network, no TTUR.
The DMD term rides on consistency distillation (§2), which keeps the flow-map structure the
surrogate relies on. The self-teacher variant needs no teacher at all: consistency *training* on data
and the EMA's own guided instantaneous velocity as the real side.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from distill.flow import (
    bcast,
    check_guidance_scale,
    drop_condition,
    flow_map,
    guided_velocity,
    interpolate,
    null_condition,
    prior_batch,
    time_grid,
)
from distill.losses import dmd_loss
from distill.meanflow import MeanFlowConfig, consistency_batch, meanflow_loss
from distill.trainer import Setup, ema_update


@dataclass
class FSFDMDConfig(MeanFlowConfig):
    # The defaults below are the setting that works on digits; docs/fsf_dmd_study.md measures each choice
    # against consistency distillation continued for the same wall time from the same flow map.
    # M: jumps of the flow-map-consistent backward simulation. With M = 2 the DMD gradient reaches only
    # the last jump, so it cannot spoil the 1-NFE map; M = 1 gave the best 2-NFE FD but wrecked 1-NFE.
    sim_steps: int = 2
    # σ: t <- σt / (1 + (σ - 1)t). σ < 1 weights low noise; on the toy σ = 0.5 kept the DMD term from
    # hurting 1-NFE, on digits it made no measurable difference against σ = 1.
    time_shift: float = 0.5
    lambda_dm: float = 0.05  # weight of the DMD term next to CD; 0.2 hurt both 1- and 2-NFE on digits
    # The fake side stays close to the flow map the DMD phase started from, as the paper's 0.99995 does
    # (0.995 measured the same on digits within noise; a slow EMA is the safer default).
    fake_ema_decay: float = 0.9999
    # Consistency distillation alone before the DMD term starts, for runs that begin at the teacher; at
    # the switch the fake side is reset to the warmed-up flow map (a slow EMA would still be mostly the
    # teacher's one Euler step). Starting from a trained flow map (--init) needs none.
    warmup_steps: int = 0
    self_teacher: bool = False  # train without a teacher (consistency training + own guided velocity)
    label_dropout: float = 0.1  # self-teacher: null labels so the network can guide itself
    dm_guidance_scale: float = 1.5  # guidance of the DMD term (fixed, as the paper does)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_guidance_scale("dm_guidance_scale", self.dm_guidance_scale)
        if self.sim_steps < 1:
            raise ValueError(f"sim_steps must be >= 1, got {self.sim_steps}")
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")


def shift_time(t: torch.Tensor, sigma: float) -> torch.Tensor:
    return sigma * t / (1 + (sigma - 1) * t)


def rollout(student, z, label, w, steps: int) -> torch.Tensor:
    """Flow-map-consistent backward simulation: M jumps on the sampling grid, gradient through the last."""
    grid, x = time_grid(steps, z.device), z
    for i in range(steps):
        t = torch.full((z.shape[0],), float(grid[i]), device=z.device)
        s = torch.full_like(t, float(grid[i + 1]))
        if i < steps - 1:
            with torch.no_grad():
                x = flow_map(student.average_velocity, x, t, s, label, w)
        else:
            x = flow_map(student.average_velocity, x.detach(), t, s, label, w)
    return x


class FSFDMD:
    """Trainer method: L = L_CD + λ_DM L_DM, the fake side from an EMA copy of the generator."""

    ema_name = "student"

    def __init__(self, setup: Setup):
        if setup.teacher is None and not setup.config.self_teacher:
            raise ValueError("FSF-DMD needs a teacher unless --self-teacher is set")
        self.trainable = {"student": setup.student}
        # Not trained by gradient and not the result: the EMA whose jump is the fake denoiser.
        self.state = {"fake_ema": copy.deepcopy(setup.student).requires_grad_(False)}
        self.teacher, self.data, self.config = setup.teacher, setup.data, setup.config
        # what knows the null condition and draws conditions: the teacher, or the student when self-taught
        self.conditioned = setup.teacher if setup.teacher is not None else setup.student
        self.batch_size, self.device, self.step = setup.batch_size, torch.device(setup.device), 0

    def real_velocity(self, x, t, label, w):
        if self.config.self_teacher:  # the EMA's own instantaneous velocity F(x, t, t), guided
            ema = self.state["fake_ema"]
            return guided_velocity(lambda xx, tt, cc: ema.average_velocity(xx, tt, tt, cc, torch.cat([w, w])),
                                   x, t, label, w, null_condition(self.conditioned, label))
        return guided_velocity(self.teacher.velocity, x, t, label, w, null_condition(self.conditioned, label))

    def consistency_loss(self, generator, logs):
        config, batch = self.config, self.batch_size
        x, label, eps, t, s, w, x_t = consistency_batch(self.data, config, batch, generator, self.device)
        if config.self_teacher:  # consistency training: the conditional velocity, some labels dropped
            drop = torch.rand(batch, generator=generator).to(self.device) < config.label_dropout
            label = drop_condition(label, drop, null_condition(self.conditioned, label))
            u_star = eps - x
        else:
            with torch.no_grad():
                u_star = guided_velocity(self.teacher.velocity, x_t, t, label, w,
                                         null_condition(self.conditioned, label))
        loss, mse = meanflow_loss(self.trainable["student"], u_star, x_t, t, s, label, w, config)
        logs["cd_mse"] = mse
        return loss

    def distribution_loss(self, generator, logs):
        config, batch = self.config, self.batch_size
        z, label = prior_batch(batch, self.data.shape, self.conditioned, generator, self.device)
        w = torch.full((batch,), config.dm_guidance_scale, device=self.device)
        x0 = rollout(self.trainable["student"], z, label, w, config.sim_steps)
        t = shift_time(torch.rand(batch, generator=generator), config.time_shift).clamp(1e-3, 1.0).to(z)
        x_t = interpolate(x0.detach(), torch.randn(z.shape, generator=generator).to(z), t)
        with torch.no_grad():
            real = x_t - bcast(t, x_t) * self.real_velocity(x_t, t, label, w)
            fake = self.state["fake_ema"].jump(x_t, t, torch.zeros_like(t), label, w)
        loss = dmd_loss(x0, real, fake)
        logs["dm"] = loss.item()
        return loss

    def losses(self, generator, logs):
        student, fake_ema = self.trainable["student"], self.state["fake_ema"]
        distribution_phase = self.step >= self.config.warmup_steps and self.config.lambda_dm > 0
        with torch.no_grad():
            if self.step == self.config.warmup_steps > 0:  # the DMD phase begins from the warmed-up flow map
                fake_ema.load_state_dict(student.state_dict())
            elif distribution_phase:
                ema_update(fake_ema, student, self.config.fake_ema_decay)
        loss = self.consistency_loss(generator, logs)
        if distribution_phase:
            loss = loss + self.config.lambda_dm * self.distribution_loss(generator, logs)
        yield "student", loss
