"""The digits recipe end to end, what `make models` runs: teacher, verifier, FreeFlow, evaluation and
the export into models/digits, each stage timed. It sits above distill/ and export/ because it uses both."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distill.data import load_dataset
from distill.evaluate import EvalConfig, to_markdown
from distill.freeflow import FreeFlowConfig
from distill.nets import DIGITS_NET, NetConfig
from distill.pipeline import distill_student, run_evaluation, train_teacher, train_verifier
from distill.teacher import TeacherConfig
from distill.trainer import TrainConfig
from distill.verifier import VerifierConfig
from export.writer import export_bundle


@dataclass
class Recipe:
    """Everything `make models` trains, with its seeds: the bundle is reproducible from these."""

    data: str = "digits"
    net: NetConfig = field(default_factory=lambda: NetConfig(**DIGITS_NET.to_dict()))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=6000, lr=1e-3, ema_decay=0.999))
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    verifier_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1500, batch_size=128, lr=1e-3, ema_decay=0.99, checkpoint_every=1500))
    method: str = "freeflow"
    method_config: FreeFlowConfig = field(default_factory=FreeFlowConfig)
    distill_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=8000, lr=2e-4, ema_decay=0.999))
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    guidance_scales: tuple[float, ...] = (1.5, 1.0)  # baked into the bundle, one student graph each


def run_pipeline(recipe: Recipe, runs: str | Path, docs: str | Path, bundle: str | Path | None = None,
                 progress: bool = True) -> dict:
    """Teacher -> verifier -> distillation -> evaluation -> export, timing each stage.

    Writes docs/pipeline.{md,json} and docs/evaluation.{md,json}; with `bundle`, the servable bundle
    whose manifest carries the evaluation.
    """
    runs, docs = Path(runs), Path(docs)
    data = load_dataset(recipe.data)
    stage, stages = timed_stages("pipeline")

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
                                              recipe.guidance_scales, name=Path(bundle).name, metrics=result,
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


def timed_stages(tag: str):
    """(stage, seconds): `stage(name, fn)` announces the stage, runs fn and keeps its seconds by name."""
    seconds: dict[str, float] = {}

    def stage(name, fn):
        tick = time.perf_counter()
        print(f"[{tag}] {name}", flush=True)
        result = fn()
        seconds[name] = round(time.perf_counter() - tick, 1)
        return result

    return stage, seconds


def stage_table(report: dict) -> str:
    """The markdown table of a pipeline report's stage seconds and total."""
    rows = "\n".join(f"| {name} | {seconds:.1f} |" for name, seconds in report["stage_seconds"].items())
    return (f"| stage | seconds |\n|---|---:|\n{rows}\n| **total** | **{report['total_minutes']:.2f} min** |\n\n")


def write_pipeline_report(report: dict, docs: str | Path) -> None:
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "pipeline.json").write_text(json.dumps(report, indent=2))
    text = (
        "# The digits pipeline\n\n"
        "Written by `flowmap pipeline` (`make models`) on the machine it ran on "
        f"({report['torch_threads']} torch threads).\n\n"
        + stage_table(report) +
        f"Verifier held-out accuracy: {report['verifier']['val_accuracy']:.4f}. "
        f"Student: {report['recipe']['method']}, {report['student']['step']} steps, "
        f"{report['student']['sec_per_step']} s/step.\n\n"
        "## Evaluation\n\n" + to_markdown(report["evaluation"])
    )
    (docs / "pipeline.md").write_text(text)
