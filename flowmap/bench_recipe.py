"""`flowmap bench recipe`: how long a teacher and a FreeFlow student take to train on your data and
this machine, for a few network sizes, before you commit hours to one. Each size trains a few dozen
steps of each; the report gives seconds per step and the projected time of a full run. Then what
`--gradient-checkpointing` saves at a real latent model's shape: FreeFlow steps of a SiT-S/2-shape network on
SD-VAE latents (random weights), with and without it, each in a fresh process.
Writes docs/recipe.{md,json,png}."""

from __future__ import annotations

import os
import platform
import tempfile
from dataclasses import asdict, dataclass

from flowmap.reports import pyplot, save_figure, write_report
from flowmap.timing import in_fresh_process

# name -> NetConfig fields; from the embedded digits recipe's MLP to the README's earlier DiT
PRESETS = {
    "mlp-192x4": {"arch": "mlp", "width": 192, "depth": 4, "mlp_ratio": 2.0},
    "dit-96x4-p4": {"arch": "dit", "width": 96, "depth": 4, "heads": 4, "patch": 4},
    "dit-128x4-p2": {"arch": "dit", "width": 128, "depth": 4, "heads": 4, "patch": 2},
    "dit-256x6-p2": {"arch": "dit", "width": 256, "depth": 6, "heads": 4, "patch": 2},
}
# the checkpointing part: SiT-S/2's shape (the public SiT sizes' smallest, which a CPU can step) on the 4x32x32
# latents of 256 px SD-VAE images
CHECKPOINTING_NET = {"arch": "dit", "width": 384, "depth": 12, "heads": 6, "patch": 2}
CHECKPOINTING_LATENT = (4, 32, 32)


@dataclass
class RecipeBenchConfig:
    data: str = "digits"  # what `flowmap teacher --data` takes: digits, an .npz or a folder of class folders
    presets: tuple[str, ...] = tuple(PRESETS)  # network sizes to time (names in PRESETS)
    timed_steps: int = 30  # per preset and stage
    teacher_steps: int = 6000  # the full run the projection is for (the digits recipe's counts)
    distill_steps: int = 8000  # ... and FreeFlow's
    batch_size: int = 256  # of both stages
    checkpointing_batch_size: int = 16  # of the checkpointing part's FreeFlow steps
    checkpointing_steps: int = 4  # ... and how many it times
    out: str = "docs/recipe"  # writes OUT.md, OUT.json and OUT.png


def time_preset(data, preset: str, config: RecipeBenchConfig, folder: str) -> dict:
    """Seconds per step of the teacher and of FreeFlow for one network size."""
    from distill.freeflow import FreeFlowConfig
    from distill.nets import NetConfig
    from distill.pipeline import distill_student, train_teacher
    from distill.teacher import TeacherConfig
    from distill.trainer import TrainConfig

    if preset not in PRESETS:
        raise ValueError(f"presets: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    quick = TrainConfig(steps=config.timed_steps, batch_size=config.batch_size, checkpoint_every=10**9)
    teacher = train_teacher(data, NetConfig(**PRESETS[preset]), TeacherConfig(), quick, f"{folder}/{preset}/teacher",
                            progress=False)
    student = distill_student("freeflow", f"{folder}/{preset}/teacher", FreeFlowConfig(), quick,
                              f"{folder}/{preset}/freeflow", progress=False, data=data)
    teacher_s, student_s = teacher["sec_per_step"], student["sec_per_step"]
    return {"preset": preset, **PRESETS[preset], "teacher_sec_per_step": teacher_s, "freeflow_sec_per_step": student_s,
            "projected_minutes": round((teacher_s * config.teacher_steps + student_s * config.distill_steps) / 60, 1)}


def training_peak(gradient_checkpointing: bool, batch_size: int, steps: int) -> dict:
    """In this (fresh) process: a teacher of CHECKPOINTING_NET's shape on random latents (one step: its weights
    are random, as a real checkpoint's size), then FreeFlow steps from it; the resident memory the distillation
    adds at its peak, and its seconds per step."""
    import torch

    from distill.data import Dataset
    from distill.freeflow import FreeFlowConfig
    from distill.models import load_teacher
    from distill.nets import NetConfig
    from distill.pipeline import distill_student, train_teacher
    from distill.teacher import TeacherConfig
    from distill.trainer import TrainConfig
    from flowmap.host_memory import with_added_peak_mb

    latents = torch.randn(4 * batch_size, *CHECKPOINTING_LATENT, generator=torch.Generator().manual_seed(0))
    data = Dataset("random SD-VAE latents", latents.clamp(-1, 1), torch.arange(4 * batch_size) % 10,
                   [str(label) for label in range(10)])
    with tempfile.TemporaryDirectory(prefix="flowmap-checkpointing-") as folder:
        train_teacher(data, NetConfig(**CHECKPOINTING_NET), TeacherConfig(),
                      TrainConfig(steps=1, batch_size=2, checkpoint_every=10**9), f"{folder}/teacher", progress=False)
        summary, peak = with_added_peak_mb(lambda: distill_student(
            "freeflow", f"{folder}/teacher", FreeFlowConfig(),
            TrainConfig(steps=steps, batch_size=batch_size, checkpoint_every=10**9,
                        gradient_checkpointing=gradient_checkpointing),
            f"{folder}/student", progress=False, data=data))
        parameters = sum(p.numel() for p in load_teacher(f"{folder}/teacher").parameters())
    return {"gradient_checkpointing": gradient_checkpointing, "peak_mb": round(peak),
            "sec_per_step": summary["sec_per_step"], "parameters_m": round(parameters / 1e6, 1)}


def run_recipe_bench(config: RecipeBenchConfig, progress: bool = True) -> dict:
    import torch

    from distill.data import load_dataset

    say = print if progress else (lambda *a, **k: None)
    data = load_dataset(config.data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="flowmap-recipe-") as folder:
        for preset in config.presets:
            say(f"[bench recipe] {preset}: {config.timed_steps} teacher and FreeFlow steps on {data.name} "
                f"{list(data.shape)}")
            rows.append(time_preset(data, preset, config, folder))
    say(f"[bench recipe] --gradient-checkpointing: {config.checkpointing_steps} FreeFlow steps at SiT-S/2's shape, "
        f"batch {config.checkpointing_batch_size}, with and without it")
    checkpointing = [in_fresh_process(training_peak, flag, config.checkpointing_batch_size, config.checkpointing_steps)
                     for flag in (False, True)]
    report = {"config": asdict(config), "data": {"name": data.name, "shape": list(data.shape)},
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform()},
              "presets": rows, "checkpointing": checkpointing}
    write_report(report, config.out, _plot, render_recipe_markdown)
    return report


