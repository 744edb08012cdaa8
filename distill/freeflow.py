"""FreeFlow: data-free flow-map distillation by prediction and correction (docs/methods.md §3).

Only prior samples z ~ N(0, I) are used. The prediction aligns the student's generating velocity
v_G = F + δ ∂_δF with the teacher at the student's own state x(δ) = f(z, 1, 1 - δ); the correction
aligns the noising velocity of the student's samples (learnt online by a fake flow) with the
teacher's. Both are written through their gradients: L = F · sg(weighted difference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.flow import (
    bcast,
    check_guidance_range,
    draw_guidance_scales,
    guided_velocity,
    interpolate,
    jvp,
    logit_normal,
    null_condition,
    prior_batch,
)
from distill.models import FakeFlow
from distill.trainer import Setup


@dataclass
class FreeFlowConfig:
    time: str = "discrete"  # "discrete": N-interval grid (App. A.1); "continuous": δ ∈ (0, 1)
    intervals: int = 8  # N for the discrete grid; the prediction never queries the teacher below t = 1/N
    derivative: str = "fd"  # continuous time only: "jvp" (forward-mode AD) or "fd" (central difference)
    fd_step: float = 1e-3  # step of the central difference (derivative fd)
    pred_fraction: float = 0.75  # the rest of the batch goes to the correction
    weight_power: float = 1.0  # k in w_G = 1 / (|Δ_G|^2 / d + 1e-4)^k
    alpha: float = 1.0  # correction strength relative to the (weighted) prediction gradient
    delta_mean: float = 0.0  # δ = 1 - s ~ LogitNormal(delta_mean, delta_std) in the prediction
    delta_std: float = 1.0  # spread of δ's LogitNormal
    delta_zero_fraction: float = 0.1  # anchors F(z, 1, 1) = u(z, 1)
    r_mean: float = 0.8  # LogitNormal(0.8, 1.6): weight on high noise
    r_std: float = 1.6  # spread of the correction's noise level r
    correction_guidance_t_hi: float = 0.7  # guidance only for r <= 0.7 in the correction
    guidance_min: float = 1.0  # guidance scales the student is trained over: from guidance_min ...
    guidance_max: float = 2.0  # ... up to guidance_max, uniformly; export bakes scales from this range

    def __post_init__(self) -> None:
        if self.time not in ("discrete", "continuous"):
            raise ValueError(f"time must be 'discrete' or 'continuous', got {self.time!r}")
        if self.intervals < 1:
            raise ValueError(f"intervals must be >= 1, got {self.intervals}")
        if self.derivative not in ("jvp", "fd"):
            raise ValueError(f"derivative must be 'jvp' or 'fd', got {self.derivative!r}")
        if not 0 < self.pred_fraction < 1:
            raise ValueError(f"pred_fraction must be in (0, 1), got {self.pred_fraction}")
        check_guidance_range(self.guidance_min, self.guidance_max)


def generating_velocity(student, z, delta, label, w, derivative: str = "fd", fd_step: float = 1e-3):
    """F(z, 1, 1 - δ) with its graph, and sg(v_G) with v_G = F + δ ∂_δF (∂_δF = -∂_sF)."""
    one = torch.ones_like(delta)

    def average_velocity(d):
        return student.average_velocity(z, one, one - d, label, w)

    if derivative == "jvp":
        F_delta, dF = jvp(average_velocity, (delta,), (torch.ones_like(delta),))
    else:
        F_delta = average_velocity(delta)
        with torch.no_grad():
            dF = (average_velocity(delta + fd_step) - average_velocity(delta - fd_step)) / (2 * fd_step)
    return F_delta, (F_delta + bcast(delta, z) * dF).detach()


def discrete_generating_velocity(student, z, delta_a, delta_b, label, w):
    """F(z, 1, 1 - δ_b) with its graph, sg(v_G) over [δ_a, δ_b] by the grid difference, and x(δ_a)."""
    one = torch.ones_like(delta_b)
    F_b = student.average_velocity(z, one, one - delta_b, label, w)
    with torch.no_grad():
        F_a = student.average_velocity(z, one, one - delta_a, label, w)
        v_G = F_b + bcast(delta_a / (delta_b - delta_a), z) * (F_b - F_a)
    return F_b, v_G, z - bcast(delta_a, z) * F_a


def prediction_target(student, teacher, z, delta, label, w, config: FreeFlowConfig):
    """(F, w_G Δ_G, |Δ_G|^2/d): the student output and its detached, power-law weighted error.

    Continuous time compares v_G(δ) with u at x(δ), 1 - δ. Discrete time takes the interval
    [δ_a, δ_b] of the N-grid that contains δ and compares the student's difference quotient with the
    teacher's velocity at the interval's start (an Euler step), so the teacher is never asked at t < 1/N.
    """
    if config.time == "discrete":
        index = (delta * config.intervals).floor().clamp(max=config.intervals - 1)
        delta_a, delta_b = index / config.intervals, (index + 1) / config.intervals
        F_out, v_G, x_query = discrete_generating_velocity(student, z, delta_a, delta_b, label, w)
        t_query = 1 - delta_a
    else:
        F_out, v_G = generating_velocity(student, z, delta, label, w, config.derivative, config.fd_step)
        x_query, t_query = (z - bcast(delta, z) * F_out).detach(), 1 - delta  # x(δ) = f(z, 1, 1 - δ)
    with torch.no_grad():
        u = guided_velocity(teacher.velocity, x_query, t_query, label, w, null_condition(teacher, label))
        err = v_G - u
        mse = err.flatten(1).pow(2).mean(1)
        target = bcast((mse + 1e-4) ** -config.weight_power, err) * err
    return F_out, target, mse


def correction_target(student, teacher, fake, z, label, w, config: FreeFlowConfig, generator):
    """(F(z,1,0), Δ_N, g, flow-matching target for g): the fake flow's graph is kept for its own update."""
    batch = z.shape[0]
    one, zero = torch.ones(batch).to(z), torch.zeros(batch).to(z)
    F_zero = student.average_velocity(z, one, zero, label, w)
    x0 = (z - F_zero).detach()
    noise = torch.randn(z.shape, generator=generator).to(z)
    r = logit_normal(batch, config.r_mean, config.r_std, generator).to(z)
    x_r = interpolate(x0, noise, r)
    g = fake.velocity(x_r, r, label, w)
    with torch.no_grad():
        u = guided_velocity(teacher.velocity, x_r, r, label, w, null_condition(teacher, label),
                            t_hi=config.correction_guidance_t_hi)
        delta_N = g.detach() - u
    return F_zero, delta_N, g, noise - x0


