"""Regenerate the README's result tables from the files the pipeline and the benchmarks wrote, so no
figure in the README is typed by hand: models/digits/manifest.json, docs/pipeline.json,
docs/distillation.json, docs/fsf_dmd_study.json, docs/serving.json, docs/overload.json, docs/recipe.json,
docs/stages.json, docs/search.json, docs/shapes_pipeline.json and docs/gpu.json,
and the settings table from server/settings.py. Blocks sit between `<!-- begin:NAME -->` and
`<!-- end:NAME -->` markers."""

from __future__ import annotations

import json
import re
from pathlib import Path

from flowmap.bench_distill import entry_settings


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _guidance(config: dict) -> float:
    """The guidance scale a report's config records (reports written before the rename say cfg_scale)."""
    return config["guidance_scale"] if "guidance_scale" in config else config["cfg_scale"]


def distill_block(root: Path) -> str:
    manifest = _load(root / "models" / "digits" / "manifest.json")
    pipeline = _load(root / "docs" / "pipeline.json")
    if manifest is None or not manifest.get("provenance", {}).get("metrics"):
        return "_No bundle yet: run `make models`._"
    metrics = manifest["provenance"]["metrics"]
    rows = metrics["rows"]
    ref = next(r for r in rows if r["model"] == "teacher" and r["steps"] == metrics["config"]["reference_steps"])
    lines = [
        f"FreeFlow student of the embedded `digits` bundle against its teacher, guidance w = "
        f"{_guidance(metrics['config'])}, {metrics['num_samples']} samples, FD against all of the data "
        "(from `models/digits/manifest.json`, written by `make models`):",
        "",
        "| model | steps (NFE) | FD pixels | vs teacher@100 | FD features | precision | recall | class acc. "
        "| RMSE to teacher@100 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['fd_pixels']:.3f} | {r['fd_pixels'] / ref['fd_pixels']:.2f}x "
                     f"| {r['fd_features']:.1f} | {r['precision']:.3f} | {r['recall']:.3f} "
                     f"| {r['class_accuracy']:.3f} | {r['alignment_rmse']:.3f} |")
    if pipeline:
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in pipeline["stage_seconds"].items())
        lines += ["", f"The whole pipeline took {pipeline['total_minutes']:.1f} minutes on the benchmark machine's "
                      f"{pipeline['torch_threads']} CPU threads ({stages}); see [docs/pipeline.md](docs/pipeline.md)."]
    return "\n".join(lines)


def methods_block(root: Path) -> str:
    report = _load(root / "docs" / "distillation.json")
    if report is None:
        return "_No method comparison yet: run `flowmap bench distill`._"
    config = report["config"]
    teacher = {r["steps"]: r["fd_pixels"] for r in report["teacher"]}
    lines = [
        f"Every method from the same teacher, {config['minutes']:g} minutes of wall time each on the benchmark "
        "machine, "
        f"guidance w = {_guidance(config)} (from [docs/distillation.md](docs/distillation.md), written by "
        "`flowmap bench distill`). Teacher FD in pixels: "
        + ", ".join(f"{steps} steps {fd:.3f}" for steps, fd in sorted(teacher.items())) + ".",
        "",
        *_methods_table(report, teacher[4]),
    ]
    study = _load(root / "docs" / "fsf_dmd_study.json")
    if study is not None:
        lines += ["", f"FSF-DMD's settings, each run for {study['config']['minutes']:g} minutes from the same "
                      "consistency-distilled flow map (from [docs/fsf_dmd_study.md](docs/fsf_dmd_study.md)):", "",
                  *_methods_table(study, teacher[4])]
    return "\n".join(lines)


def _methods_table(report: dict, teacher_4_steps: float) -> list[str]:
    lines = ["| method | options | steps | s/step | FD 1-NFE | FD 2-NFE | 1-NFE below teacher@4 |",
             "|---|---|---:|---:|---:|---:|---|"]
    for m in report["methods"]:
        # every study entry starts from the same init, which the text above names
        options = " ".join(o for o in entry_settings(m["method"], report["config"]["options"])
                           if not o.startswith("init=")) or "-"
        below = "yes" if m["fd_1nfe"] < teacher_4_steps else "**no**"
        lines.append(f"| {m['method']} | {options} | {m['steps']} | {m['sec_per_step']} | {m['fd_1nfe']:.3f} "
                     f"| {m['fd_2nfe']:.3f} | {below} |")
    return lines


