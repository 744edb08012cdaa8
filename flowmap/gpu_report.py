"""What `flowmap bench gpu` measured, said: the issue's goals judged, the one-step and served figures as sentences
(docs/gpu.md's and the README's), the plot and the Markdown report. Not timed code: rewording the report does not
stop a lent GPU from resuming what an earlier run measured.
"""

from __future__ import annotations

from flowmap.gpu_config import DECODERS, MODES, ONE_STEP, PARTS, WHOLE_PARTS
from flowmap.reports import pyplot, save_figure
from server.torch_engine import LOW_PRECISION_TOLERANCE

# how much faster than bf16 float8 must be to pay for its larger error (docs/gpu.md's parity column)
FLOAT8_PAYS = 1.1

# public figures printed beside ours (not measured here)
ANCHORS = ("SANA-Sprint: one-step 1024 px in about 0.1 s on an H100 (Chen et al. 2025)",
           "StreamDiffusion: SD-Turbo 512 px at 106 images/s on an RTX 4090 with TensorRT (Kodaira et al. 2023)")


def measured(row: dict) -> bool:
    """A stage row timed, or skipped for a reason a rerun of its mode is not worth: the program's batch limit,
    no CUDA, a batch out of memory beside smaller ones measured (a rerun would pay the mode's whole start), a
    channels-last mode on a denoiser or a float8 one on a decoder (flowmap/gpu_stages.py times those on the decoders
    and the denoisers only)."""
    return "batch" in row or row["skipped"].startswith(("batch ", "CUDA graphs need", "out of memory at batch",
                                                        "channels-last is timed on the decoders",
                                                        "float8 is timed on the denoisers"))


def missing(report: dict) -> list[str]:
    """What the report's config asked for and it does not hold measured (a run cut off, a mode that failed)."""
    config = report["config"]
    held = {(row["model"], row["mode"]) for row in report.get("stages", []) if measured(row)}
    parts = [part for part in WHOLE_PARTS if part in config["parts"] and part not in report]
    stages = [f"{model} {mode}" for model in config["models"] for mode in config["modes"]
              if "stages" in config["parts"] and (model, mode) not in held]
    return parts + stages


def fastest_graphs(rows_by_mode: dict, dtype: str) -> tuple[float, str] | None:
    """(ms, mode) of the goal's "compiled + CUDA graphs": the fastest of its modes measured (default, channels-last,
    autotuned) in `dtype`, among one model's rows at one batch."""
    timed = [(r["ms"], mode) for mode, r in rows_by_mode.items() if MODES.get(mode, {}).get("dtype") == dtype
             and MODES[mode].get("compile") and MODES[mode].get("cuda_graphs")]
    return min(timed, default=None)


def goals(report: dict) -> dict:
    """The issue's goals: name -> {"met": bool, "measured": the figure it was judged on}."""
    out = {}

    def judge(name: str, met: bool, measured: str) -> None:
        out[name] = {"met": met, "measured": measured}

    rows = report.get("stages", [])
    for name in dict.fromkeys(r["model"] for r in rows):
        at = {r["mode"]: r for r in rows if r["model"] == name and r.get("batch") == 32}
        bf16 = fastest_graphs(at, "bfloat16")
        for eager in ("eager-fp32", "eager-bf16"):  # against fp32 (the eager) and the same precision
            if bf16 and eager in at:
                speedup = at[eager]["ms"] / bf16[0]
                judge(f"{name}: {bf16[1]} >= 2x {eager} at batch 32", speedup >= 2, f"{speedup:.2f}x")
        float8 = fastest_graphs(at, "float8")
        if float8 and bf16:  # whether float8 pays for its error: not one of the goals, judged beside them
            speedup = bf16[0] / float8[0]
            judge(f"{name}: {float8[1]} >= {FLOAT8_PAYS:g}x {bf16[1]} at batch 32", speedup >= FLOAT8_PAYS,
                  f"{speedup:.2f}x")
        mfu = [r.get("mfu", 0) for r in rows if r["model"] == name and r.get("batch") == 64 and "bf16" in r["mode"]]
        if mfu and name not in DECODERS:
            judge(f"{name}: denoiser MFU >= 40% at batch 64 in bf16", max(mfu) >= 0.4, f"{100 * max(mfu):.1f}%")
        for short in ("bf16", "fp8"):
            parity = [r["parity"] for r in rows if r["model"] == name and short in r.get("mode", "") and "parity" in r]
            if parity:
                judge(f"{name}: {short} within {LOW_PRECISION_TOLERANCE:g} of the output's scale",
                      max(parity) <= LOW_PRECISION_TOLERANCE, f"{max(parity):.3g}")
    served_run = report.get("served")
    if served_run:
        judge("served >= 0.7x the stage limit", served_run["vs_limit"] >= 0.7, f"{served_run['vs_limit']}x")
    return out


