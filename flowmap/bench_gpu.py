"""`flowmap bench gpu`: the torch serving backend at real sizes on a CUDA GPU, random weights.

Models (flowmap/gpu_stages.py): a SiT-XL/2-shape denoiser on 4x32x32 latents and the SD-VAE decoder
(256 px), and a SANA-like 1024 px denoiser (SANA-600M's shape on 32x32x32 DC-AE latents, 300 text tokens)
with SANA's DC-AE decoder (f32c32, 1024 px). Each is exported to a torch.export program and run through the serving
engine itself (server/torch_engine.py: numpy in, numpy out, host copies included) at each batch size:
eager float32, eager bfloat16, bfloat16 replayed as hand-captured CUDA graphs, compiled, and compiled
with CUDA graphs. Beside them: the card's measured bf16 matmul peak, each denoiser's MFU against it,
one step at 1024 px against SANA-Sprint's figure, JPEG on the GPU (nvJPEG) against the CPU encoder,
and a latent bundle served over HTTP with the batcher against the limit its stage costs allow.
`--scale tiny --device cpu` runs the same code on toy sizes (CI does). Writes docs/gpu.{md,json,png}
(flowmap/gpu_report.py) after every mode and part; `--resume` goes on from what an earlier run on the same card
and timed code wrote.
"""

from __future__ import annotations

import asyncio
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flowmap.bench_stages import stage_ms, timed_ms
from flowmap.gpu_report import ANCHORS, PARTS, WHOLE_PARTS, goals, measured, plot, to_markdown
from flowmap.gpu_stages import MODELS, MODES, flops_per_image, model, sd_vae
from flowmap.reports import write_report
from server.encoding import ENCODE_STEPS

# the code whose changes change the timings (the engines, the server the served part runs, SiT's network, the timing
# loops and the bundle it builds): a resumed report must have been measured with the same
TIMED_CODE = ("server/", "distill/nets.py", "export/programs.py", "export/decoder.py", "flowmap/bench_gpu.py",
              "flowmap/gpu_stages.py", "flowmap/bench_stages.py", "flowmap/loadgen.py")


