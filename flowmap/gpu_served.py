"""The serving side of `flowmap bench gpu`: JPEG on the GPU (nvJPEG) against the CPU encoder, and a latent bundle
served over HTTP by the torch backend against the limit its own student and decoder allow, with where the load's
time went (the server's /metrics and its threads' CPU).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from flowmap.bench_stages import stage_ms
from flowmap.gpu_config import GpuBenchConfig
from flowmap.gpu_stages import release_device, sd_vae
from flowmap.timing import timed_ms
from server.encoding import ENCODE_STEPS


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
        # the decoder as the server runs it: its images left on the device, their 8-bit pixels copied to the host
        engine = TorchProgramEngine(graph.program, graph.path.stem, batch, options, buckets=(batch,),
                                    device_output=graph is bundle.decoder)
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
            after = thread_cpu_s(server.process.pid)
            cores = {thread: round((after[thread] - cpu[thread]) / seconds, 2) for thread in after if cpu}
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
    included): per engine that ran, its batches, mean rows and padding rows a batch (up to its bucket) and the share
    of the time it computed; per request
    stage its mean ms, queue waits included, and the encode stage's ms by step (waiting for a thread, copying to the
    host, encoding); how late the event loop woke on average; images encoded by each encoder (nvjpeg, cpu); the
    encode threads and GIL switch interval the server ran with."""
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
                "rows_per_batch": round(delta[f"flowmap_inference_count_total{label}"] / batches, 1),
                "padding_per_batch": round(delta.get(f"flowmap_inference_padded_rows_total{label}", 0.0) / batches, 1)}
    stages = stage_ms(delta, labels("flowmap_stage_duration_seconds_count{", "stage"))
    encoded = {encoder: int(delta[f'flowmap_images_encoded_total{{encoder="{encoder}"}}'])
               for encoder in labels("flowmap_images_encoded_total{", "encoder")}
    encodes = delta.get('flowmap_stage_duration_seconds_count{stage="encode"}', 0.0)
    encode_steps = {step: round(1000 * delta.get(f'flowmap_encode_seconds_total{{step="{step}"}}', 0.0) / encodes, 2)
                    for step in ENCODE_STEPS} if encodes else {}
    wakes = delta.get("flowmap_event_loop_lag_seconds_count", 0.0)
    lag = round(1000 * delta["flowmap_event_loop_lag_seconds_sum"] / wakes, 2) if wakes else None
    interval = after.get("flowmap_gil_switch_interval_seconds")
    return {"engines": engines, "stage_ms_per_request": stages, "encode_ms_per_request": encode_steps,
            "loop_lag_ms": lag, "encode_threads": int(after.get("flowmap_encode_threads", 0)) or None,
            "gil_switch_interval_ms": None if interval is None else round(1000 * interval, 3),
            "images_encoded": {encoder: count for encoder, count in encoded.items() if count}}
