"""What `flowmap bench gpu` times and how: the random-weight stages at their real (or toy) sizes, the FLOPs a GPU
spends on one image of each and the card's matmul peak (for MFU), and each stage timed through the serving engine
at every batch in each mode (flowmap/gpu_config.py's MODES).

SiT-XL/2 on 4x32x32 latents and the SD-VAE decoder (256 px); SANA-600M's transformer shape on 32x32x32 DC-AE
latents with 300 text tokens and SANA's DC-AE decoder (1024 px).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from flowmap.gpu_config import DECODERS, MODES, GpuBenchConfig
from flowmap.timing import timed_ms


def model(name: str, scale: str):
    """(graph module, inputs for batch b): the random-weight stage at its real or toy size."""
    import torch

    from export.onnx_export import TeacherGraph

    tiny = scale == "tiny"
    if name.startswith("sit"):
        from distill.models import Teacher
        from distill.sit import sit_config

        latent = (4, 8, 8) if tiny else (4, 32, 32)
        # toy: SiT-S/2's width with two of its blocks (what CI runs: a twelfth of the blocks to trace and compile)
        config = replace(sit_config("S/2", latent), depth=2) if tiny else sit_config("XL/2", latent)
        graph = TeacherGraph(Teacher(config), 1.0)
        with torch.no_grad():  # adaLN-Zero starts at zero: random there too, or outputs (and parity) are zero
            for parameter in graph.parameters():
                if not parameter.any():
                    parameter.normal_(0, 0.02)
        return graph, lambda batch: {"x": torch.randn(batch, *latent), "t": torch.rand(batch),
                                     "label": torch.randint(0, 1000, (batch,))}
    if name in DECODERS:
        from export.decoder import DecoderGraph

        make_vae, channels = (sd_vae, 4) if name.startswith("sd-vae") else (dc_ae, 32)
        side = 8 if tiny else 32
        return DecoderGraph(make_vae(tiny).eval()), lambda batch: {"latent": torch.randn(batch, channels, side, side)}
    return sana_graph(tiny)


def sd_vae(tiny: bool):
    """Stable Diffusion's AutoencoderKL (8x: 4x32x32 latents -> 256 px), or a toy one of the same kind."""
    import diffusers

    channels = [32, 32] if tiny else [128, 256, 512, 512]
    return diffusers.AutoencoderKL(block_out_channels=channels, layers_per_block=1 if tiny else 2,
                                   down_block_types=["DownEncoderBlock2D"] * len(channels),
                                   up_block_types=["UpDecoderBlock2D"] * len(channels), latent_channels=4,
                                   norm_num_groups=32, scaling_factor=0.18215)


def dc_ae(tiny: bool):
    """SANA 1.0's DC-AE (f32c32: 32x32x32 latents -> 1024 px; ResBlocks, then EfficientViT blocks with 5x5
    multi-scale linear attention), or a toy one of the same kind."""
    import diffusers

    channels, layers = ((16, 32), (1, 1)) if tiny else ((128, 256, 512, 512, 1024, 1024), (3,) * 6)
    kinds = ("ResBlock",) * (len(channels) // 2) + ("EfficientViTBlock",) * (len(channels) - len(channels) // 2)
    scales = tuple(() if kind == "ResBlock" else (5,) for kind in kinds)
    return diffusers.AutoencoderDC(
        latent_channels=32, attention_head_dim=8 if tiny else 32, encoder_block_types=kinds,
        decoder_block_types=kinds, encoder_block_out_channels=channels, decoder_block_out_channels=channels,
        encoder_layers_per_block=(1, 1) if tiny else (2, 2, 2, 3, 3, 3), decoder_layers_per_block=layers,
        encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales, downsample_block_type="conv",
        upsample_block_type="interpolate", scaling_factor=0.41407)


def sana_graph(tiny: bool):
    """SANA-600M's transformer shape (28 layers, width 1152, Gemma-2B text width 2304) on the 32x32x32
    latents of a 1024 px DC-AE, conditioned on 300 tokens; as one velocity call."""
    import diffusers
    import torch

    layers, heads, head, text, tokens, latent = (1, 2, 16, 64, 8, (32, 4, 4)) if tiny else (
        28, 16, 72, 2304, 300, (32, 32, 32))
    transformer = diffusers.SanaTransformer2DModel(
        in_channels=latent[0], out_channels=latent[0], num_attention_heads=heads, attention_head_dim=head,
        num_layers=layers, num_cross_attention_heads=heads, cross_attention_head_dim=head,
        cross_attention_dim=heads * head, caption_channels=text, sample_size=latent[1], patch_size=1).eval()

    class SanaVelocity(torch.nn.Module):
        input_names, output_name = ("x", "t", "label"), "velocity"

        def __init__(self):
            super().__init__()
            self.transformer = transformer

        def forward(self, x, t, label):
            return self.transformer(x, encoder_hidden_states=label, timestep=t * 1000, return_dict=False)[0]

    return SanaVelocity(), lambda batch: {"x": torch.randn(batch, *latent), "t": torch.rand(batch),
                                          "label": torch.randn(batch, tokens, text)}


def flops_per_image(graph, inputs) -> float:
    """Floating-point operations of one image's forward (torch's FLOP counter, batch 1), counted on the meta
    device: nothing is computed, and attention counts as a GPU runs it (the CPU's fused attention kernel has no
    FLOP formula, so a count on the CPU left SANA's cross-attention out). Moves `graph` to meta for good."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        graph.to("meta")(*(value.to("meta") for value in inputs(1).values()))
    return float(counter.get_total_flops())


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
        # a denoiser has a convolution or none: a channels-last compile of it would cost a lent card minutes for nothing
        if MODES[mode].get("channels_last") and name not in DECODERS:
            keep([{"model": name, "mode": mode, "skipped": "channels-last is timed on the decoders"}])
            continue
        if MODES[mode]["dtype"] == "float8" and name in DECODERS:
            keep([{"model": name, "mode": mode, "skipped": "float8 is timed on the denoisers (a decoder's time is "
                   "in its convolutions)"}])
            continue
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