def one_step(report: dict) -> dict | None:
    """One-step text-to-image at 1024 px from the stage rows, the text encoder not among them: latency, the
    fastest mode of the denoiser and of the decoder at batch 1 (ms each and their sum), and throughput, each at
    its best batch and mode (images/s of the two in turn); None before both are measured."""
    timed = {name: [r for r in report.get("stages", []) if r["model"] == name and "batch" in r] for name in ONE_STEP}
    if not all(any(r["batch"] == 1 for r in rows) for rows in timed.values()):
        return None
    fastest = {name: min((r for r in rows if r["batch"] == 1), key=lambda r: r["ms"]) for name, rows in timed.items()}
    ms_per_image = sum(min(r["ms"] / r["batch"] for r in rows) for rows in timed.values())
    denoiser, decoder = (fastest[name] for name in ONE_STEP)
    return {"ms": round(denoiser["ms"] + decoder["ms"], 2), "images_per_s": round(1000 / ms_per_image, 2),
            **{name: {"ms": row["ms"], "mode": row["mode"]} for name, row in fastest.items()}}


def one_step_line(report: dict) -> str | None:
    """The one-step figure as a sentence (beside SANA-Sprint's at real sizes), or None before it is measured."""
    step = one_step(report)
    if step is None:
        return None
    parts = " + ".join(f"{name} {step[name]['ms']:.2f} ms ({step[name]['mode']})" for name in ONE_STEP)
    real = report["config"]["scale"] == "real"
    return (f"One step at {'1024 px' if real else 'toy sizes'}, batch 1: {parts} = **{step['ms']:.2f} ms**; at the "
            f"best batch of each, **{step['images_per_s']} images/s** (without the text encoder, which the server "
            "skips for a cached prompt)" + ("; SANA-Sprint's one step is about 100 ms on an H100." if real else "."))


def statuses(counts: dict) -> str:
    """HTTP statuses and their counts, as `200: 4356, 429: 3` (a report read back from JSON keys them by string)."""
    return ", ".join(f"{status}: {count}" for status, count in sorted(counts.items(), key=lambda item: int(item[0])))


def served_line(report: dict) -> str | None:
    """The served figure as a sentence (the report's and the README's), or None before it is measured."""
    served = report.get("served")
    if not served:
        return None
    # a report from before --served-bundle named only its SiT size
    bundle = served.get("bundle") or f"SiT-{served['denoiser']} + SD-VAE, 256 px"
    clients = served.get("clients") or report["config"]["served_clients"]  # a report before the default was 0
    return (f"Served over HTTP ({bundle} bundle, {clients} clients of one-image jpeg "
            f"requests, `{' '.join(served['flags'])}`): {served['images_per_s']} images/s, p50 {served['p50_ms']} ms, "
            f"statuses {statuses(served['statuses'])}; its student and decoder allow "
            f"{served['limit_images_per_s']} images/s at their largest batch: served {served['vs_limit']}x that limit.")


