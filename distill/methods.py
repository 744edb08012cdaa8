"""The distillation methods by name: each is a config dataclass and a class built from one `Setup`
(student, teacher, config, data, batch size, device), so the CLI, the trainer and the benchmark treat
them alike."""

from __future__ import annotations

from dataclasses import dataclass

from distill.dmd2 import DMD2, DMD2Config
from distill.fgm import FGM, FGMConfig
from distill.freeflow import FreeFlow, FreeFlowConfig
from distill.fsf_dmd import FSFDMD, FSFDMDConfig
from distill.meanflow import MeanFlow, MeanFlowConfig
from distill.models import Student


@dataclass(frozen=True)
class MethodSpec:
    config: type  # the method's config dataclass: its fields are the CLI's flags
    method: type  # built as method(Setup(student, teacher, config, data, batch_size, device))
    summary: str
    needs_data: bool = False


METHODS: dict[str, MethodSpec] = {
    "freeflow": MethodSpec(FreeFlowConfig, FreeFlow,
                           "data-free prediction + correction with an online fake flow (§3)"),
    "meanflow": MethodSpec(MeanFlowConfig, MeanFlow,
                           "consistency distillation with the MeanFlow identity, on data (§2)", needs_data=True),
    "fsf-dmd": MethodSpec(FSFDMDConfig, FSFDMD,
                          "consistency distillation + DMD with the EMA generator as the fake side, no fake network "
                          "(§4)", needs_data=True),
    "fgm": MethodSpec(FGMConfig, FGM, "flow generator matching: one-step generator and an online flow (§5)"),
    "dmd2": MethodSpec(DMD2Config, DMD2, "distribution matching with a fake velocity network and TTUR (§6)"),
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def initial_student(teacher) -> Student:
    """A student that starts as the teacher's velocity (our own teachers) with s and w inputs."""
    if hasattr(teacher, "make_student"):  # a teacher of another architecture (diffusers) builds its own
        return teacher.make_student()
    if not hasattr(teacher, "config"):
        raise ValueError("an outside teacher has no weights to copy into the student; train the student from our "
                         "own teacher checkpoint, or use fsf-dmd --self-teacher")
    return Student.from_teacher(teacher).requires_grad_(True)
