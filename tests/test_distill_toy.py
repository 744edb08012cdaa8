"""End to end on the 2-D toy: a teacher trains in seconds, FreeFlow's 1-NFE student matches the
teacher's 100-step samples within a sliced-Wasserstein bound that the untrained student misses."""

import json

import pytest
import torch

from distill.data import toy_gaussians
from distill.evaluate import sample_student, sample_teacher
from distill.freeflow import FreeFlowConfig
from distill.models import Teacher, load_student, load_teacher
from distill.pipeline import distill_student
from distill.trainer import TrainConfig

from toy import SW_BOUND, sliced_wasserstein


@pytest.fixture(scope="module")
def shared_noise():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(3000, 2, generator=gen), torch.randint(0, 8, (3000,), generator=gen)


def test_teacher_learns_the_toy(toy_teacher, shared_noise):
    teacher = load_teacher(str(toy_teacher))
    eps, label = shared_noise
    samples = sample_teacher(teacher, eps, label, 1.0, 100)
    data = toy_gaussians(3000, seed=3)
    # conditional samples sit on their own mode: mean distance to the mode centre is small
    angles = 2 * torch.pi * label / 8
    centres = 0.8 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    assert (samples - centres).norm(dim=1).median() < 0.1
    assert sliced_wasserstein(samples, data.samples) < 0.1
    log = [json.loads(line) for line in (toy_teacher / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]  # the loss falls


def test_freeflow_one_step_matches_the_teacher(toy_teacher, shared_noise, tmp_path):
    teacher = load_teacher(str(toy_teacher))
    eps, label = shared_noise
    reference = sample_teacher(teacher, eps, label, 1.0, 100)
    one_step_teacher = sliced_wasserstein(sample_teacher(teacher, eps, label, 1.0, 1), reference)
    assert one_step_teacher > 2 * SW_BOUND  # the bound has teeth: the student's starting point misses it

    config = FreeFlowConfig(guidance_min=1.0, guidance_max=1.0)
    distill_student("freeflow", str(toy_teacher), config, TrainConfig(steps=500, lr=1e-3, ema_decay=0.99),
                    tmp_path / "student", progress=False)
    student, meta = load_student(tmp_path / "student")
    assert meta["method"] == "freeflow" and meta["step"] == 500
    distance = sliced_wasserstein(sample_student(student, eps, label, 1.0, 1), reference)
    assert distance < SW_BOUND, f"1-NFE SW {distance:.4f}, bound {SW_BOUND}, teacher@1 {one_step_teacher:.4f}"


def test_a_teacher_run_is_not_taken_for_a_student(toy_teacher):
    from distill.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="holds a 'teacher' checkpoint, expected 'student'"):
        load_student(toy_teacher)


def test_teacher_module_interface(toy_teacher):
    teacher = load_teacher(str(toy_teacher))
    assert isinstance(teacher, Teacher) and teacher.num_classes == 8
    assert not any(p.requires_grad for p in teacher.parameters())
