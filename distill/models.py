"""The teacher and student interfaces, and loading them from checkpoints or a user's import path.

Teacher: `velocity(x, t, label) -> u`. Student: `average_velocity(x, t, s, label, w) -> F` and
`jump(x, t, s, label, w) = x - (t - s) F`. Every method in distill/ is written against these two.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import torch
from torch import nn

from distill.checkpoint import CheckpointError, load_checkpoint, module_state
from distill.flow import flow_map
from distill.nets import FlowNet, NetConfig


class _Wrapped(nn.Module):
    """A FlowNet behind a role-specific interface."""

    @property
    def config(self) -> NetConfig:
        return self.net.config

    @property
    def num_classes(self) -> int:
        return self.net.config.num_classes


class Teacher(_Wrapped):
    """A flow-matching model: u(x, t, c) ≈ E[eps - x | x_t, c]."""

    def __init__(self, config: NetConfig):
        super().__init__()
        self.net = FlowNet(config)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, label)


class Student(_Wrapped):
    """A flow map f(x, t, s) = x - (t - s) F(x, t, s, c, w), guidance scale w as an input."""

    def __init__(self, config: NetConfig):
        super().__init__()
        self.net = FlowNet(config.with_extras("s", "w"))

    @classmethod
    def from_teacher(cls, teacher: Teacher) -> Student:
        """Copy the teacher's weights; the zero-initialised s and w embeddings make F(x, t, t) = u(x, t)."""
        student = cls(teacher.config)
        missing, unexpected = student.net.load_state_dict(teacher.net.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("extra_embed.") for k in missing), (missing, unexpected)
        return student

    def average_velocity(self, x, t, s, label, w) -> torch.Tensor:
        return self.net(x, t, label, s=s, w=w)

    def jump(self, x, t, s, label, w) -> torch.Tensor:
        return flow_map(self.average_velocity, x, t, s, label, w)


class FakeFlow(_Wrapped):
    """An online flow g(x, t, c, w) that learns the student's noising velocity (FreeFlow, DMD2, FGM)."""

    def __init__(self, config: NetConfig):
        super().__init__()
        self.net = FlowNet(config.with_extras("w"))

    @classmethod
    def from_teacher(cls, teacher: Teacher) -> FakeFlow:
        """Starts as the teacher (the w embedding, which the teacher lacks, at zero), trainable."""
        if hasattr(teacher, "make_fake_flow"):  # a teacher of another architecture builds its own
            return teacher.make_fake_flow()
        fake = cls(teacher.config)
        fake.net.load_state_dict(teacher.net.state_dict(), strict=False)
        return fake.requires_grad_(True)

    def velocity(self, x, t, label, w) -> torch.Tensor:
        return self.net(x, t, label, w=w)


class ConventionAdapter(nn.Module):
    """Wrap a teacher written in another convention so that it answers in ours.

    `time_reversed`: the model's time runs the other way (t' = 1 - t, noise at t' = 0).
    `negate`: the model returns minus the derivative of x along its own time.
    Ours is v = dx/dt; time reversal flips the sign once, `negate` once more. A SiT/FreeFlow-style
    model (x_t' = t' x + (1 - t') eps, v' = x - eps) is `time_reversed=True, negate=False`.
    """

    def __init__(self, model: nn.Module, num_classes: int, time_reversed: bool = False, negate: bool = False):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.time_reversed = time_reversed
        self.sign = -1.0 if time_reversed != negate else 1.0

    def velocity(self, x, t, label):
        return self.sign * self.model.velocity(x, 1 - t if self.time_reversed else t, label)


def load_net(run_dir: str | Path, kind: str, module_cls, weights: str = "ema",
             device: str | torch.device = "cpu"):
    """Rebuild a Teacher/Student/FakeFlow from a run directory, with its EMA weights by default."""
    meta, tensors = load_checkpoint(run_dir, kind=kind)
    model = module_cls(NetConfig(**meta["net"]))
    state = module_state(tensors, weights)
    # Methods store their trainable modules as wrappers; the EMA copy is of the wrapper too.
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False), meta