def serving_block(root: Path) -> str:
    report = _load(root / "docs" / "serving.json")
    if report is None:
        return "_No serving benchmark yet: run `make bench`._"
    ratios, raw = report["ratios"], report["raw_engine"]
    best = max(report["curves"]["batching"], key=lambda r: r["images_per_s"])
    steps = report["config"]["teacher_steps"]
    return "\n".join([
        f"Measured by `flowmap bench serve` on {report['machine']['cpus']} CPU cores, load generator included "
        "(from [docs/serving.md](docs/serving.md)):",
        "",
        "| figure | measured | target |",
        "|---|---:|---:|",
        f"| batching vs batch-1 serving, 64 single-image clients | {ratios['batching_vs_batch1_at_64_clients']}x "
        "| >= 3x |",
        f"| 16-image requests served vs the raw engine at saturation | "
        f"{ratios['sixteen_image_served_vs_raw_engine']}x | >= 0.8x |",
        f"| student 1-NFE vs teacher {steps} steps, served | {ratios['student_vs_teacher_served']}x | >= 100x |",
        f"| best single-image throughput | {best['images_per_s']:.0f} images/s at {best['clients']} clients "
        f"(p99 {best['p99_ms']:.1f} ms) | |",
        f"| raw engine (onnxruntime, in process) | {raw['student_saturation_images_per_s']:.0f} images/s | |",
    ])


def overload_block(root: Path) -> str:
    report = _load(root / "docs" / "overload.json")
    if report is None:
        return "_No overload benchmark yet: run `make bench`._"
    config, checks = report["config"], report["checks"]
    honour, at_once = checks["overload_honouring_retry_after"], checks["overload_retrying_at_once"]
    teacher = report["phases"]["overload_with_teacher"]["teacher"]
    return "\n".join([
        f"Measured by `flowmap bench overload`: {config['overload_clients']} clients against a server that keeps up "
        f"with {config['capacity_clients']}, {config['images']}-image {config['steps']}-step requests, "
        f"`--max-queue-size {config['max_queue_size']}` (from [docs/overload.md](docs/overload.md)):",
        "",
        "| figure | measured | target |",
        "|---|---:|---:|",
        f"| capacity at {config['capacity_clients']} clients | {report['capacity_images_per_s']:.0f} images/s | |",
        f"| goodput under 4x overload, clients retrying at once | {at_once['goodput_vs_capacity']}x | >= 0.8x |",
        f"| goodput under 4x overload, clients honouring Retry-After | {honour['goodput_vs_capacity']}x | >= 0.8x |",
        f"| every answer 200, or 429 with Retry-After | "
        f"{'yes' if all(c['only_200_or_429_with_retry_hint'] for c in checks.values()) else 'no'} | yes |",
        f"| teacher requests mixed into the overload, answered 200 | "
        f"{checks['overload_with_teacher']['teacher_completed']} of {teacher['requests']} | all |",
    ])


def recipe_block(root: Path) -> str:
    from flowmap.bench_recipe import checkpointing_lines, recipe_table

    report = _load(root / "docs" / "recipe.json")
    if report is None:
        return "_No recipe timings yet: run `make bench-recipe`._"
    return "\n".join([
        f"Seconds per training step on the benchmark machine's {report['machine']['cpus']} CPU cores, "
        f"{report['data']['name']} "
        f"{report['data']['shape']}, batch {report['config']['batch_size']}, and the time of a full run (from "
        "[docs/recipe.md](docs/recipe.md), written by `flowmap bench recipe`; pass `--data your.npz` to time your "
        "own):",
        "",
        *recipe_table(report),
        *(["", *checkpointing_lines(report, heading=False)] if report.get("checkpointing") else []),
    ])


def stages_block(root: Path) -> str:
    from flowmap.bench_stages import stage_table, text_served_table

    report = _load(root / "docs" / "stages.json")
    if report is None:
        return "_No stage costs yet: run `make bench-stages`._"
    limit, served = report["limit"], report["served"]
    lines = [f"Measured by `flowmap bench stages` on {report['machine']['cpus']} CPU cores, random weights of the real "
             "shapes, ms per image, each stage in a fresh process (from [docs/stages.md](docs/stages.md)):", "",
             *stage_table(report)]
    jpeg = min(r["ms_per_image"] for r in report["encoders"] if r["side"] == 256 and r["encoder"].startswith("jpeg")
               and not r["grey"])
    png = min(r["ms_per_image"] for r in report["encoders"] if r["side"] == 256 and r["encoder"].startswith("png")
              and not r["grey"])
    lines += ["", f"Encoding a 256 px image: jpeg {jpeg} ms, png {png} ms. A SiT-S/2 + tiny-decoder bundle served "
                  f"over HTTP: {served['images_per_s']} images/s, {limit['served_vs_limit']}x the "
                  f"{limit['images_per_s']} images/s its stage costs allow (goal >= 0.8x)."]
    runs = report.get("text_served") or {}
    if runs:
        lines += ["", "A text bundle with CLIP-L and T5-large encoders, one image a request (from docs/stages.md):", "",
                  *text_served_table(report)]
    return "\n".join(lines)