def code_version() -> str:
    """The first 12 hex digits of the sha256 of TIMED_CODE's Python files (a GPU machine's copy has no git)."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in TIMED_CODE:
        for path in sorted((root / name).glob("*.py")) if name.endswith("/") else [root / name]:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@dataclass
class GpuBenchConfig:
    device: str = "cuda"  # "cpu" runs the same code (with --scale tiny: what CI checks)
    scale: str = "real"  # "real" sizes, or "tiny" toy shapes
    models: tuple[str, ...] = MODELS
    batches: tuple[int, ...] = (1, 8, 32, 64)
    modes: tuple[str, ...] = tuple(MODES)
    repeats: int = 10  # timed runs per point, after the warm-up
    restart: bool = True  # compiled modes: also start the engine in a new process from the compile cache
    jpeg_sides: tuple[int, ...] = (256, 1024)
    jpeg_images: int = 16
    served_denoiser: str = "B/2"  # the SiT size of the served latent bundle (with the SD-VAE decoder)
    # 0: twice the largest batch, so a full batch waits while another computes (as many clients as one batch holds
    # move through the stages in step, and the student's batcher takes them in two halves: measured on a CPU)
    served_clients: int = 0
    served_seconds: float = 20.0
    # serve this latent bundle (class or text; exported with --torch-programs) instead of building a random one
    served_bundle: str = ""
    parts: tuple[str, ...] = PARTS  # run in the order given; by default the quick ones first
    out: str = "docs/gpu"
    resume: bool = False  # keep what OUT.json measured on this card and code, run only the parts and models it lacks

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def synchronise(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(config: GpuBenchConfig) -> dict:
    """TFLOP/s of one large bf16 matrix product, mean of the timed runs: what every mode's MFU is against (a
    CPU too: against an fp32 peak, its bf16 rows would pass 100%)."""
    import torch

    side = (8192 if config.cuda else 2048) if config.scale == "real" else 1024
    dtype = torch.bfloat16
    a, b = (torch.randn(side, side, device=config.device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronise(config.device)
    tick = time.perf_counter()
    for _ in range(config.repeats):
        a @ b
    synchronise(config.device)
    seconds = (time.perf_counter() - tick) / config.repeats
    return {"tflops": 2 * side ** 3 / seconds / 1e12, "side": side, "dtype": str(dtype).replace("torch.", "")}


def stage_rows(name: str, modes: list[str], config: GpuBenchConfig, folder: Path, peak_tflops: float | None, say,
               keep: Callable[[list[dict]], None]) -> None:
    """One model in each of `modes` at every batch through the torch serving engine, each mode's rows given
    to `keep` as soon as they are measured."""
    import torch

    from export.programs import export_program

    torch.manual_seed(0)
    graph, inputs = model(name, config.scale)
    path = export_program(graph, inputs(2), folder / f"{name.replace('/', '-')}.pt2")
    flops = flops_per_image(graph, inputs)  # last: it leaves the graph on the meta device
    del graph
    for mode in modes:
        if MODES[mode].get("cuda_graphs") and not config.cuda:
            keep([{"model": name, "mode": mode, "skipped": "CUDA graphs need a CUDA device"}])
            continue
        try:
            keep(mode_rows(name, mode, path, inputs, config, flops, peak_tflops, say))
        except Exception as err:  # a mode this machine cannot run (no C++ compiler for inductor, memory) is reported
            keep([{"model": name, "mode": mode, "skipped": f"{type(err).__name__}: {str(err)[:200]}"}])
        release_device(config)  # the next mode's start GiB counts its own memory, not this one's leftovers


def mode_rows(name: str, mode: str, path: Path, inputs, config: GpuBenchConfig, flops: float,
              peak_tflops: float | None, say) -> list[dict]:
    """One model in one mode at every batch: the engine's start (load, parity, compile/capture) and its ms. A
    batch the card has no memory for (a 1024 px decoder at 64) is reported as such, and the smaller ones run."""
    import torch

    from server.torch_engine import TorchOptions, TorchProgramEngine

    compiled, graphs = (MODES[mode].get(option, False) for option in ("compile", "cuda_graphs"))
    batches, rows = sorted(config.batches), []

    def out_of_memory(batch: int) -> None:
        rows.append({"model": name, "mode": mode, "skipped": f"out of memory at batch {batch} on this card"})

    # compiled into a cache folder of this run, model and mode's own: the first start compiles cold (another mode of
    # the same model would find its kernels), and a restart can load it
    cache = path.parent / f"compile-cache-{path.stem}-{mode}"
    options = TorchOptions(config.device, compile_cache=str(cache) if compiled else "", **MODES[mode])
    while True:  # compile and CUDA graphs warm every bucket up at start: one too large for the card is dropped there
        tick, engine = time.perf_counter(), None
        if config.cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            engine = TorchProgramEngine(path, name, batches[-1], options, buckets=tuple(batches))
        except torch.cuda.OutOfMemoryError:
            if len(batches) == 1 or not (compiled or graphs):  # eager starts alike whatever the batches
                raise
        if engine is not None:
            break
        release_device(config)  # out of the handler: its traceback no longer holds the half-built engine
        out_of_memory(batches.pop())
    start_s = time.perf_counter() - tick
    # the most GPU memory the start held: weights, the parity check, and in the compiled and graph modes every
    # bucket's warm-up
    start_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2) if config.cuda else None
    try:
        for batch in batches:
            if batch > engine.max_batch:
                rows.append({"model": name, "mode": mode, "skipped": f"batch {batch}: the program runs at most "
                             f"{engine.max_rows} rows (the model branches on the batch size)"})
                continue
            feeds = {key: value.numpy() for key, value in inputs(batch).items()}
            ms = None
            try:
                ms = timed_ms(lambda run=engine.run, feeds=feeds: run(feeds), config.repeats)
            except torch.cuda.OutOfMemoryError:
                out_of_memory(batch)
            if ms is None:
                torch.cuda.empty_cache()
                continue
            row = {"model": name, "mode": mode, "batch": batch, "ms": round(ms, 3),
                   "images_per_s": round(batch / ms * 1000, 2), "start_s": round(start_s, 1), "start_gib": start_gib,
                   "parity": engine.parity, "gflops_per_image": flops / 1e9}
            if peak_tflops:
                row["mfu"] = flops * batch / (ms / 1000) / (peak_tflops * 1e12)
            rows.append(row)
            say(f"[bench gpu] {name} {mode} batch {batch}: {ms:.2f} ms")
    finally:
        engine.close()  # its weights and graphs leave the card before the next start
    if compiled and config.restart and any("batch" in row for row in rows):
        release_device(config)  # the restart's engine gets the card's memory
        try:
            restart_s = restart_seconds(path, name, options, tuple(batches), timeout_s=max(300.0, 3 * start_s))
        except Exception as err:  # the figures measured above stand without it
            say(f"[bench gpu] {name} {mode}: no restart figure: {type(err).__name__}: {err}")
            return rows
        say(f"[bench gpu] {name} {mode}: started in {start_s:.1f} s, restarted from the compile cache in "
            f"{restart_s:.1f} s")
        for row in rows:
            if "batch" in row:
                row["restart_s"] = round(restart_s, 1)
    return rows


def release_device(config: GpuBenchConfig) -> None:
    """What closed and failed engines left behind, given back before the next one starts: torch.compile's code (it
    holds the module it compiled) and objects that refer to each other, then the allocator's cached blocks."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if config.cuda:
        torch.cuda.empty_cache()


