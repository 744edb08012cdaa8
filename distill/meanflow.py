"""MeanFlow / consistency distillation (docs/methods.md §2): uses data.

On a data point's interpolant x_t, the teacher gives u* = u_w(x_t, t); the MeanFlow identity
F(x_t, t, s) = u* - (t - s) dF/dt, with dF/dt the total derivative along the teacher's flow
(tangents (u*, 1, 0) on (x, t, s)), is the regression target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.flow import (
    bcast,
    check_guidance_range,
    draw_guidance_scales,
    guided_velocity,
    interpolate,
    jvp,
    logit_normal,
    null_condition,
)
from distill.trainer import Setup


@dataclass
class MeanFlowConfig:
    derivative: str = "jvp"  # "jvp" or "fd" (central difference along the flow)
    fd_step: float = 1e-3  # step of the central difference (derivative fd)
    equal_fraction: float = 0.25  # share of the batch with s = t (plain flow matching on the teacher)
    time_sampling: str = "uniform"  # "uniform" or "logit_normal" for the pair (t, s)
    time_mean: float = -0.4  # logit-normal only
    time_std: float = 1.0  # logit-normal only: spread
    endpoint_fraction: float = 0.0  # share of the batch forced to the 1-NFE jump (t, s) = (1, 0)
    # p in the weight 1 / sg(err + 0.01)^p, err the mean square over a sample's elements. The paper's p = 1
    # leaves the rare long jumps with almost no weight; p = 0.5 (pseudo-Huber-like) learned the 1-NFE map on
    # the toy (SW 0.03 vs 0.08).
    adaptive_power: float = 0.5
    guidance_min: float = 1.0  # guidance scales the student is trained over: from guidance_min ...
    guidance_max: float = 2.0  # ... to guidance_max, uniformly

    def __post_init__(self) -> None:
        if self.time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {self.time_sampling!r}")
        if self.equal_fraction + self.endpoint_fraction > 1:
            raise ValueError("equal_fraction + endpoint_fraction must not exceed 1")
        if self.derivative not in ("jvp", "fd"):
            raise ValueError(f"derivative must be 'jvp' or 'fd', got {self.derivative!r}")
        check_guidance_range(self.guidance_min, self.guidance_max)


def total_derivative(student, x, t, s, label, w, direction, derivative: str, fd_step: float):
    """(F(x, t, s) with its graph, sg(dF/dt)) along x' = direction, t' = 1, s' = 0."""
    def average_velocity(x_in, t_in):
        return student.average_velocity(x_in, t_in, s, label, w)

    if derivative == "jvp":
        F, dF = jvp(average_velocity, (x, t), (direction, torch.ones_like(t)))
        return F, dF.detach()
    F = average_velocity(x, t)
    with torch.no_grad():
        ahead = average_velocity(x + fd_step * direction, t + fd_step)
        behind = average_velocity(x - fd_step * direction, t - fd_step)
    return F, (ahead - behind) / (2 * fd_step)


def meanflow_loss(student, velocity_target, x_t, t, s, label, w, config: MeanFlowConfig) -> tuple[torch.Tensor, float]:
    """L = w_adapt err, err = |F - sg(u* - (t - s) dF/dt)|^2 / d (a per-sample mean) with u* = `velocity_target`
    (detached)."""
    assert not velocity_target.requires_grad, "the teacher's velocity must be a stop-gradient target"
    F, dF_dt = total_derivative(student, x_t, t, s, label, w, velocity_target, config.derivative, config.fd_step)
    target = velocity_target - bcast(t - s, x_t) * dF_dt
    err = (F - target).flatten(1).pow(2).mean(1)
    weight = (err.detach() + 0.01) ** -config.adaptive_power
    return (weight * err).mean(), err.mean().item()


def sample_times(batch: int, config: MeanFlowConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """t >= s: two draws sorted; a fraction of the batch has s = t, another the full jump (1, 0)."""
    if config.time_sampling == "uniform":
        a, b = torch.rand(batch, generator=generator), torch.rand(batch, generator=generator)
    else:
        a = logit_normal(batch, config.time_mean, config.time_std, generator)
        b = logit_normal(batch, config.time_mean, config.time_std, generator)
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    pick = torch.rand(batch, generator=generator)
    s = torch.where(pick < config.equal_fraction, t, s)
    endpoint = pick > 1 - config.endpoint_fraction
    return torch.where(endpoint, 1.0, t), torch.where(endpoint, 0.0, s)


def consistency_batch(data, config: MeanFlowConfig, batch: int, generator: torch.Generator, device):
    """(x, label, eps, t, s, w, x_t): a data batch on its interpolant, with times and guidance scales."""
    x, label = (v.to(device) for v in data.batch(batch, generator))
    eps = torch.randn(x.shape, generator=generator).to(x)
    t, s = (v.to(x) for v in sample_times(batch, config, generator))
    w = draw_guidance_scales(batch, config.guidance_min, config.guidance_max, generator).to(x)
    return x, label, eps, t, s, w, interpolate(x, eps, t)


class MeanFlow:
    """Trainer method: consistency distillation on data with the guided teacher as u*."""

    ema_name = "student"

    def __init__(self, setup: Setup):
        self.trainable = {"student": setup.student}
        self.teacher, self.data, self.config = setup.teacher, setup.data, setup.config
        self.batch_size, self.device = setup.batch_size, torch.device(setup.device)

    def losses(self, generator, logs):
        config = self.config
        x, label, eps, t, s, w, x_t = consistency_batch(self.data, config, self.batch_size, generator, self.device)
        with torch.no_grad():
            u_star = guided_velocity(self.teacher.velocity, x_t, t, label, w, null_condition(self.teacher, label))
        loss, mse = meanflow_loss(self.trainable["student"], u_star, x_t, t, s, label, w, config)
        logs["cd_mse"] = mse
        yield "student", loss
