"""`flowmap bench gpu`: the torch serving backend at real sizes on a CUDA GPU, random weights.

Models (flowmap/gpu_stages.py): a SiT-XL/2-shape denoiser on 4x32x32 latents and the SD-VAE decoder
(256 px), and a SANA-like 1024 px denoiser (SANA-600M's shape on 32x32x32 DC-AE latents, 300 text tokens)
with SANA's DC-AE decoder (f32c32, 1024 px). Each is exported to a torch.export program and run through the serving
engine itself (server/torch_engine.py: numpy in, numpy out, host copies included) at each batch size:
eager float32, eager bfloat16, bfloat16 replayed as hand-captured CUDA graphs, compiled, and compiled
with CUDA graphs. Beside them: the card's measured bf16 matmul peak, each denoiser's MFU against it,
one step at 1024 px against SANA-Sprint's figure, JPEG on the GPU (nvJPEG) against the CPU encoder,
and a latent bundle served over HTTP with the batcher against the limit its stage costs allow
(flowmap/gpu_served.py). `--scale tiny --device cpu` runs the same code on toy sizes (CI does). Writes
docs/gpu.{md,json,png} (flowmap/gpu_report.py) after every mode and part; `--resume` goes on from what an earlier
run on the same card wrote, keeping each part measured with the code this run would time it with.
"""

from __future__ import annotations

import platform
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from flowmap.gpu_config import MODELS, MODES, PARTS, WHOLE_PARTS, GpuBenchConfig
from flowmap.gpu_report import ANCHORS, goals, measured, plot, timed_by_other_code, to_markdown
from flowmap.gpu_served import jpeg_rows, servable_bundle, served, served_clients
from flowmap.gpu_stages import matmul_peak, stage_rows
from flowmap.provenance import code_version
from flowmap.reports import write_report

# each part's figures change with the code these modules import (within the repository, transitively): the engines
# and models for the peak and stages, the whole server for the served part; a resumed report keeps a part only if
# that code is the same
TIMED_MODULES = {"peak": ("flowmap.gpu_stages",), "stages": ("flowmap.gpu_stages",), "jpeg": ("flowmap.gpu_served",),
                 "served": ("flowmap.gpu_served", "server.main")}  # the server's process runs server.main
# and with these files alone: the served server starts through `flowmap serve` (its flags to settings), whose
# module imports every other command's code too
TIMED_FILES = {"served": ("flowmap/cli.py",)}


def code_versions() -> dict[str, str]:
    """Each part's timed code's version (flowmap/provenance.py)."""
    return {part: code_version(modules, TIMED_FILES.get(part, ())) for part, modules in TIMED_MODULES.items()}


def run_gpu_bench(config: GpuBenchConfig) -> dict:
    import torch

    for flag, given, known in (("models", config.models, MODELS), ("modes", config.modes, tuple(MODES)),
                               ("parts", config.parts, PARTS), ("scale", (config.scale,), ("real", "tiny"))):
        unknown = [name for name in given if name not in known]
        if unknown:
            raise ValueError(f"--{flag}: unknown {unknown[0]!r}; choose from {', '.join(known)}")
    if config.served_bundle and "served" in config.parts:
        servable_bundle(config.served_bundle)  # refused now, not after the other parts
    if config.cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}, but torch {torch.__version__} sees no CUDA GPU; "
                         "`--device cpu --scale tiny` runs the same code at toy sizes")

    started = time.perf_counter()

    def say(text: str) -> None:  # with the seconds since the start: what the next run's time limits are sized by
        print(f"{text} (+{time.perf_counter() - started:.0f} s)")

    report = {"config": asdict(config), "anchors": list(ANCHORS), "torch": torch.__version__, "code": code_versions(),
              "device_name": torch.cuda.get_device_name() if config.cuda else
              (platform.processor() or platform.machine()), "cpus": torch.get_num_threads(), "errors": []}
    done: set[str] = set()
    if config.resume and Path(config.out).with_suffix(".json").is_file():
        report, done, other_code = resumed(report, config)
        say(f"[bench gpu] resuming {config.out}.json: keeping {', '.join(sorted(done)) or 'nothing'}; measuring again "
            f"the parts timed by other code: {', '.join(other_code) or 'none'} (each part's code: {report['code']})")
    def save() -> None:  # after every mode and part: a run cut off by its time limit keeps its figures
        report["goals"] = goals(report)
        write_report(report, config.out, plot, to_markdown)

    def keep(rows: list[dict]) -> None:  # a model's rows, as each of its modes ends
        report.setdefault("stages", []).extend(rows)
        save()

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)

        parts = {"peak": [("peak", lambda: report.update(peak=matmul_peak(config)))],
                 "jpeg": [("jpeg", lambda: report.update(jpeg=jpeg_rows(config)))],
                 "stages": [(f"stages {name}", lambda name=name, modes=modes: stage_rows(
                     name, modes, config, folder, report.get("peak", {}).get("tflops"), say, keep))
                            for name in config.models
                            if (modes := [m for m in config.modes if f"stages {name} {m}" not in done])],
                 "served": [("served", lambda: report.update(served=served(config, folder / "served", say)))]}
        steps = [step for part in config.parts for step in parts[part]]  # in the order --parts names them
        for step, run in steps:
            if step in done:
                continue
            try:
                run()
            except Exception as err:  # one part failing on a lent GPU must not cost the others' figures
                report["errors"].append(f"{step}: {type(err).__name__}: {str(err)[:300]}")
                say(f"[bench gpu] {step} failed: {traceback.format_exc()}")
            save()
            say(f"[bench gpu] {step} done")
    if report["errors"]:
        raise RuntimeError("; ".join(report["errors"]))
    return report


def resumed(fresh: dict, config: GpuBenchConfig) -> tuple[dict, set[str], list[str]]:
    """(report, what it already holds: "peak", "jpeg", "served", "stages MODEL MODE", the parts it holds that other
    code timed) from an earlier run's OUT.json on the same card and torch: what it measured with the code this run
    times each part with stays, what failed, is missing or was timed by other code runs again."""
    import json

    earlier = json.loads(Path(config.out).with_suffix(".json").read_text())
    for key in ("device_name", "torch"):
        if earlier.get(key) != fresh[key]:
            raise ValueError(f"--resume: {config.out}.json was measured with {key} {earlier.get(key)!r}, this run has "
                             f"{fresh[key]!r}; timings from two setups do not go in one report")
    other_code = timed_by_other_code(earlier, fresh["code"])
    failed = {error.split(":")[0] for error in earlier.get("errors", [])}
    stages = [row for row in earlier.get("stages", []) if "stages" not in other_code
              and f"stages {row['model']}" not in failed and measured(row)]
    def served_as(run: dict) -> tuple:  # a served figure stands only for the bundle and load it was measured with
        bundle, batch = run.get("served_bundle", ""), max(run["batches"])
        return (str(Path(bundle).resolve()) if bundle else "", run.get("served_denoiser"), batch,
                served_clients(run["served_clients"], batch))

    done = {f"stages {row['model']} {row['mode']}" for row in stages} | {
        part for part in WHOLE_PARTS if part in earlier and part not in other_code and part not in failed
        and (part != "served" or served_as(earlier["config"]) == served_as(asdict(config)))}
    runs = earlier.get("runs", [earlier["config"]])
    kept = {key: value for key, value in earlier.items() if key not in WHOLE_PARTS or key in done}
    return {**kept, "code": fresh["code"], "config": asdict(config), "runs": [*runs, asdict(config)],
            "stages": stages, "errors": []}, done, [part for part in other_code if part in config.parts]