class FreeFlow:
    """Trainer method: the fake flow learns the student's noising flow, then the student takes
    the prediction (75% of the batch) and the λ-balanced correction (25%) in one update."""

    ema_name = "student"

    def __init__(self, setup: Setup):
        self.trainable = {"student": setup.student, "fake": FakeFlow.from_teacher(setup.teacher)}
        self.teacher, self.shape, self.config = setup.teacher, setup.shape, setup.config
        self.batch_size, self.device = setup.batch_size, torch.device(setup.device)

    def losses(self, generator, logs):
        config, batch = self.config, self.batch_size
        n_pred = max(1, min(batch - 1, round(batch * config.pred_fraction)))
        z, label = prior_batch(batch, self.shape, self.teacher, generator, self.device)
        w = draw_guidance_scales(batch, config.guidance_min, config.guidance_max, generator).to(self.device)
        delta = logit_normal(n_pred, config.delta_mean, config.delta_std, generator)
        delta = torch.where(torch.rand(n_pred, generator=generator) < config.delta_zero_fraction, 0.0, delta)
        delta = delta.to(self.device)
        student, fake = self.trainable["student"], self.trainable["fake"]
        p, c = slice(0, n_pred), slice(n_pred, batch)
        F_pred, target_G, mse_G = prediction_target(student, self.teacher, z[p], delta, label[p], w[p], config)
        F_corr, delta_N, g, g_target = correction_target(student, self.teacher, fake, z[c], label[c], w[c],
                                                         config, generator)
        lam = config.alpha * target_G.flatten(1).norm(dim=1).mean() / (delta_N.flatten(1).norm(dim=1).mean() + 1e-6)
        target_N = lam * delta_N
        assert not (target_G.requires_grad or target_N.requires_grad), "targets must be stop-gradient"
        student_loss = ((F_pred * target_G).sum() + (F_corr * target_N).sum()) / z.numel()
        fake_loss = F.mse_loss(g, g_target)
        logs.update(pred_mse=mse_G.mean().item(), corr_mse=delta_N.pow(2).mean().item(),
                    fake=fake_loss.item(), lam=lam.item())
        yield "fake", fake_loss
        yield "student", student_loss