def search_block(root: Path) -> str:
    from flowmap.bench_search import cell

    report = _load(root / "docs" / "search.json")
    if report is None:
        return "_No search benchmark yet: run `make bench-search`._"
    lines = ["Measured by `flowmap bench search` (from [docs/search.md](docs/search.md), which has every budget, "
             "each category and the plot); oracle accuracy, mean [95% interval over prompts]:"]
    for task in report["tasks"]:
        largest = max(r["budget"] for r in task["results"])
        # one teacher sample, one student sample, the student's best of one teacher sample's NFE, every method at
        # the largest budget
        picked = [r for r in task["results"] if r["method"] == "a" or r["budget"] == largest
                  or (r["method"] == "d" and (r["nfe"] == 1 or r["budget"] == 1))]
        spatial = "spatial" in task["categories"]
        earlier = ", from an earlier run of the benchmark" if task.get("kept_from_an_earlier_run") else ""
        lines += ["", f"**{task['name']}**, guidance {task['guidance_scale']:g}, {task['units']} searches "
                  f"({task['prompts']} {'held-out prompts' if spatial else 'classes'}{earlier}):", "",
                  "| method | NFE | verifier calls | accuracy | " + ("spatial | " if spatial else "")
                  + "gain over (a) |",
                  "|---|---:|---:|---|" + ("---|" if spatial else "") + "---|"]
        for r in picked:
            label = "one student sample" if r["method"] == "d" and r["nfe"] == 1 else r["label"]
            lines.append(f"| ({r['method']}) {label} | {r['nfe']:g} | {r['verifier_calls']} | "
                         f"{cell(r['overall'])} | "
                         + (f"{cell(r['spatial'])} | " if spatial else "") + f"{cell(r['overall_gain'])} |")
        transfer = cell(task["noise_transfer"]["spearman"])
        extras = ["(c) minus (b) at equal NFE " + ", ".join(f"{c['nfe']}: {cell(c['overall_c_minus_b'])}"
                                                         for c in task["c_vs_b"]),
                  f"noise transfer (Spearman, student vs teacher score of a noise) {transfer}"]
        if spatial:  # the goal's reading: each search's paired spatial gain over one teacher sample
            gains = {r["method"]: r for r in task["results"] if r["budget"] == largest and r["method"] in "bc"}
            extras.append(f"paired spatial gain over one teacher sample at {gains['b']['nfe']:g} NFE: (b) "
                          f"{cell(gains['b']['spatial_gain'])}, (c) {cell(gains['c']['spatial_gain'])}")
        if "fd" in task["notes"]:
            fd = task["notes"]["fd"]
            extras.append(f"1-NFE student FD {fd['student_1nfe']:.2f} against the teacher's {fd['teacher']:.2f} "
                          f"({fd['ratio']:.2f}x)")
        lines += ["", "; ".join(extras) + "."]
    lines += ["", "| goal | met |", "|---|---|", *(f"| {goal} | {'yes' if met else '**no**'} |"
                                                 for goal, met in report["goals"].items())]
    pipeline = _load(root / "docs" / "shapes_pipeline.json")
    if pipeline:
        stages = ", ".join(f"{k} {v / 60:.1f} min" for k, v in pipeline["stage_seconds"].items())
        student = pipeline["student"]
        resumed = student.get("steps_this_run", student["step"]) < student["step"]  # a rerun resumed its student
        lead = (f"The last run of the shapes pipeline resumed what earlier runs had trained (its student's "
                f"{student['step']} steps among them) and took" if resumed else "The shapes models took")
        how = "" if resumed else " to train and export"
        whole = " (a run from nothing trains for far longer: the Makefile's `models` target says how long)" \
            if resumed else ""
        lines += ["", f"{lead} {pipeline['total_minutes']:.1f} minutes{how} on the benchmark machine's "
                      f"{pipeline['torch_threads']} CPU threads ({stages}; [docs/shapes_pipeline.md]"
                      f"(docs/shapes_pipeline.md)){whole}."]
    return "\n".join(lines)


