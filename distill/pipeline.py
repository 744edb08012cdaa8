"""The stages of distillation: train a teacher, train a verifier, distil a student, evaluate. The
end-to-end recipe that chains them with the export (`make models`) lives in flowmap/recipe.py."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from distill.checkpoint import checkpoint_meta, load_checkpoint
from distill.data import Dataset, data_meta, load_dataset
from distill.evaluate import EvalConfig, evaluate, write_report
from distill.methods import get_method, initial_student
from distill.models import Student, Teacher, load_student, load_teacher, signature
from distill.nets import DIGITS_NET, NetConfig
from distill.teacher import TeacherConfig, TeacherTraining
from distill.trainer import Setup, TrainConfig, local_batch_size, seeded, train
from distill.verifier import Verifier, VerifierConfig, VerifierTraining, accuracy, load_verifier, split


def train_teacher(data: Dataset, net: NetConfig, config: TeacherConfig, train_config: TrainConfig, out: str | Path,
                  progress: bool = True, resume: bool = True) -> dict:
    """Flow-matching teacher on `data`; the network's shape and classes come from the data."""
    net = NetConfig(**{**net.to_dict(), "shape": data.shape, "num_classes": data.num_classes})
    with seeded(train_config.seed):
        teacher = Teacher(net)
    meta = {"kind": "teacher", "net": net.to_dict(), "teacher": asdict(config), "data": data_meta(data)}
    method = TeacherTraining(teacher, data, config, local_batch_size(train_config.batch_size), train_config.device)
    return train(method, out, meta, train_config, resume=resume, progress=progress)