def encoded_clause(served: dict) -> str:
    """Which encoder made the served images (recorded since JPEG below --gpu-jpeg-min-side goes to the CPU)."""
    names = {"nvjpeg": "nvJPEG on the GPU", "cpu": "the CPU"}
    counts = served.get("images_encoded")
    if not counts:
        return ""
    return "; images encoded by " + ", ".join(f"{names.get(encoder, encoder)} {count}"
                                             for encoder, count in counts.items())


def padding_clause(use: dict) -> str:
    """' (+N padding)' where an engine padded its batches up to its buckets (recorded since the bucket split)."""
    return f" (+{use['padding_per_batch']} padding)" if use.get("padding_per_batch") else ""


def waits_clause(served: dict) -> str:
    """Where the encode stage's time went, how late the event loop ran, and the server's CPU (recorded since the
    encode stage held a request about 700 ms whichever encoder served it)."""
    steps = {"wait": "waiting for an encode thread", "copy": "making 8-bit pixels on the host", "encode": "encoding"}
    clauses = []
    if served.get("encode_threads"):  # recorded since the server chose them by device
        clauses.append(f"{served['encode_threads']} encode threads, the GIL handed over every "
                       f"{served['gil_switch_interval_ms']:g} ms")
    if served.get("encode_ms_per_request"):
        clauses.append("the encode stage's ms a request: " + ", ".join(
            f"{steps[step]} {ms}" for step, ms in served["encode_ms_per_request"].items()))
    if served.get("loop_lag_ms") is not None:
        clauses.append(f"the event loop woke {served['loop_lag_ms']} ms late on average")
    if served.get("cpu_cores"):
        cores = served["cpu_cores"]
        clauses.append(f"the server's threads kept {cores['process']} cores busy, its event loop "
                       f"{cores['event_loop']}")
    return "".join(f"; {clause}" for clause in clauses)


def timed_by_other_code(report: dict, versions: dict[str, str]) -> list[str]:
    """The parts `report` holds figures of that code other than `versions` (each part's) timed: a report from before
    parts had versions of their own was timed by other code in every part."""
    recorded = report.get("code") if isinstance(report.get("code"), dict) else {}
    held = [part for part in PARTS if (report.get("stages") if part == "stages" else part in report)]
    return [part for part in held if recorded.get(part) != versions[part]]


def code_line(versions) -> str:
    """The timed code's versions: one per part (an older report has one for all, or none)."""
    if isinstance(versions, dict):
        return ", ".join(f"{part} {version}" for part, version in versions.items())
    return versions or "unrecorded"