def gpu_block(root: Path) -> str:
    from flowmap.bench_gpu import TIMED_FILES, TIMED_MODULES, code_versions
    from flowmap.gpu_report import missing, one_step_line, served_line, timed_by_other_code

    report = _load(root / "docs" / "gpu.json")
    if report is None:
        return "_Not measured on a GPU yet: run `scripts/gpu_check.sh` on one._"
    rows = [r for r in report.get("stages", []) if "batch" in r]
    tflops = report.get("peak", {}).get("tflops")  # a run cut off before its peak, or resumed without it, has none
    peak = f"bf16 matmul peak measured {tflops:.0f} TFLOP/s; " if tflops else ""
    lines = [f"Measured by `flowmap bench gpu` on one **{report['device_name']}** (torch {report['torch']}, random "
             f"weights of the real shapes, the serving engine's own ms with host copies; {peak}from "
             "[docs/gpu.md](docs/gpu.md)), images/s by batch:", "",
             "| model | mode | batch 1 | batch 8 | batch 32 | batch 64 | MFU at the largest |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows if r["model"] == model):
            at = {r["batch"]: r for r in rows if r["model"] == model and r["mode"] == mode}
            largest = at[max(at)]
            lines.append(f"| {model} | {mode} | " + " | ".join(
                f"{at[b]['images_per_s']:.0f}" if b in at else "-" for b in (1, 8, 32, 64))
                + (f" | {100 * largest['mfu']:.0f}% |" if "mfu" in largest else " | - |"))
    jpeg = {(r["encoder"], r["side"]): r["ms_per_image"] for r in report.get("jpeg", []) if "ms_per_image" in r}
    if jpeg:  # each side with the encoders that ran (nvJPEG is skipped without torchvision)
        encoders = {"nvjpeg (torchvision)": "nvJPEG", "simplejpeg (cpu)": "simplejpeg on the CPU"}
        lines += ["", "JPEG q90, ms per image: " + "; ".join(
            f"{side} px: " + ", ".join(f"{label} {jpeg[(encoder, side)]}" for encoder, label in encoders.items()
                                       if (encoder, side) in jpeg)
            for side in sorted({side for _, side in jpeg})) + "."]
    served = served_line(report)
    if served:
        lines += ["", served]
    step = one_step_line(report)
    if step:
        lines += ["", step]
    lacking = missing(report)
    if lacking:
        lines += ["", "Not measured yet (cut off by the device time, or failed): " + ", ".join(lacking) + "."]
    changed = timed_by_other_code(report, code_versions())
    if changed:
        code = {part: ", ".join(TIMED_MODULES[part]) + ", with their imports"
                + "".join(f", and {name}" for name in TIMED_FILES.get(part, ())) for part in changed}
        lines += ["", "Measured with an earlier version of the code that times " + ", ".join(
            f"{part} ({code[part]})" for part in changed)
            + ": the next `scripts/gpu_check.sh` measures these parts again, and resumes from the others."]
    lines += ["", "| goal | measured | met |", "|---|---:|---|",
              *(f"| {goal} | {judged['measured']} | {'yes' if judged['met'] else '**no**'} |"
                for goal, judged in report["goals"].items())]
    return "\n".join(lines)


def settings_block(root: Path) -> str:
    from server.settings import Settings

    lines = ["| setting | flag | default | what it does |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        lines.append(f"| `FLOWMAP_{name.upper()}` | `--{name.replace('_', '-')}` | `{shown}` | "
                     f"{field.description} |")
    return "\n".join(lines)


BLOCKS = {"distill-results": distill_block, "methods-results": methods_block, "serving-results": serving_block,
          "overload-results": overload_block, "recipe-results": recipe_block, "stages-results": stages_block,
          "search-results": search_block, "gpu-results": gpu_block, "settings": settings_block}


def update_readme(root: str | Path = ".") -> bool:
    """Rewrite the generated blocks of README.md; returns whether anything changed."""
    root = Path(root)
    readme = root / "README.md"
    text = original = readme.read_text()
    for name, render in BLOCKS.items():
        pattern = re.compile(rf"(<!-- begin:{name} -->\n).*?(\n<!-- end:{name} -->)", re.S)
        text = pattern.sub(lambda m, r=render: m.group(1) + r(root) + m.group(2), text)
    if text != original:
        readme.write_text(text)
    return text != original


def rendered(root: str | Path = ".") -> dict[str, str]:
    """What each block should hold now (tests compare this with the README)."""
    return {name: render(Path(root)) for name, render in BLOCKS.items()}
