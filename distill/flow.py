"""Flow math in the convention of docs/methods.md §0: t = 1 is noise, t = 0 is data, v = eps - x.

Teachers are anything with `velocity(x, t, label) -> v`; students anything with
`average_velocity(x, t, s, label, w) -> F`, so that the flow map is f(x, t, s) = x - (t - s) F.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_guidance_scale(name: str, scale: float) -> None:
    """Refuse a guidance scale a student cannot be trained or baked at: finite and at least 0 (0 is unconditional,
    1 conditional; below 0 pushes away from the condition, which no sampler wants). `name`: its flag or field."""
    if not 0 <= scale < float("inf"):
        raise ValueError(f"{name} must be a guidance scale of 0 or more (0 unconditional, 1 conditional), got {scale}")


def check_guidance_range(guidance_min: float, guidance_max: float) -> None:
    """A method config's range of guidance scales: both ends scales `check_guidance_scale` takes, in order."""
    check_guidance_scale("guidance_min", guidance_min)
    check_guidance_scale("guidance_max", guidance_max)
    if guidance_min > guidance_max:
        raise ValueError(f"guidance_min {guidance_min:g} exceeds guidance_max {guidance_max:g}")


def bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample [B] tensor to broadcast against a [B, ...] tensor."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


def jvp(function, primals: tuple, tangents: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.func.jvp with attention on its math kernel: the fused ones (flash, memory-efficient) have no
    forward-mode derivative, and every transformer here (ours, diffusers') calls them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(function, primals, tangents)


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t eps."""
    t = bcast(t, x)
    return (1 - t) * x + t * eps


def logit_normal(n: int, mean: float, std: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Samples of sigmoid(N(mean, std^2)) in (0, 1)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def draw_guidance_scales(batch: int, guidance_min: float, guidance_max: float,
                         generator: torch.Generator) -> torch.Tensor:
    """Guidance scales drawn uniformly from [guidance_min, guidance_max], one per sample."""
    return guidance_min + (guidance_max - guidance_min) * torch.rand(batch, generator=generator)


def null_condition(model, label: torch.Tensor) -> torch.Tensor:
    """The unconditional condition shaped like `label`: class index `num_classes` for class models, the
    model's own `null_condition` (e.g. the empty prompt's embedding) for the others."""
    if hasattr(model, "null_condition"):
        return model.null_condition(label)
    return torch.full_like(label, model.num_classes)


def drop_condition(label: torch.Tensor, drop: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """`null` where `drop` [B] is set, `label` elsewhere (whatever the condition's shape)."""
    return torch.where(bcast(drop, label), null, label)


def sample_conditions(model, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Conditions to generate from: uniform class labels, or the model's own `sample_conditions` (prompts)."""
    if hasattr(model, "sample_conditions"):
        return model.sample_conditions(batch, generator)
    return torch.randint(0, model.num_classes, (batch,), generator=generator)


def prior_batch(batch: int, shape: tuple[int, ...], model, generator: torch.Generator,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, condition): prior noise and conditions drawn from `model`, the inputs of the data-free methods."""
    z = torch.randn((batch, *shape), generator=generator).to(device)
    return z, sample_conditions(model, batch, generator).to(device)


def guided_velocity(velocity: Velocity, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor,
                    guidance_scale: float | torch.Tensor, null: torch.Tensor, t_lo: float = 0.0,
                    t_hi: float = 1.0) -> torch.Tensor:
    """u_w(x, t, c); the conditional and unconditional passes run as one batch of 2B. `null` is the
    unconditional condition shaped like `label` (see `null_condition`).

    `guidance_scale` may be a float or a per-sample [B] tensor. Outside [t_lo, t_hi] the result is the
    conditional velocity u(x, t, c).
    """
    batch = x.shape[0]
    both = velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([label, null]))
    cond, uncond = both[:batch], both[batch:]
    scale = torch.as_tensor(guidance_scale, dtype=x.dtype, device=x.device)
    if scale.dim() == 1:
        scale = bcast(scale, x)
    inside = bcast(((t >= t_lo) & (t <= t_hi)).to(x.dtype), x)
    scale = inside * scale + (1 - inside)
    return uncond + scale * (cond - uncond)


def time_grid(steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform grid 1 = t_0 > t_1 > ... > t_K = 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


@torch.no_grad()
def euler_sample(velocity: Velocity, eps: torch.Tensor, steps: int) -> torch.Tensor:
    """x <- x - (t_i - t_{i+1}) u(x, t_i) from t = 1 to 0. `velocity` already closes over label/guidance."""
    grid = time_grid(steps, eps.device)
    x = eps
    for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
        t = torch.full((x.shape[0],), float(t_now), device=x.device)
        x = x - (t_now - t_next) * velocity(x, t)
    return x


@torch.no_grad()
def heun_sample(velocity: Velocity, eps: torch.Tensor, steps: int) -> torch.Tensor:
    """Second-order Heun; the last step to t = 0 is plain Euler (2K - 1 evaluations)."""
    grid = time_grid(steps, eps.device)
    x = eps
    for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
        dt = t_now - t_next
        t = torch.full((x.shape[0],), float(t_now), device=x.device)
        v_now = velocity(x, t)
        x_euler = x - dt * v_now
        if float(t_next) > 0:
            v_next = velocity(x_euler, torch.full_like(t, float(t_next)))
            x = x - dt * 0.5 * (v_now + v_next)
        else:
            x = x_euler
    return x


def flow_map(average_velocity, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, *cond) -> torch.Tensor:
    """f(x, t, s) = x - (t - s) F(x, t, s, ...)."""
    return x - bcast(t - s, x) * average_velocity(x, t, s, *cond)


@torch.no_grad()
def flow_map_sample(average_velocity, eps: torch.Tensor, steps: int, *cond) -> torch.Tensor:
    """M jumps x <- f(x, tau_i, tau_{i+1}) on a uniform grid; M = 1 is the 1-NFE sample eps - F(eps, 1, 0)."""
    grid = time_grid(steps, eps.device)
    x = eps
    for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
        t = torch.full((x.shape[0],), float(t_now), device=x.device)
        x = flow_map(average_velocity, x, t, torch.full_like(t, float(t_next)), *cond)
    return x