def plot(report: dict, path) -> None:
    plt = pyplot()
    models = sorted({r["model"] for r in report.get("stages", []) if "batch" in r})
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5 * max(1, len(models)), 3.8), squeeze=False)
    for ax, name in zip(axes[0], models, strict=False):
        for mode in MODES:
            rows = [r for r in report["stages"] if r["model"] == name and r.get("mode") == mode and "batch" in r]
            if rows:
                ax.plot([r["batch"] for r in rows], [r["images_per_s"] for r in rows], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("images/s")
        ax.set_title(name)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def to_markdown(report: dict, plot_name: str) -> str:
    config = report["config"]
    lines = ["# The torch backend on a GPU", "",
             f"Written by `flowmap bench gpu` on **{report['device_name']}** (torch {report['torch']}, timed code "
             f"{code_line(report.get('code'))}, device "
             f"`{config['device']}`, {config['scale']} sizes, random weights). Times are the serving engine's "
             "own (server/torch_engine.py: numpy in, numpy out, host copies included).", ""]
    if "peak" in report:
        peak = report["peak"]
        lines += [f"Matrix-product peak measured in this run: {peak['tflops']:.1f} TFLOP/s ({peak['dtype']}, "
                  f"{peak['side']}^3); MFU below is against it, the float8 modes' too (a Hopper's float8 "
                  "peak is twice its bf16 one).", ""]
    if report.get("stages"):
        lines += [f"![images/s by batch]({plot_name})", "",
                  "| model | mode | batch | ms | images/s | MFU | parity | start s | start GiB | restart s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["stages"]:
            if "skipped" in r:
                lines.append(f"| {r['model']} | {r['mode']} | - | skipped: {r['skipped']} | | | | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
            lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['ms']:.2f} | {r['images_per_s']:.1f} | "
                         f"{mfu} | {r['parity']:.3g} | {r['start_s']} | {r.get('start_gib') or '-'} | "
                         f"{r.get('restart_s', '-')} |")
        lines += ["", "start s: the engine's start in this process (load, parity check, and for the compiled modes a "
                  "cold compile of every bucket); start GiB: the most GPU memory that start held (weights, parity "
                  "check, and every bucket's warm-up in the compiled and graph modes); restart s: a new process "
                  "starting it again from the compile cache the first start filled (`--torch-compile-cache`); "
                  "parity: the low-precision output's largest error against float32, relative to the output's "
                  "largest value.", ""]
    if report.get("jpeg"):
        lines += ["| JPEG q90 | side | ms per image |", "|---|---:|---:|"]
        lines += [f"| {r['encoder']} | {r['side']} | {r.get('ms_per_image', r.get('skipped'))} |"
                  for r in report["jpeg"]]
        lines += ["", "Each encoder as the server runs it: nvJPEG through torchvision with 4:4:4 chroma (torchvision "
                  "fixes it), simplejpeg with 4:2:0, so the GPU's files are the larger.", ""]
    if report.get("served"):
        s = report["served"]
        lines += [served_line(report), ""]
        if s.get("engines"):  # recorded since the first served run on a GPU (0.504x) left its cause unknown
            lines += ["Where the load's time went (the server's /metrics over the load and its warm-up): " + "; ".join(
                f"{name}: {use['batches']} batches of {use['rows_per_batch']} rows{padding_clause(use)} on average, "
                f"computing {100 * use['busy']:.0f}% of the time" for name, use in s["engines"].items())
                + "; ms a request spent in each stage, queue waits included: " + ", ".join(
                f"{stage} {ms}" for stage, ms in s["stage_ms_per_request"].items())
                + encoded_clause(s) + waits_clause(s) + ".", ""]
        if s.get("in_step"):
            step = s["in_step"]
            lines += [f"The same server with {step['clients']} clients, as many as one batch holds (they move "
                      f"through the stages in step): {step['images_per_s']} images/s, p50 {step['p50_ms']} ms, "
                      f"{step['vs_limit']}x the limit; " + "; ".join(
                          f"{name}: batches of {use['rows_per_batch']} rows on average"
                          for name, use in step["engines"].items()) + ".", ""]
    step = one_step_line(report)
    if step:
        lines += [step, ""]
    lines += ["Public anchors (not measured here):", "", *[f"- {anchor}" for anchor in report["anchors"]], ""]
    runs = report.get("runs", [])
    if len(runs) > 1:
        lines += [f"Measured in {len(runs)} runs of `flowmap bench gpu` on this card, each with `--resume` after the "
                  "first: a run keeps what the earlier ones measured and runs only what they lack.", ""]
    lacking = missing(report)
    if lacking:
        lines += [f"Not measured (cut off by the run's time limit, or failed above): {', '.join(lacking)}.", ""]
    if report.get("errors"):
        lines += ["Parts that failed in this run:", "", *[f"- {error}" for error in report["errors"]], ""]
    if report["goals"]:
        lines += ["| goal | measured | met |", "|---|---:|---|",
                  *[f"| {goal} | {judged['measured']} | {'yes' if judged['met'] else 'no'} |"
                    for goal, judged in report["goals"].items()]]
    return "\n".join(lines) + "\n"
