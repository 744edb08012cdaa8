"""The 2-D toy's teacher: it trains in seconds and lands its samples on their modes (every method's
toy test in test_methods.py distils from it)."""

import json

import pytest
import torch

from distill.data import toy_gaussians
from distill.evaluate import sample_teacher
from distill.models import Teacher, load_student, load_teacher

from toy import sliced_wasserstein


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


def test_a_teacher_run_is_not_taken_for_a_student(toy_teacher):
    from distill.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="holds a 'teacher' checkpoint, expected 'student'"):
        load_student(toy_teacher)


def test_teacher_module_interface(toy_teacher):
    teacher = load_teacher(str(toy_teacher))
    assert isinstance(teacher, Teacher) and teacher.num_classes == 8
    assert not any(p.requires_grad for p in teacher.parameters())
