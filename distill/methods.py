"""The distillation methods by name: each is a config dataclass and a builder over the same
student/teacher interfaces, so the CLI, the trainer and the benchmark treat them alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from distill.freeflow import FreeFlow, FreeFlowConfig
from distill.models import FakeFlow, Student


@dataclass(frozen=True)
class MethodSpec:
    config: type
    build: Callable  # (student, teacher, cfg, shape, batch_size, device) -> trainer method
    summary: str


def _build_freeflow(student, teacher, cfg, shape, batch_size, device):
    fake = FakeFlow.from_teacher(teacher).requires_grad_(True)
    return FreeFlow(student, teacher, fake, shape, cfg, batch_size, device)


METHODS: dict[str, MethodSpec] = {
    "freeflow": MethodSpec(FreeFlowConfig, _build_freeflow,
                           "data-free prediction + correction with an online fake flow (§3)"),
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def initial_student(teacher) -> Student:
    """A student that starts as the teacher's velocity (our own teachers) with s and w inputs."""
    if not hasattr(teacher, "cfg"):
        raise ValueError("an outside teacher has no weights to copy: pass --student-arch to build a fresh student")
    return Student.from_teacher(teacher).requires_grad_(True)