def restart_seconds(path: Path, name: str, options, buckets: tuple[int, ...], timeout_s: float = 300.0) -> float:
    """Seconds a new process takes to start the same engine from the compile cache the first start filled: what
    a restarted or added replica pays (Python's and torch's imports left out, as in the first start's figure)."""
    import json
    import subprocess
    import sys

    script = ("import json, sys, time\n"
              "from server.torch_engine import TorchOptions, TorchProgramEngine\n"
              "import torch\n"
              "path, name, options, buckets = json.loads(sys.argv[1])\n"
              "torch.zeros(1, device=options['device'])  # the device set up, as in the first start's process\n"
              "tick = time.perf_counter()\n"
              "TorchProgramEngine(path, name, max(buckets), TorchOptions(**options), buckets=tuple(buckets))\n"
              "print(time.perf_counter() - tick)\n")
    argument = json.dumps([str(path), name, asdict(options), list(buckets)])
    done = subprocess.run([sys.executable, "-c", script, argument], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=timeout_s)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise RuntimeError(f"the restarted engine failed: {lines[-1][:300]}")
    return float(done.stdout.split()[-1])


def jpeg_rows(config: GpuBenchConfig) -> list[dict]:
    """ms per image of JPEG q90 for a batch of images: nvJPEG on the device (torchvision), in one call and one image
    a call, and the CPU encoder the server uses otherwise (simplejpeg)."""
    rng = np.random.default_rng(0)
    rows = []
    for side in config.jpeg_sides:
        side = side if config.scale == "real" else min(side, 64)
        images = np.clip(rng.standard_normal((config.jpeg_images, 3, side, side)) * 0.3, -1, 1).astype(np.float32)
        rows += [{"side": side, **row} for row in jpeg_costs(images, config)]
    return rows


