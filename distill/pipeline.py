"""The stages of the distillation pipeline (teacher, verifier, distillation, evaluation) and the
digits recipe that `make models` runs. The CLI is a thin layer over these functions."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distill.checkpoint import load_checkpoint, module_state
from distill.data import Dataset, load_dataset
from distill.evaluate import EvalConfig, evaluate, to_markdown, write_report
from distill.freeflow import FreeFlowConfig
from distill.methods import get_method, initial_student
from distill.models import Student, Teacher, load_student, load_teacher
from distill.nets import NetConfig
from distill.teacher import TeacherConfig, TeacherTraining
from distill.trainer import TrainConfig, local_batch_size, seeded, train
from distill.verifier import Verifier, VerifierConfig, VerifierTraining, accuracy, split


def data_meta(data: Dataset) -> dict:
    return {"name": data.name, "shape": list(data.shape), "classes": data.classes}


def train_teacher(data: Dataset, net: NetConfig, cfg: TeacherConfig, train_cfg: TrainConfig, out: str | Path,
                  progress: bool = True, resume: bool = True) -> dict:
    """Flow-matching teacher on `data`; the network's shape and classes come from the data."""
    net = NetConfig(**{**net.to_dict(), "shape": data.shape, "num_classes": data.num_classes})
    with seeded(train_cfg.seed):
        teacher = Teacher(net)
    meta = {"kind": "teacher", "net": net.to_dict(), "teacher": asdict(cfg), "data": data_meta(data)}
    method = TeacherTraining(teacher, data, cfg, local_batch_size(train_cfg.batch_size), train_cfg.device)
    return train(method, out, meta, train_cfg, resume=resume, progress=progress)


def train_verifier(data: Dataset, cfg: VerifierConfig, train_cfg: TrainConfig, out: str | Path,
                   progress: bool = True, resume: bool = True) -> dict:
    """Classifier for evaluation features and Best-of-N; reports accuracy on a held-out split."""
    with seeded(train_cfg.seed):
        verifier = Verifier(data.shape, data.num_classes, cfg)
    meta = {"kind": "verifier", "verifier": asdict(cfg), "data": data_meta(data)}
    summary = train(VerifierTraining(verifier, data, cfg, local_batch_size(train_cfg.batch_size)), out, meta, train_cfg,
                    resume=resume, progress=progress)
    verifier = load_verifier(out)
    _, val = split(data, cfg.val_fraction)
    summary["val_accuracy"] = accuracy(verifier, data.samples[val], data.labels[val])
    Path(out, "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_verifier(run_dir: str | Path, device: str = "cpu") -> Verifier:
    meta, tensors = load_checkpoint(run_dir, kind="verifier")
    verifier = Verifier(tuple(meta["data"]["shape"]), len(meta["data"]["classes"]), VerifierConfig(**meta["verifier"]))
    verifier.load_state_dict(module_state(tensors, "ema"))
    return verifier.to(device).eval().requires_grad_(False)


def distill_student(method: str, teacher_spec: str | None, method_cfg, train_cfg: TrainConfig, out: str | Path,
                    progress: bool = True, resume: bool = True, data: Dataset | None = None,
                    net: NetConfig | None = None, init: str | Path | None = None) -> dict:
    """Distil the teacher into a flow-map student with `method` (see distill.methods).

    Methods that use data (meanflow, fsf-dmd) take `data`, by default the teacher's own dataset. A
    teacher-free run (fsf-dmd with self_teacher) builds a fresh student from `net`. `init` starts from
    another student's EMA weights (a flow map from consistency distillation or FreeFlow).
    """
    spec = get_method(method)
    if not isinstance(method_cfg, spec.config):
        raise TypeError(f"method {method!r} takes a {spec.config.__name__}, got {type(method_cfg).__name__}")
    self_taught = getattr(method_cfg, "self_teacher", False)
    if teacher_spec is None and not self_taught:
        raise ValueError(f"method {method!r} needs --teacher")
    teacher = None if self_taught else load_teacher(teacher_spec, train_cfg.device)
    teacher_meta = load_checkpoint(teacher_spec)[0] if teacher is not None and Path(teacher_spec).is_dir() else {}
    if data is None and (spec.needs_data or teacher is None):
        data = load_dataset((teacher_meta.get("data") or {}).get("name", "digits"))
    with seeded(train_cfg.seed):
        if teacher is None:
            base = net or Recipe().net
            student = Student(NetConfig(**{**base.to_dict(), "shape": data.shape, "num_classes": data.num_classes}))
            student.requires_grad_(True)
        elif init is not None:
            student = load_student(init)[0].requires_grad_(True)
        else:
            student = initial_student(teacher)
        trainer_method = spec.build(student, teacher, method_cfg, data, student.cfg.shape,
                                    local_batch_size(train_cfg.batch_size), train_cfg.device)
    data_info = teacher_meta.get("data") or (data_meta(data) if data is not None else None)
    meta = {"kind": "student", "method": method, "method_config": asdict(method_cfg), "net": student.cfg.to_dict(),
            "teacher": str(teacher_spec) if teacher is not None else None, "data": data_info,
            "init": str(init) if init is not None else None}
    return train(trainer_method, out, meta, train_cfg, resume=resume, progress=progress)


def run_evaluation(teacher_spec: str, student_dir: str | Path | None, verifier_dir: str | Path, data: Dataset,
                   cfg: EvalConfig, out: str | Path | None = None, progress: bool = True) -> dict:
    teacher = load_teacher(teacher_spec)
    student = load_student(student_dir)[0] if student_dir else None
    result = evaluate(teacher, student, load_verifier(verifier_dir), data, cfg, progress=progress)
    if student_dir:
        result["student"] = {"run": str(student_dir), **{k: v for k, v in load_checkpoint(student_dir)[0].items()
                                                          if k in ("method", "method_config", "step")}}
    if out is not None:
        write_report(result, out)
    return result


@dataclass
class Recipe:
    """Everything `make models` trains, with its seeds: the bundle is reproducible from these."""

    data: str = "digits"
    # The MLP member of the backbone family: on 2 CPU cores the DiT learns digits far slower per minute
    # (docs/pipeline.md); width 192 keeps the bundle (teacher + 2 students + verifier) near 16 MB.
    net: NetConfig = field(default_factory=lambda: NetConfig(arch="mlp", width=192, depth=4, mlp_ratio=2.0))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=6000, lr=1e-3, ema_decay=0.999))
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    verifier_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1500, batch_size=128, lr=1e-3, ema_decay=0.99, checkpoint_every=1500))
    method: str = "freeflow"
    method_config: FreeFlowConfig = field(default_factory=FreeFlowConfig)
    distill_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=8000, lr=2e-4, ema_decay=0.999))
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    cfg_scales: tuple[float, ...] = (1.5, 1.0)  # baked into the bundle, one student graph each


