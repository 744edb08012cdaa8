"""The distillation methods by name: each is a config dataclass and a builder over the same
student/teacher interfaces, so the CLI, the trainer and the benchmark treat them alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from distill.dmd2 import DMD2, DMD2Config
from distill.fgm import FGM, FGMConfig
from distill.freeflow import FreeFlow, FreeFlowConfig
from distill.fsf_dmd import FSFDMD, FSFDMDConfig
from distill.meanflow import MeanFlow, MeanFlowConfig
from distill.models import FakeFlow, Student


@dataclass(frozen=True)
class MethodSpec:
    config: type
    build: Callable  # (student, teacher, cfg, data, shape, batch_size, device) -> trainer method
    summary: str
    needs_data: bool = False


def _fake(teacher) -> FakeFlow:
    return FakeFlow.from_teacher(teacher).requires_grad_(True)


METHODS: dict[str, MethodSpec] = {
    "freeflow": MethodSpec(
        FreeFlowConfig, lambda st, te, cfg, data, shape, b, dev: FreeFlow(st, te, _fake(te), shape, cfg, b, dev),
        "data-free prediction + correction with an online fake flow (§3)"),
    "meanflow": MethodSpec(
        MeanFlowConfig, lambda st, te, cfg, data, shape, b, dev: MeanFlow(st, te, data, cfg, b, dev),
        "consistency distillation with the MeanFlow identity, on data (§2)", needs_data=True),
    "fsf-dmd": MethodSpec(
        FSFDMDConfig, lambda st, te, cfg, data, shape, b, dev: FSFDMD(st, te, data, cfg, b, dev),
        "consistency distillation + DMD with the EMA generator as the fake side, no fake network (§4)",
        needs_data=True),
    "fgm": MethodSpec(
        FGMConfig, lambda st, te, cfg, data, shape, b, dev: FGM(st, te, _fake(te), shape, cfg, b, dev),
        "flow generator matching: one-step generator and an online flow (§5)"),
    "dmd2": MethodSpec(
        DMD2Config, lambda st, te, cfg, data, shape, b, dev: DMD2(st, te, _fake(te), shape, cfg, b, dev),
        "distribution matching with a fake velocity network and TTUR (§6)"),
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def initial_student(teacher) -> Student:
    """A student that starts as the teacher's velocity (our own teachers) with s and w inputs."""
    if not hasattr(teacher, "cfg"):
        raise ValueError("an outside teacher has no weights to copy into the student; train the student from our "
                         "own teacher checkpoint, or use fsf-dmd --self-teacher")
    return Student.from_teacher(teacher).requires_grad_(True)