def jpeg_costs(images: np.ndarray, config: GpuBenchConfig) -> list[dict]:
    from server.encoding import OutputFormat, encode_b64

    encoders = {"simplejpeg (cpu)": lambda: encode_b64(images, OutputFormat("jpeg", 90))}
    rows = []
    try:
        from server.gpu_jpeg import CudaJpeg

        gpu = CudaJpeg(config.device)
        on_device = gpu.torch.from_numpy(images).to(gpu.device)
        encoders["nvjpeg (torchvision)"] = lambda: gpu.encode(images, 90)
        encoders["nvjpeg, images already on the device"] = lambda: gpu.encode(on_device, 90)
        # as one-image requests use it: what a call costs beyond its image tells whether batching across requests pays
        encoders["nvjpeg, on the device, one image a call"] = lambda: [gpu.encode(on_device[i:i + 1], 90)
                                                                       for i in range(len(on_device))]
    except Exception as err:  # torchvision missing, or no encoder for this device
        rows.append({"encoder": "nvjpeg", "skipped": f"{type(err).__name__}: {str(err)[:200]}"})
    for label, encode in encoders.items():
        rows.append({"encoder": label, "ms_per_image": round(timed_ms(encode, config.repeats) / len(images), 4)})
    return rows


def served(config: GpuBenchConfig, folder: Path, say) -> dict:
    """A latent bundle (by default a random SiT denoiser and the SD-VAE decoder, with torch programs) served by the
    torch backend (bf16, CUDA graphs on a GPU), one-image jpeg requests, against the images/s its own student and
    decoder allow at the largest batch (timed here through the same engine and options). A text bundle's requests
    cycle through 256 prompts, so once each has been seen the prompt cache answers and the text encoder, left out of
    the limit, rests."""
    from flowmap.bench_serve import ServerProcess
    from flowmap.bench_stages import build_latent_bundle
    from flowmap.loadgen import run_load
    from server.torch_engine import TorchOptions, TorchProgramEngine

    tiny = config.scale == "tiny"
    if config.served_bundle:
        root, denoiser = Path(config.served_bundle).resolve(), None  # the server runs from the repository's root
    else:
        root, denoiser = folder / "bundle", "S/2" if tiny else config.served_denoiser
        # checked at batch 1 and 3: at 64 the checks were two thirds of the build (194 of 294 s on a 2-core CPU)
        build_latent_bundle(root, lambda text: say(f"[bench gpu] {text}"), denoiser, (4, 8, 8) if tiny else (4, 32, 32),
                            sd_vae(tiny), programs=True, parity_batches=(1, 3))
    bundle = servable_bundle(root)
    manifest = bundle.manifest
    latent, text = manifest.latent_shape, bundle.text
    rows, decoder_rows = max(config.batches), max(1, max(config.batches) // 2)
    # bf16 with hand-captured CUDA graphs: the server captures every bucket of four engines at start, which
    # compiling them all would stretch to minutes
    options = TorchOptions(config.device, "bfloat16" if config.cuda else "float32", False, config.cuda)
    limit_ms = 0.0
    for graph, batch, feeds in ((bundle.students[0], rows, {"x": np.zeros((rows, *latent), np.float32),
                                                            "t": np.ones(rows, np.float32),
                                                            "s": np.zeros(rows, np.float32),
                                                            "label": np.zeros((rows, *text.shape), np.float32)
                                                            if text else np.zeros(rows, np.int64)}),
                                (bundle.decoder, decoder_rows, {"latent": np.zeros((decoder_rows, *latent),
                                                                                   np.float32)})):
        engine = TorchProgramEngine(graph.program, graph.path.stem, batch, options, buckets=(batch,))
        try:
            limit_ms += timed_ms(lambda engine=engine, feeds=feeds: engine.run(feeds), config.repeats) / batch
        finally:
            engine.close()
    release_device(config)  # the server's process gets the whole card
    flags = ["--backend", "torch", "--device", config.device, "--max-batch-size", str(rows),
             "--decoder-max-batch-size", str(decoder_rows), "--max-queue-size", "4096", "--no-ui"]
    if config.cuda:
        flags += ["--torch-dtype", "bfloat16", "--cuda-graphs"]
    clients = served_clients(config.served_clients, rows)
    # by default also as many clients as one batch holds, on the same server: they move through the stages in step,
    # and what the default's second batch of clients buys is measured, not assumed
    loads = [clients] + ([rows] if not config.served_clients else [])
    server = ServerProcess(str(root), 8740, *flags, ready_timeout_s=300)
    try:
        bodies = [{"prompts": [f"picture number {i}"]} if text else {"labels": [i % len(manifest.classes)]}
                  for i in range(256)]
        bodies = [{**body, "seeds": [i], "output_format": "jpeg"} for i, body in enumerate(bodies)]
        runs, warmup_s = [], min(3.0, config.served_seconds / 2)  # uncounted: connections open, caches fill
        for count in loads:
            say(f"[bench gpu] serving: {count} clients, {config.served_seconds:g} s")
            before, cpu, tick = server.metrics(), thread_cpu_s(server.process.pid), time.perf_counter()
            result = asyncio.run(run_load("127.0.0.1", server.port, "/v1/generate", bodies, count,
                                          config.served_seconds, 1, warmup_s=warmup_s)).summary()
            seconds = time.perf_counter() - tick
            cores = {thread: round((spent - cpu[thread]) / seconds, 2)
                     for thread, spent in thread_cpu_s(server.process.pid).items()}
            runs.append((result, served_use(before, server.metrics(), seconds) | ({"cpu_cores": cores} if cores
                                                                                  else {})))
    finally:
        server.stop()
    limit = round(1000 / limit_ms, 2)

    def against_limit(result: dict) -> dict:  # one load's figures
        return {key: result[key] for key in ("images_per_s", "p50_ms", "statuses")} | {
            "vs_limit": round(result["images_per_s"] / limit, 3)}

    (result, use), *in_step = runs
    figures = {**against_limit(result), "clients": clients, "flags": flags,
               "bundle": f"{f'SiT-{denoiser} + SD-VAE' if denoiser else manifest.name}, {manifest.image_shape[1]} px",
               "limit_images_per_s": limit, **use}
    if in_step:
        result, use = in_step[0]
        figures["in_step"] = {"clients": rows, **against_limit(result), "engines": use["engines"]}
    return figures


def served_clients(given: int, largest_batch: int) -> int:
    """The served load's clients: as given, or (0) twice the largest batch."""
    return given or 2 * largest_batch


def servable_bundle(root: str | Path):
    """The bundle at `root`, if the served part can serve it: a decoder, and torch programs of its student, decoder
    and (a text bundle's) text encoder."""
    from export.bundle import read_bundle

    bundle = read_bundle(Path(root).resolve())
    graphs = [bundle.students[0], bundle.decoder] + ([bundle.text.encoder] if bundle.text else [])
    if bundle.decoder is None or any(graph.program is None for graph in graphs):
        raise ValueError(f"--served-bundle {root}: the served part takes a latent bundle (one with a decoder) exported "
                         "with torch programs (`flowmap export --torch-programs`)")
    return bundle


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds a process has spent so far (Linux's /proc; elsewhere nothing): "event_loop", its main thread (the
    server's), and "process", all its threads."""
    import os

    spent = {"event_loop": 0.0, "process": 0.0}
    try:
        for thread in os.listdir(f"/proc/{pid}/task"):
            fields = Path(f"/proc/{pid}/task/{thread}/stat").read_text().rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
            spent["process"] += seconds
            spent["event_loop"] += seconds if thread == str(pid) else 0.0
    except OSError:  # no /proc, or a thread that ended while read: no figure rather than a wrong one
        return {}
    return spent


def served_use(before: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    """Where a load's time went, from a server's /metrics scraped before and `seconds` after it (warm-up
    included): per engine that ran, its batches, mean rows a batch and the share of the time it computed; per request
    stage its mean ms, queue waits included, and the encode stage's ms by step (waiting for a thread, copying to the
    host, encoding); how late the event loop woke on average; images encoded by each encoder (nvjpeg, cpu)."""
    delta = {series: value - before.get(series, 0.0) for series, value in after.items()}

    def labels(prefix: str, key: str) -> list[str]:
        return sorted({series.split(f'{key}="')[1].split('"')[0] for series in delta if series.startswith(prefix)})

    engines = {}
    for engine in labels("flowmap_inference_exec_count_total{", "engine"):
        label = f'{{engine="{engine}"}}'
        batches = delta[f"flowmap_inference_exec_count_total{label}"]
        if batches:  # the bundle's teacher and verifier stay idle under generate requests
            engines[engine] = {"batches": int(batches), "busy": round(
                delta[f"flowmap_inference_compute_duration_seconds_sum{label}"] / seconds, 3),
                "rows_per_batch": round(delta[f"flowmap_inference_count_total{label}"] / batches, 1)}
    stages = stage_ms(delta, labels("flowmap_stage_duration_seconds_count{", "stage"))
    encoded = {encoder: int(delta[f'flowmap_images_encoded_total{{encoder="{encoder}"}}'])
               for encoder in labels("flowmap_images_encoded_total{", "encoder")}
    encodes = delta.get('flowmap_stage_duration_seconds_count{stage="encode"}', 0.0)
    encode_steps = {step: round(1000 * delta.get(f'flowmap_encode_seconds_total{{step="{step}"}}', 0.0) / encodes, 2)
                    for step in ENCODE_STEPS} if encodes else {}
    wakes = delta.get("flowmap_event_loop_lag_seconds_count", 0.0)
    lag = round(1000 * delta["flowmap_event_loop_lag_seconds_sum"] / wakes, 2) if wakes else None
    return {"engines": engines, "stage_ms_per_request": stages, "encode_ms_per_request": encode_steps,
            "loop_lag_ms": lag,
            "images_encoded": {encoder: count for encoder, count in encoded.items() if count}}


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

    report = {"config": asdict(config), "anchors": list(ANCHORS), "torch": torch.__version__, "code": code_version(),
              "device_name": torch.cuda.get_device_name() if config.cuda else
              (platform.processor() or platform.machine()), "cpus": torch.get_num_threads(), "errors": []}
    done: set[str] = set()
    if config.resume and Path(config.out).with_suffix(".json").is_file():
        report, done = resumed(report, config)
        say(f"[bench gpu] resuming {config.out}.json: keeping {', '.join(sorted(done)) or 'nothing'}")
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


def resumed(fresh: dict, config: GpuBenchConfig) -> tuple[dict, set[str]]:
    """(report, what it already holds: "peak", "jpeg", "served", "stages MODEL MODE") from an earlier run's
    OUT.json on the same card, torch and timed code: what it measured stays, what failed or is missing runs
    again."""
    import json

    earlier = json.loads(Path(config.out).with_suffix(".json").read_text())
    for key in ("device_name", "torch", "code"):  # code: TIMED_CODE's version
        if earlier.get(key) != fresh[key]:
            raise ValueError(f"--resume: {config.out}.json was measured with {key} {earlier.get(key)!r}, this run has "
                             f"{fresh[key]!r}; timings from two setups do not go in one report")
    failed = {error.split(":")[0] for error in earlier.get("errors", [])}
    stages = [row for row in earlier.get("stages", []) if f"stages {row['model']}" not in failed and measured(row)]
    def served_as(run: dict) -> tuple:  # a served figure stands only for the bundle and load it was measured with
        bundle, batch = run.get("served_bundle", ""), max(run["batches"])
        return (str(Path(bundle).resolve()) if bundle else "", run.get("served_denoiser"), batch,
                served_clients(run["served_clients"], batch))

    done = {f"stages {row['model']} {row['mode']}" for row in stages} | {
        part for part in WHOLE_PARTS if part in earlier and part not in failed
        and (part != "served" or served_as(earlier["config"]) == served_as(asdict(config)))}
    runs = earlier.get("runs", [earlier["config"]])
    kept = {key: value for key, value in earlier.items() if key not in WHOLE_PARTS or key in done}
    return {**kept, "config": asdict(config), "runs": [*runs, asdict(config)], "stages": stages, "errors": []}, done


