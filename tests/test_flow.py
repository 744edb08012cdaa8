"""Flow math and network contracts: guidance, samplers, the zero-init student, JVP vs finite differences."""

import pytest
import torch

from distill.flow import euler_sample, flow_map_sample, guided_velocity, heun_sample, interpolate
from distill.freeflow import generating_velocity
from distill.models import ConventionAdapter, Student, Teacher
from distill.nets import NetConfig


def jitter(module, std=0.05, seed=0):
    """Perturb every weight so zero-initialised layers cannot hide a broken path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))
    return module


CONFIGS = [NetConfig(arch="mlp", width=48, depth=2), NetConfig(arch="dit", width=32, depth=2, heads=2, patch=2)]


@pytest.fixture(params=CONFIGS, ids=lambda c: c.arch)
def teacher(request):
    torch.manual_seed(0)
    return jitter(Teacher(request.param)).eval()


def batch(n=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=gen), torch.rand(n, generator=gen),
            torch.randint(0, 10, (n,), generator=gen))


def test_interpolant_endpoints():
    x, eps = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.equal(interpolate(x, eps, torch.tensor([0.0, 1.0])), torch.tensor([[0.0] * 3, [1.0] * 3]))


def test_guidance_w1_is_conditional_and_interval_switches_it_off(teacher):
    x, t, label = batch()
    cond = teacher.velocity(x, t, label)
    null = torch.full_like(label, 10)
    uncond = teacher.velocity(x, t, null)
    assert torch.allclose(guided_velocity(teacher.velocity, x, t, label, 1.0, null), cond, atol=1e-5)
    guided = guided_velocity(teacher.velocity, x, t, label, 3.0, null)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5)
    assert not torch.allclose(guided, cond, atol=1e-3)  # guidance does something
    t_mixed = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.95, 0.6])
    cond = teacher.velocity(x, t_mixed, label)
    interval = guided_velocity(teacher.velocity, x, t_mixed, label, 3.0, null, t_lo=0.3, t_hi=0.7)
    full = guided_velocity(teacher.velocity, x, t_mixed, label, 3.0, null)
    inside = (t_mixed >= 0.3) & (t_mixed <= 0.7)
    assert torch.allclose(interval[~inside], cond[~inside], atol=1e-5)
    assert torch.allclose(interval[inside], full[inside], atol=1e-5)


def test_per_sample_guidance_equals_scalar_guidance(teacher):
    x, t, label = batch()
    null = torch.full_like(label, 10)
    per_sample = guided_velocity(teacher.velocity, x, t, label, torch.full((6,), 2.0), null)
    assert torch.allclose(per_sample, guided_velocity(teacher.velocity, x, t, label, 2.0, null), atol=1e-6)


def test_samplers_are_exact_for_a_straight_flow():
    # u = eps - x0 is constant along straight paths to a point mass at x0: Euler is exact.
    x0 = torch.tensor([[0.5, -0.25]])
    eps = torch.randn(4, 2)
    velocity = lambda x, t: (x - x0) / t[:, None]  # the exact velocity towards x0
    for solve in (euler_sample, heun_sample):
        assert torch.allclose(solve(velocity, eps, 7), x0.expand(4, 2), atol=1e-5)


def test_student_starts_as_the_teacher(teacher):
    student = Student.from_teacher(teacher).eval()
    x, t, label = batch()
    w = torch.full((6,), 1.7)
    # zero-initialised s and w embeddings: F(x, t, s) is u(x, t) exactly, for s = t and any other s
    assert torch.equal(student.average_velocity(x, t, t, label, w), teacher.velocity(x, t, label))
    assert torch.equal(student.average_velocity(x, t, t * 0.3, label, w), teacher.velocity(x, t, label))
    # hence one flow-map jump from the initial student is one Euler step of the teacher
    eps = x
    one_jump = flow_map_sample(student.average_velocity, eps, 1, label, w)
    euler = euler_sample(lambda xx, tt: teacher.velocity(xx, tt, label), eps, 1)
    assert torch.allclose(one_jump, euler, atol=1e-6)


def test_networks_are_batch_invariant(teacher):
    x, t, label = batch(9)
    full = teacher.velocity(x, t, label)
    rows = torch.cat([teacher.velocity(x[i:i + 1], t[i:i + 1], label[i:i + 1]) for i in range(9)])
    assert torch.allclose(full, rows, atol=1e-5)


def test_finite_difference_and_jvp_agree(teacher):
    student = jitter(Student.from_teacher(teacher), seed=3)
    z, _, label = batch()
    delta, w = torch.rand(6), 1 + torch.rand(6)
    F_jvp, v_jvp = generating_velocity(student, z, delta, label, w, "jvp")
    F_fd, v_fd = generating_velocity(student, z, delta, label, w, "fd", 1e-3)
    assert torch.allclose(F_jvp, F_fd, atol=1e-6)  # attention's math kernel (in the JVP) against its fused one
    scale = v_jvp.abs().max()
    assert (v_jvp - v_fd).abs().max() <= 2e-3 * scale
    # and the derivative term is not trivially zero (which would make agreement meaningless)
    assert (v_jvp - F_jvp.detach()).abs().max() > 1e-2 * scale
    # the generating velocity is a detached target; F keeps the graph into the student's weights
    assert not v_jvp.requires_grad and F_jvp.requires_grad and F_fd.requires_grad


def test_convention_adapter_maps_a_reversed_time_model():
    # A SiT-style model: x_t' = t' x + (1 - t') eps, v' = x - eps. Ours must be eps - x at t = 1 - t'.
    x0, eps = torch.randn(3, 2), torch.randn(3, 2)

    class Theirs(torch.nn.Module):
        def velocity(self, x, t_theirs, label):
            return x0 - eps

    ours = ConventionAdapter(Theirs(), num_classes=1, time_reversed=True)
    assert torch.allclose(ours.velocity(eps, torch.ones(3), torch.zeros(3, dtype=torch.long)), eps - x0)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="arch"):
        NetConfig(arch="unet")
    with pytest.raises(ValueError, match="patch 3 must divide"):
        NetConfig(arch="dit", patch=3)


@pytest.mark.parametrize("config, field", [
    ("freeflow", "guidance_min"), ("meanflow", "guidance_min"), ("fgm", "guidance_min"), ("fsf-dmd", "guidance_min"),
    ("dmd2", "dm_guidance_scale"), ("fsf-dmd", "dm_guidance_scale")])
def test_every_method_refuses_guidance_scales_below_zero_or_not_finite_naming_the_field(config, field):
    """A negative scale pushes samples away from their condition, and an infinite one is no scale: each method's
    config refuses both, naming its field; a range whose ends cross is refused too, and 0 (unconditional) is a
    scale."""
    from distill.methods import METHODS

    make = METHODS[config].config
    for bad in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"{field} must be a guidance scale of 0 or more"):
            make(**{field: bad})
    if field == "guidance_min":
        make(guidance_min=0.0)
        with pytest.raises(ValueError, match="guidance_min 3 exceeds guidance_max 2"):
            make(guidance_min=3.0, guidance_max=2.0)


def test_export_refuses_a_negative_guidance_scale_before_it_reads_the_student(tmp_path):
    from export.writer import export_bundle

    for scales, teacher_scale, flag in (((-1.0,), None, "--guidance-scales"), ((1.5,), -2.0,
                                                                               "--teacher-guidance-scale")):
        with pytest.raises(ValueError, match=f"{flag} must be a guidance scale of 0 or more"):
            export_bundle(tmp_path / "no-student", "no-teacher", None, tmp_path / "b", scales, teacher_scale,
                          progress=False)
    assert not (tmp_path / "b").exists()