def recipe_table(report: dict) -> list[str]:
    """The table the report and the README share."""
    config = report["config"]
    lines = [f"| network | flags | teacher s/step | FreeFlow s/step | {config['teacher_steps']} + "
             f"{config['distill_steps']} steps |", "|---|---|---:|---:|---:|"]
    for row in report["presets"]:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS[row["preset"]].items())
        lines.append(f"| {row['preset']} | `{flags}` | {row['teacher_sec_per_step']} | "
                     f"{row['freeflow_sec_per_step']} | {row['projected_minutes']} min |")
    return lines


def render_recipe_markdown(report: dict, plot_name: str) -> str:
    config, data = report["config"], report["data"]
    return "\n".join([
        "# Training time by network size",
        "",
        f"Written by `flowmap bench recipe --data {config['data']}` on {report['machine']['cpus']} CPUs "
        f"({report['machine']['torch_threads']} torch threads): {config['timed_steps']} steps of each stage at batch "
        f"{config['batch_size']} on {data['name']} {data['shape']}, projected to a full run.",
        "",
        *recipe_table(report),
        "",
        f"![seconds per step]({plot_name})",
        "",
        *checkpointing_lines(report),
        "",
    ])


def checkpointing_lines(report: dict, heading: bool = True) -> list[str]:
    """What --gradient-checkpointing saves and costs, as the report (under its own heading) and the README give it."""
    rows, config = report.get("checkpointing"), report["config"]
    if not rows:
        return []
    plain, recomputed = rows
    net = ", ".join(f"{key} {value}" for key, value in CHECKPOINTING_NET.items())
    return [
        *(["## What `--gradient-checkpointing` saves", ""] if heading else []),
        f"FreeFlow at SiT-S/2's shape ({plain['parameters_m']}M parameters: {net}) on "
        f"{'x'.join(map(str, CHECKPOINTING_LATENT))} latents, random weights, batch "
        f"{config['checkpointing_batch_size']}, {config['checkpointing_steps']} steps, each way in a fresh process: "
        "the resident memory the distillation adds at its peak (its four networks, Adam's state and the "
        "activations) and its seconds per step.",
        "",
        "| --gradient-checkpointing | peak MB | s/step |",
        "|---|---:|---:|",
        *(f"| {'on' if row['gradient_checkpointing'] else 'off'} | {row['peak_mb']} | {row['sec_per_step']} |"
          for row in rows),
        "",
        f"With it the distillation held {recomputed['peak_mb'] / plain['peak_mb']:.2f}x the memory at "
        f"{recomputed['sec_per_step'] / plain['sec_per_step']:.2f}x the time per step.",
    ]


def _plot(report: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r["preset"] for r in report["presets"]]
    ax.barh(names, [r["projected_minutes"] for r in report["presets"]], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("projected minutes, teacher + FreeFlow")
    ax.invert_yaxis()
    save_figure(fig, path)