def signature(config) -> dict:
    """What a student must share with its teacher, of what a config says: the sample shape, the classes, a
    diffusers family ({} for a teacher of the user's own, which has no config of ours)."""
    found = {name: getattr(config, name, None) for name in ("shape", "num_classes", "family")}
    return {name: list(value) if isinstance(value, tuple | list) else value for name, value in found.items()
            if value is not None}


def load_teacher(spec: str, device: str | torch.device = "cpu", prompts: list[str] | None = None):
    """A teacher from a run directory, a public SiT checkpoint (`sit:PATH`, see distill/sit.py), a
    diffusers text-to-image pipeline folder (`diffusers:PATH`, see distill/diffusers_models.py; `prompts`
    are the conditions it trains on), or `package.module:factory` (a user's own model).

    A factory returns an object with `velocity(x, t, label)` in our convention (wrap others in
    ConventionAdapter) and `num_classes`.
    """
    if Path(spec).is_dir():
        teacher, _ = load_net(spec, "teacher", Teacher, device=device)
        return teacher
    if spec.startswith("sit:"):
        from distill.sit import config_of, read_state, to_flownet

        if not Path(spec[4:]).is_file():
            raise CheckpointError(f"teacher {spec!r}: no checkpoint file at {spec[4:]}")
        try:
            state = read_state(spec[4:])
            teacher = Teacher(config_of(state))
            teacher.net.load_state_dict(to_flownet(state, teacher.config))
        except (KeyError, IndexError, RuntimeError, AttributeError, pickle.UnpicklingError) as err:
            # a file of another kind, a tensor missing or of another shape: one line, not torch's traceback
            detail = (f"it has no tensor {err.args[0]!r}" if isinstance(err, KeyError)
                      else " ".join(str(err).split())[:240])
            raise CheckpointError(f"teacher {spec!r}: not a SiT/DiT checkpoint in the public layout we read "
                                  f"({detail})") from None
        return teacher.to(device).eval().requires_grad_(False)
    if spec.startswith("diffusers:"):
        return load_diffusers_teacher(spec[len("diffusers:"):], prompts).to(device)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise CheckpointError(f"cannot import teacher factory {spec!r}: {err}") from err
        teacher = factory()
        if not hasattr(teacher, "velocity") or not hasattr(teacher, "num_classes"):
            raise CheckpointError(f"{spec} must return an object with velocity(x, t, label) and num_classes")
        if isinstance(teacher, nn.Module):
            teacher = teacher.to(device).eval().requires_grad_(False)
        return teacher
    raise CheckpointError(f"teacher {spec!r} is neither a run directory, 'sit:CHECKPOINT', 'diffusers:FOLDER' "
                          "nor 'package.module:factory'")


def load_diffusers_teacher(path: str | Path, prompts: list[str] | None = None):
    """The pipeline's transformer as a teacher; the empty prompt and `prompts` encoded once by its text
    encoders (the null condition, and the bank training conditions are drawn from)."""
    from distill.diffusers_models import DiffusersTeacher, diffusers_config, load_transformer
    from distill.text import encode_prompts, load_conditioner

    if not (Path(path) / "model_index.json").is_file():
        raise CheckpointError(f"teacher diffusers:{path}: no diffusers pipeline folder (model_index.json) there")
    conditioner, tokenizers = load_conditioner(path)
    transformer = load_transformer(path)
    null = encode_prompts(conditioner, tokenizers, [""])[0]
    bank = encode_prompts(conditioner, tokenizers, prompts) if prompts else None
    teacher = DiffusersTeacher(transformer, diffusers_config(path, transformer, conditioner.layout), null, bank)
    return teacher.eval().requires_grad_(False)


def load_student(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Student, dict]:
    meta, tensors = load_checkpoint(run_dir, kind="student")
    if meta["net"].get("diffusers"):  # a diffusers transformer with the student's inputs
        from distill.diffusers_models import DiffusersConfig, DiffusersStudent, load_transformer

        config = DiffusersConfig.from_dict(meta["net"])
        student = DiffusersStudent(load_transformer(config.path), config)
        student.load_state_dict(module_state(tensors, "ema"))
        return student.to(device).eval().requires_grad_(False), meta
    return load_net(run_dir, "student", Student, device=device)