def run_pipeline(recipe: Recipe, runs: str | Path, docs: str | Path, bundle: str | Path | None = None,
                 progress: bool = True) -> dict:
    """Teacher -> verifier -> distillation -> evaluation -> export, timing each stage.

    Writes docs/pipeline.{md,json} and docs/evaluation.{md,json}; with `bundle`, the servable bundle
    whose manifest carries the evaluation.
    """
    from export.writer import export_bundle

    runs, docs = Path(runs), Path(docs)
    data = load_dataset(recipe.data)
    stages: dict[str, float] = {}

    def stage(name, fn):
        tick = time.perf_counter()
        print(f"[pipeline] {name}", flush=True)
        result = fn()
        stages[name] = round(time.perf_counter() - tick, 1)
        return result

    teacher_summary = stage("teacher", lambda: train_teacher(data, recipe.net, recipe.teacher, recipe.teacher_train,
                                                             runs / "teacher", progress))
    verifier_summary = stage("verifier", lambda: train_verifier(data, recipe.verifier, recipe.verifier_train,
                                                                runs / "verifier", progress))
    student_summary = stage("distill", lambda: distill_student(recipe.method, str(runs / "teacher"),
                                                               recipe.method_config, recipe.distill_train,
                                                               runs / recipe.method, progress))
    result = stage("evaluate", lambda: run_evaluation(str(runs / "teacher"), runs / recipe.method, runs / "verifier",
                                                      data, recipe.evaluation, docs / "evaluation", progress))
    if bundle is not None:
        stage("export", lambda: export_bundle(runs / recipe.method, str(runs / "teacher"), runs / "verifier", bundle,
                                              recipe.cfg_scales, name=Path(bundle).name, metrics=result,
                                              progress=progress))
    report = {
        "recipe": asdict(recipe),
        "stage_seconds": stages,
        "total_minutes": round(sum(stages.values()) / 60, 2),
        "teacher": teacher_summary,
        "verifier": verifier_summary,
        "student": student_summary,
        "evaluation": result,
        "torch_threads": torch.get_num_threads(),
    }
    write_pipeline_report(report, docs)
    return report


def write_pipeline_report(report: dict, docs: str | Path) -> None:
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "pipeline.json").write_text(json.dumps(report, indent=2))
    stage_rows = "\n".join(f"| {name} | {seconds:.1f} |" for name, seconds in report["stage_seconds"].items())
    text = (
        "# The digits pipeline\n\n"
        "Written by `flowmap pipeline` (`make models`) on the machine it ran on "
        f"({report['torch_threads']} torch threads).\n\n"
        "| stage | seconds |\n|---|---:|\n" + stage_rows
        + f"\n| **total** | **{report['total_minutes']:.2f} min** |\n\n"
        f"Verifier held-out accuracy: {report['verifier']['val_accuracy']:.4f}. "
        f"Student: {report['recipe']['method']}, {report['student']['step']} steps, "
        f"{report['student']['sec_per_step']} s/step.\n\n"
        "## Evaluation\n\n" + to_markdown(report["evaluation"])
    )
    (docs / "pipeline.md").write_text(text)