def train_verifier(data: Dataset, config: VerifierConfig, train_config: TrainConfig, out: str | Path,
                   progress: bool = True, resume: bool = True) -> dict:
    """Classifier for evaluation features and Best-of-N; reports accuracy on a held-out split."""
    with seeded(train_config.seed):
        verifier = Verifier(data.shape, data.num_classes, config)
    meta = {"kind": "verifier", "verifier": asdict(config), "data": data_meta(data)}
    method = VerifierTraining(verifier, data, config, local_batch_size(train_config.batch_size))
    summary = train(method, out, meta, train_config, resume=resume, progress=progress)
    verifier = load_verifier(out)
    _, val = split(data, config.val_fraction)
    summary["val_accuracy"] = accuracy(verifier, data.samples[val], data.labels[val])
    Path(out, "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def teachers_data(teacher_meta: dict, teacher_spec: str, method: str) -> Dataset:
    """The teacher's training data, for a method that trains on data and was given no --data: read again from
    where the teacher recorded it, and only if it is still what the teacher saw (shape and classes)."""
    recorded = teacher_meta.get("data") or {}
    source = recorded.get("source") or recorded.get("name")
    data = None
    if source in ("digits", "toy") or (source and Path(source).exists()):
        data = load_dataset(source)
    if data is None or list(data.shape) != recorded.get("shape") or data.classes != recorded.get("classes"):
        where = (f"it was trained on {recorded.get('name')!r} ({recorded.get('shape')}, "
                 f"{len(recorded.get('classes', []))} classes), which is not at hand" if recorded
                 else "it records no dataset")
        raise ValueError(f"method {method!r} trains on data: give --data (the teacher {teacher_spec}: {where})")
    return data


def distill_student(method: str, teacher_spec: str | None, method_config, train_config: TrainConfig, out: str | Path,
                    progress: bool = True, resume: bool = True, data: Dataset | None = None,
                    net: NetConfig | None = None, init: str | Path | None = None,
                    prompts: list[str] | None = None) -> dict:
    """Distil the teacher into a flow-map student with `method` (see distill.methods).

    Methods that use data (meanflow, fsf-dmd) take `data`, by default the teacher's own dataset. A
    teacher-free run (fsf-dmd with self_teacher) builds a fresh student from `net`. `init` starts from
    another student's EMA weights (a flow map from consistency distillation or FreeFlow). A diffusers
    teacher (`diffusers:FOLDER`) trains on `prompts`, its data-free conditions.
    """
    spec = get_method(method)
    if not isinstance(method_config, spec.config):
        raise TypeError(f"method {method!r} takes a {spec.config.__name__}, got {type(method_config).__name__}")
    self_taught = getattr(method_config, "self_teacher", False)
    if teacher_spec is None and not self_taught:
        raise ValueError(f"method {method!r} needs --teacher")
    if teacher_spec and teacher_spec.startswith("diffusers:") and spec.needs_data:
        raise ValueError(f"method {method!r} needs image-caption data, which diffusers teachers do not have yet; "
                         "use a data-free method (freeflow, fgm, dmd2) with --prompts")
    if prompts and not (teacher_spec or "").startswith("diffusers:"):
        raise ValueError("--prompts: only a diffusers teacher (diffusers:FOLDER) generates from prompts; this one is "
                         "conditioned on classes")
    if teacher_spec and teacher_spec.startswith("diffusers:") and not prompts:
        raise ValueError("a diffusers teacher needs --prompts FILE: the prompts (one per line) it generates from")
    uses_jvp = getattr(method_config, "derivative", None) == "jvp" and getattr(method_config, "time",
                                                                                  "continuous") == "continuous"
    if train_config.gradient_checkpointing and uses_jvp:  # before any model loads
        raise ValueError("--gradient-checkpointing cannot recompute the blocks under a JVP (forward-mode "
                         "derivative, --derivative jvp); use --derivative fd with it")
    if train_config.gradient_checkpointing and method == "fgm":
        # FGM freezes its online flow's weights for the generator's loss only; a recomputation in the backward
        # pass meets them trainable again and saves other tensors (torch's checkpoint refuses it)
        raise ValueError("--gradient-checkpointing: FGM freezes its online flow for one loss, which recomputing the "
                         "blocks cannot follow; train FGM without it")
    teacher = None if self_taught else load_teacher(teacher_spec, train_config.device, prompts)
    teacher_meta = checkpoint_meta(teacher_spec) if teacher is not None and Path(teacher_spec).is_dir() else {}
    if data is None and (spec.needs_data or teacher is None):
        data = teachers_data(teacher_meta, teacher_spec, method) if teacher is not None else load_dataset("digits")
    # what this run makes: the teacher's samples, as far as its config says, else (self-taught) the data's
    made = (signature(getattr(teacher, "config", None)) if teacher is not None
            else {"shape": list(data.shape), "num_classes": data.num_classes})
    if data is not None and teacher is not None and "num_classes" in made and (
            list(data.shape) != made["shape"] or data.num_classes > made["num_classes"]):
        raise ValueError(f"--data {data.source or data.name}: its samples are {list(data.shape)} of {data.num_classes} "
                         f"classes, but the teacher makes {made['shape']} of {made['num_classes']}")
    with seeded(train_config.seed):
        if init is not None:
            student = load_student(init)[0].requires_grad_(True)
            ours = signature(student.config)
            if any(ours.get(name) != value for name, value in made.items()):
                raise ValueError(f"--init {init}: its network makes {ours.get('shape')} samples of "
                                 f"{ours.get('num_classes', 0)} classes, but this run's are {made.get('shape')} of "
                                 f"{made.get('num_classes', 0)}")
        elif teacher is None:
            base = net or DIGITS_NET
            student = Student(NetConfig(**{**base.to_dict(), "shape": data.shape, "num_classes": data.num_classes}))
            student.requires_grad_(True)
        else:
            student = initial_student(teacher)
        trainer_method = spec.method(Setup(student, teacher, method_config, data,
                                           local_batch_size(train_config.batch_size), train_config.device))
    data_info = teacher_meta.get("data") or (data_meta(data) if data is not None else None)
    meta = {"kind": "student", "method": method, "method_config": asdict(method_config),
            "net": student.config.to_dict(),
            "teacher": str(teacher_spec) if teacher is not None else None, "data": data_info,
            "prompts": len(prompts) if prompts else None,
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest() if prompts else None,
            "init": str(init) if init is not None else None}
    return train(trainer_method, out, meta, train_config, resume=resume, progress=progress)


def run_evaluation(teacher_spec: str, student_dir: str | Path | None, verifier_dir: str | Path, data: Dataset,
                   config: EvalConfig, out: str | Path | None = None, progress: bool = True) -> dict:
    teacher = load_teacher(teacher_spec)
    student = load_student(student_dir)[0] if student_dir else None
    result = evaluate(teacher, student, load_verifier(verifier_dir), data, config, progress=progress)
    if student_dir:
        result["student"] = {"run": str(student_dir), **{k: v for k, v in load_checkpoint(student_dir)[0].items()
                                                          if k in ("method", "method_config", "step")}}
    if out is not None:
        write_report(result, out)
    return result
