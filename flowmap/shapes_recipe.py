"""The shapes recipe end to end, the text-to-image half of `make models`: a tiny CLIP, the oracle (for
benchmarks only, never search), a SANA-layout teacher on the captions, a FreeFlow student of it and
the export into models/shapes with the CLIP as the search verifier. Each stage is timed and a rerun
reuses what a previous run finished (the trainers resume from their checkpoints)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distill.clip import ClipConfig
from distill.freeflow import FreeFlowConfig
from distill.oracle import OracleConfig
from distill.shapes import ShapesConfig
from distill.text_teacher import ShapesTeacherConfig
from distill.trainer import TrainConfig
from flowmap.recipe import stage_table, timed_stages

GUIDANCE_SCALE = 3.0  # the teacher's guidance and the student's baked scale (inside the student's trained range)


@dataclass
class ShapesRecipe:
    """Everything the shapes half of `make models` trains, with its seeds."""

    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    clip: ClipConfig = field(default_factory=lambda: ClipConfig(steps=1000))
    oracle: OracleConfig = field(default_factory=OracleConfig)
    teacher: ShapesTeacherConfig = field(default_factory=ShapesTeacherConfig)
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=8000, batch_size=48, lr=6e-4, ema_decay=0.999, checkpoint_every=1000, log_every=100))
    method: str = "freeflow"
    method_config: FreeFlowConfig = field(default_factory=lambda: FreeFlowConfig(
        guidance_min=1.0, guidance_max=GUIDANCE_SCALE + 1.0))
    distill_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=7500, batch_size=48, lr=2e-4, ema_decay=0.999, checkpoint_every=500, log_every=100))
    # 7500 steps: the 1-NFE student's FD against real renders was still falling at 7500 (docs/search.md has it)
    train_prompts: int = 2048  # captions of this many training scenes: the student's data-free conditions
    guidance_scale: float = GUIDANCE_SCALE


def training_captions(count: int, shapes: ShapesConfig) -> list[str]:
    """Captions of the first `count` training scenes (repeats kept: they carry the scene frequencies)."""
    from distill.shapes import batch

    return [scene.caption for scene in batch(range(count), shapes)[1]]


def oracle_stage(recipe: ShapesRecipe, folder: Path, progress: bool) -> dict:
    """Train the oracle (or reuse it) and report its accuracy on fresh renders of both splits."""
    from distill.oracle import accuracies, judge, load_oracle, save_oracle, train_oracle
    from distill.shapes import batch

    if not (folder / "oracle.safetensors").is_file():
        save_oracle(train_oracle(recipe.oracle, recipe.shapes, progress), recipe.oracle, recipe.shapes, folder)
    oracle = load_oracle(folder)
    report = {}
    for split in ("train", "test"):
        images, scenes = batch(range(10**6, 10**6 + 512), recipe.shapes, split)
        report[split] = accuracies(judge(oracle, images, scenes))
    return report


def clip_stage(recipe: ShapesRecipe, folder: Path, progress: bool) -> dict:
    """Train the CLIP (or reuse it); report caption retrieval among 64 held-out scenes."""
    import transformers

    from distill.clip import embed, save_clip, token_ids, train_clip
    from distill.shapes import batch

    if not (folder / "model.safetensors").is_file():
        save_clip(*train_clip(recipe.clip, recipe.shapes, progress), folder)
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    report = {}
    for split in ("train", "test"):
        images, scenes = batch(range(10**6, 10**6 + 64), recipe.shapes, split)
        with torch.no_grad():
            image, text = embed(model, torch.from_numpy(images), token_ids(tokenizer, [s.caption for s in scenes]))
        report[f"retrieval_top1_{split}"] = (image @ text.T).argmax(1).eq(torch.arange(64)).float().mean().item()
    return report


def run_shapes_pipeline(recipe: ShapesRecipe, runs: str | Path, docs: str | Path, bundle: str | Path | None = None,
                        progress: bool = True) -> dict:
    """CLIP -> oracle -> teacher -> FreeFlow student -> export; writes docs/shapes_pipeline.{md,json}."""
    import transformers

    from distill.pipeline import distill_student
    from distill.text_teacher import train_shapes_teacher
    from export.writer import export_bundle

    runs, docs = Path(runs), Path(docs)
    stage, stages = timed_stages("shapes")

    clip_report = stage("clip", lambda: clip_stage(recipe, runs / "clip", progress))
    oracle_report = stage("oracle", lambda: oracle_stage(recipe, runs / "oracle", progress))
    clip = transformers.CLIPModel.from_pretrained(runs / "clip")
    tokenizer = transformers.AutoTokenizer.from_pretrained(runs / "clip")
    pipeline = stage("teacher", lambda: train_shapes_teacher(clip, tokenizer, runs / "teacher", recipe.teacher,
                                                             recipe.teacher_train, recipe.shapes, progress))
    teacher_spec = f"diffusers:{pipeline}"
    student = stage("distill", lambda: distill_student(
        recipe.method, teacher_spec, recipe.method_config, recipe.distill_train, runs / recipe.method, progress,
        prompts=training_captions(recipe.train_prompts, recipe.shapes)))
    if bundle is not None:
        stage("export", lambda: export_bundle(runs / recipe.method, teacher_spec, f"clip:{runs / 'clip'}", bundle,
                                              (recipe.guidance_scale,), recipe.guidance_scale,
                                              name=Path(bundle).name, progress=progress))
    report = {"recipe": asdict(recipe), "stage_seconds": stages, "total_minutes": round(sum(stages.values()) / 60, 2),
              "clip": clip_report, "oracle": oracle_report, "student": student,
              "torch_threads": torch.get_num_threads()}
    write_report(report, docs)
    return report


def student_line(report: dict) -> str:
    """How many steps the student has, and how many of them (at what speed) the run that wrote the report trained."""
    student, method = report["student"], report["recipe"]["method"]
    trained = student.get("steps_this_run", student["step"])
    if trained == student["step"]:
        return f"Student: {method}, {student['step']} steps, {student['sec_per_step']} s/step."
    if trained == 0:
        return f"Student: {method}, {student['step']} steps, all trained by earlier runs of this pipeline (resumed)."
    return (f"Student: {method}, {student['step']} steps, {trained} of them in this run at {student['sec_per_step']} "
            "s/step (the rest by an earlier run, resumed).")


def write_report(report: dict, docs: str | Path) -> None:
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "shapes_pipeline.json").write_text(json.dumps(report, indent=2))
    oracle = "\n".join(f"| {split} | " + " | ".join(f"{value:.3f}" for value in row.values()) + " |"
                       for split, row in report["oracle"].items())
    categories = list(next(iter(report["oracle"].values())))
    retrieval = report["clip"]
    text = (
        "# The shapes pipeline\n\n"
        "Written by `flowmap pipeline --recipe shapes` (`make models`) on the machine it ran on "
        f"({report['torch_threads']} torch threads). A rerun reuses finished stages, so a stage's seconds are "
        "those of the run that wrote this file.\n\n"
        + stage_table(report) +
        "CLIP caption retrieval (top-1 among 64 scenes): "
        f"train {retrieval['retrieval_top1_train']:.3f}, held-out pairs {retrieval['retrieval_top1_test']:.3f}.\n\n"
        "Oracle accuracy on real renders (512 fresh scenes a split; it scores benchmarks, never a search):\n\n"
        f"| split | {' | '.join(categories)} |\n|---|" + "---:|" * len(categories) + "\n" + oracle + "\n\n"
        + student_line(report) + "\n"
    )
    (docs / "shapes_pipeline.md").write_text(text)
