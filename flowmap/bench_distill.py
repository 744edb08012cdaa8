"""`flowmap bench distill`: every method from the same teacher, the same wall-time budget, the same
evaluation. Each method trains in its own process (so peak memory is its own), in equal segments;
after each segment the 1-NFE FD is measured for the FD-against-time plot. Writes
docs/distillation.{md,json,png}."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flowmap.reports import pyplot, save_figure, write_report

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DistillBenchConfig:
    teacher: str = "runs/digits/teacher"  # the teacher run every method distils (from make models)
    verifier: str = "runs/digits/verifier"  # the verifier run the evaluation uses
    runs: str = "runs/bench"  # where each method's run goes
    minutes: float = 4.0  # wall-time budget per method
    segments: int = 4  # FD is measured after each of these equal parts of the budget
    # a method name, or LABEL=METHOD to run one method several times with different options (a study)
    methods: tuple[str, ...] = ("freeflow", "meanflow", "fsf-dmd", "fgm", "dmd2")
    guidance_scale: float = 1.5  # guidance scale of the evaluation
    out: str = "docs/distillation"  # writes OUT.md, OUT.json and OUT.png
    # per-method options on top of each method's defaults, "label:flag=value" (repeatable)
    options: tuple[str, ...] = field(default_factory=tuple)
    title: str = "Distillation methods side by side"  # the report's heading


def parse_entry(entry: str) -> tuple[str, str]:
    """`fsf-dmd-m1=fsf-dmd` -> (label, method); a bare method name is its own label."""
    from distill.methods import METHODS

    label, _, method = entry.partition("=")
    method = method or label
    if method not in METHODS:
        raise ValueError(f"methods: unknown method {method!r} in {entry!r}; choose from {sorted(METHODS)}")
    return label, method


def entry_settings(label: str, options) -> list[str]:
    """The `flag=value` settings that `options` ("label:flag=value") gives the entry named `label`."""
    return [setting for name, _, setting in (option.partition(":") for option in options) if name == label]


def method_flags(label: str, options: tuple[str, ...]) -> list[str]:
    """The `flowmap distill` flags that `options` gives the entry named `label`."""
    flags = []
    for setting in entry_settings(label, options):
        key, _, value = setting.partition("=")
        flags += [f"--{key}", value] if value else [f"--{key}"]
    return flags


def train_segment(label: str, method: str, config: DistillBenchConfig, run_dir: Path, minutes_so_far: float) -> dict:
    """Run `flowmap distill` for one segment in a fresh process; resumes from the previous segment."""
    command = [sys.executable, "-m", "flowmap.cli", "distill", "--method", method, "--teacher", config.teacher,
               "--out", str(run_dir), "--steps", "1000000", "--max-minutes", str(config.minutes / config.segments),
               "--checkpoint-every", "1000000", "--quiet", *method_flags(label, config.options)]
    from distill.trainer import STOPPED_EARLY

    # each segment ends by --max-minutes, which the command reports with its own status
    finished = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    if finished.returncode not in (0, STOPPED_EARLY):
        raise subprocess.CalledProcessError(finished.returncode, command)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["minutes"] = round(minutes_so_far + summary["seconds"] / 60, 3)
    return summary


def run_distill_bench(config: DistillBenchConfig, progress: bool = True) -> dict:
    import torch

    from distill.data import load_dataset
    from distill.evaluate import EvalConfig, Scorer, evaluate, sample_student
    from distill.models import load_student, load_teacher
    from distill.verifier import load_verifier

    say = print if progress else (lambda *a, **k: None)
    entries = [parse_entry(entry) for entry in config.methods]
    teacher, verifier = load_teacher(config.teacher), load_verifier(config.verifier)
    data = load_dataset("digits")
    scorer = Scorer(data, verifier)
    eval_config = EvalConfig(guidance_scale=config.guidance_scale)
    generator = torch.Generator().manual_seed(eval_config.seed)
    eps = torch.randn((len(data), *data.shape), generator=generator)
    say("[bench distill] teacher rows")
    teacher_rows = [r for r in evaluate(teacher, None, verifier, data, eval_config, progress=False)["rows"]]
    results = []
    for label, method in entries:
        run_dir = Path(config.runs) / label
        if run_dir.exists():
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        curve, summaries, minutes = [], [], 0.0
        for segment in range(config.segments):
            say(f"[bench distill] {label}: segment {segment + 1}/{config.segments}")
            summary = train_segment(label, method, config, run_dir, minutes)
            minutes = summary["minutes"]
            summaries.append(summary)
            student, _ = load_student(run_dir)
            samples = sample_student(student, eps, data.labels, config.guidance_scale, 1)
            fd = scorer.score(samples, data.labels)["fd_pixels"]
            curve.append({"minutes": minutes, "step": summary["step"], "fd_1nfe": fd})
        student, meta = load_student(run_dir)
        scores = {steps: scorer.score(sample_student(student, eps, data.labels, config.guidance_scale, steps),
                                      data.labels) for steps in (1, 2)}
        per_step = [s["sec_per_step"] for s in summaries if s["sec_per_step"]]
        # everything a method must hold to train: networks, optimiser states, EMA copies (the checkpoint)
        state_mb = (run_dir / "checkpoint.safetensors").stat().st_size / 2**20
        results.append({
            "method": label, "base_method": method, "steps": meta["step"], "minutes": minutes,
            "fd_1nfe": scores[1]["fd_pixels"], "fd_2nfe": scores[2]["fd_pixels"],
            "fd_feat_1nfe": scores[1]["fd_features"], "fd_feat_2nfe": scores[2]["fd_features"],
            "precision": scores[1]["precision"], "recall": scores[1]["recall"],
            "class_accuracy": scores[1]["class_accuracy"],
            "precision_2nfe": scores[2]["precision"], "recall_2nfe": scores[2]["recall"],
            "sec_per_step": round(sum(per_step) / len(per_step), 4) if per_step else None,
            "peak_rss_mb": max(s["peak_rss_mb"] for s in summaries),
            "state_mb": round(state_mb, 2),
            "method_config": meta["method_config"], "curve": curve,
        })
        say(f"  {label}: FD 1-NFE {scores[1]['fd_pixels']:.4f}, 2-NFE {scores[2]['fd_pixels']:.4f}")
    report = {"config": asdict(config), "teacher": teacher_rows, "methods": results, "num_samples": len(data),
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_report(report, config.out, _plot, render_distill_markdown)
    return report


def _plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in report["methods"]:
        curve = result["curve"]
        ax.plot([c["minutes"] for c in curve], [c["fd_1nfe"] for c in curve], marker="o", label=result["method"])
    teacher = {r["steps"]: r["fd_pixels"] for r in report["teacher"]}
    for steps, style in ((100, "-"), (4, "--")):
        if steps in teacher:
            ax.axhline(teacher[steps], color="grey", linestyle=style, label=f"teacher, {steps} steps")
    ax.set_yscale("log")
    ax.set_xlabel("training wall time (minutes, 2 CPU cores)")
    ax.set_ylabel("FD in pixels, 1 NFE")
    ax.legend(fontsize=8)
    ax.set_title("Distillation methods from one teacher, same budget")
    save_figure(fig, path)


def render_distill_markdown(report: dict, plot_name: str) -> str:
    config, methods = report["config"], report["methods"]
    teacher = {r["steps"]: r for r in report["teacher"]}
    by = {m["method"]: m for m in methods}
    lines = [
        f"# {config.get('title', 'Distillation methods side by side')}",
        "",
        f"Written by `flowmap bench distill`: every entry distils the same teacher ({config['teacher']}) and "
        f"trains for {config['minutes']:g} minutes of wall time on this machine, evaluated at guidance "
        f"{config['guidance_scale']} against all {report['num_samples']} digits (FD in pixels and in verifier "
        "features; "
        "precision/recall at k = 3 in verifier features). Peak RSS is the whole training process; training state "
        "is what the method holds besides activations: networks, optimiser states and EMA copies.",
        "",
        "| method | options | steps | s/step | peak RSS MB | state MB | FD 1-NFE | FD 2-NFE | FD feat 1-NFE "
        "| precision | recall | class acc. |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        options = " ".join(entry_settings(m["method"], config["options"])) or "-"
        lines.append(f"| {m['method']} | {options} | {m['steps']} | {m['sec_per_step']} | {m['peak_rss_mb']:.0f} "
                     f"| {m['state_mb']:.1f} "
                     f"| {m['fd_1nfe']:.4f} | {m['fd_2nfe']:.4f} | {m['fd_feat_1nfe']:.2f} | {m['precision']:.3f} "
                     f"| {m['recall']:.3f} | {m['class_accuracy']:.3f} |")
    lines += ["", "| teacher steps | FD pixels | FD features | precision | recall |", "|---:|---:|---:|---:|---:|"]
    for steps, r in sorted(teacher.items()):
        lines.append(f"| {steps} | {r['fd_pixels']:.4f} | {r['fd_features']:.2f} | {r['precision']:.3f} "
                     f"| {r['recall']:.3f} |")
    lines += ["", f"![FD against training time]({plot_name})", "", "## Against the targets", ""]
    lines += targets_text(by, teacher)
    return "\n".join(lines) + "\n"


def targets_text(by: dict, teacher: dict) -> list[str]:
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = []
    if "fsf-dmd" in by and "dmd2" in by:
        fsf, dmd = by["fsf-dmd"], by["dmd2"]
        ratio = fsf["sec_per_step"] / dmd["sec_per_step"]
        lines.append(f"- FSF-DMD time per step {fsf['sec_per_step']} s vs DMD2 {dmd['sec_per_step']} s: "
                     f"{ratio:.2f}x (target <= 0.6x): {verdict(ratio <= 0.6)}.")
        lines.append(f"- Memory, FSF-DMD vs DMD2: training state {fsf['state_mb']:.1f} vs {dmd['state_mb']:.1f} MB "
                     f"({verdict(fsf['state_mb'] < dmd['state_mb'])}); peak RSS of the process "
                     f"{fsf['peak_rss_mb']:.0f} vs {dmd['peak_rss_mb']:.0f} MB "
                     f"({verdict(fsf['peak_rss_mb'] < dmd['peak_rss_mb'])}).")
    cd = next((m for m in by.values() if m.get("base_method", m["method"]) == "meanflow"), None)
    for fsf in (m for m in by.values() if m.get("base_method", m["method"]) == "fsf-dmd"):
        if cd is None:
            break
        lines.append(f"- {fsf['method']} at 2 NFE {fsf['fd_2nfe']:.4f} vs consistency distillation ({cd['method']}) "
                     f"{cd['fd_2nfe']:.4f}: {verdict(fsf['fd_2nfe'] < cd['fd_2nfe'])}; at 1 NFE "
                     f"{fsf['fd_1nfe']:.4f} vs {cd['fd_1nfe']:.4f}.")
        if 100 in teacher:
            lines.append(f"- Goal, {fsf['method']} at 2 NFE below the teacher at 100 steps "
                         f"({teacher[100]['fd_pixels']:.4f}): {verdict(fsf['fd_2nfe'] < teacher[100]['fd_pixels'])}.")
    if 4 in teacher:
        four = teacher[4]["fd_pixels"]
        for m in by.values():
            lines.append(f"- {m['method']} at 1 NFE {m['fd_1nfe']:.4f} vs the teacher at 4 steps {four:.4f}: "
                         f"{verdict(m['fd_1nfe'] < four)}.")
    return lines
