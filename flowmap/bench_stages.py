"""`flowmap bench stages`: what each stage of a request costs at the sizes users serve, with random
weights of the real shapes: the denoiser (SiT-S/2, B/2 and XL/2 shapes on 4x32x32 latents), the VAE
decoder (the Stable Diffusion AutoencoderKL and the tiny TAESD-shape decoder, 256 and 512 px) and the
image encoders (png, jpeg, webp; every candidate library), each in a fresh process so its peak memory
is its own, torch eager beside ONNX Runtime. Then a real-size latent bundle (SiT-S/2 student and
teacher, the tiny decoder; random weights, built under runs/ when absent) is served over HTTP and its
throughput compared with the limit the stage costs imply. Text: the CLIP-L and T5-large text encoders
as stages, and a FLUX-layout text bundle with those encoders served with the prompt cache on and off
under a demo's prompt mix (a few prompts repeated) and an API's (every prompt new). Last, how long an encode
job waits for the GIL beside busy Python threads, by switch interval (flowmap/gil_handoff.py).
Writes docs/stages.{md,json,png}; `parts` re-measures some parts and keeps the others from the last report."""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flowmap.bucket_batching import bucket_rows, bucket_table, bucketed_engine
from flowmap.gil_handoff import handoff_rows, handoff_table
from flowmap.host_memory import memory_rows, memory_table
from flowmap.reports import pyplot, save_figure, write_report
from flowmap.timing import in_fresh_process, timed_ms

PARTS = ("encoders", "stages", "served", "text", "text-served", "handoffs", "buckets", "memory")


@dataclass
class StagesBenchConfig:
    sizes: tuple[int, ...] = (256, 512)  # image sides in pixels
    small_sizes: tuple[int, ...] = (8, 128)  # grey images as class bundles serve them (8x8 digits, x16)
    encode_images: int = 16  # images per encoder measurement
    denoisers: tuple[str, ...] = ("S/2", "B/2", "XL/2")  # SiT sizes on 4x32x32 latents (256 px)
    batched_denoisers: tuple[str, ...] = ("S/2", "B/2")  # also at the larger batches (XL/2 at batch 1 only)
    decoders: tuple[str, ...] = ("tiny", "sd-vae")  # the TAESD-shape AutoencoderTiny, SD's AutoencoderKL
    batches: tuple[int, ...] = (1, 4)  # batch sizes of the denoiser and tiny-decoder measurements
    bundle: str = "runs/latent-bundle"  # the real-size latent bundle served at the end (built when absent)
    served_clients: int = 4  # concurrent clients of the served measurement
    served_seconds: float = 30.0  # how long it runs
    text_encoders: tuple[str, ...] = ("clip-l", "t5-large")  # CLIP-L (77 tokens), T5-large (256; XXL won't fit)
    text_bundle: str = "runs/text-bundle"  # a FLUX-layout bundle with those encoders (built when absent)
    demo_prompts: int = 8  # the demo mix: requests cycle through this many prompts
    handoff_intervals_ms: tuple[float, ...] = (5.0, 1.0, 0.5)  # GIL switch intervals (CPython's default first)
    handoff_busy_threads: tuple[int, ...] = (0, 1, 4)  # busy pure-Python threads beside the encode jobs
    handoff_seconds: float = 2.0  # each hand-off trial
    bucket_bundle: str = "models/shapes"  # its student serves the bucket-split runs (onnxruntime, one thread)
    bucket_max_batch: int = 16  # the largest batch bucket of those runs
    bucket_loads: tuple[float, ...] = (0.3, 0.6, 0.85)  # offered loads, fractions of the engine's full-batch rows/s
    bucket_seconds: float = 6.0  # each run of the bucket-split comparison
    bucket_rounds: int = 2  # alternating runs per load and policy
    memory_side: int = 1024  # image side of the host-memory part (FLUX-shape conditions, 512x4096)
    memory_images: int = 64  # images of one request in that part
    parts: tuple[str, ...] = PARTS  # the parts to measure; the others are kept from the last report
    out: str = "docs/stages"  # writes OUT.md, OUT.json and OUT.png


def photo(side: int, grey: bool = False) -> np.ndarray:
    """A real photograph (scikit-learn's sample image), resized to side x side, [H, W, C] uint8:
    encoders behave on photographs as they do on generated images, not as on noise or flat colour."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    image = Image.fromarray(load_sample_image("china.jpg")).resize((side, side), Image.BICUBIC)
    return np.asarray(image.convert("L"))[..., None] if grey else np.asarray(image)


def encoder_candidates() -> dict[str, callable]:
    """name -> encode(pixels [H, W, 3] uint8) -> bytes, for every library installed here."""
    from PIL import Image

    from server.imaging import png_bytes

    def pillow(fmt, **options):
        def encode(pixels):
            buffer = io.BytesIO()
            Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buffer, format=fmt, **options)
            return buffer.getvalue()
        return encode

    candidates = {
        "png: our writer (zlib 6)": png_bytes,
        "png: Pillow (level 6)": pillow("PNG"),
        "png: Pillow (level 1)": pillow("PNG", compress_level=1),
        "jpeg q90: Pillow": pillow("JPEG", quality=90),
        "webp q90: Pillow (method 4)": pillow("WEBP", quality=90),
        "webp q90: Pillow (method 0)": pillow("WEBP", quality=90, method=0),
    }
    try:
        import simplejpeg

        def simple(subsampling):
            return lambda p: simplejpeg.encode_jpeg(np.ascontiguousarray(p), quality=90,
                                                    colorspace="GRAY" if p.shape[2] == 1 else "RGB",
                                                    colorsubsampling=subsampling)

        candidates["jpeg q90: simplejpeg (4:4:4)"] = simple("444")
        candidates["jpeg q90: simplejpeg (4:2:0)"] = simple("420")
    except ImportError:
        pass
    try:
        from turbojpeg import TurboJPEG

        turbo = TurboJPEG()
        # pixel format RGB (0) or grey (6), subsampling 4:2:0 (2) or grey (3)
        candidates["jpeg q90: PyTurboJPEG (4:2:0)"] = lambda p: turbo.encode(
            np.ascontiguousarray(p), quality=90, pixel_format=0 if p.shape[2] == 3 else 6,
            jpeg_subsample=2 if p.shape[2] == 3 else 3)
    except (ImportError, RuntimeError, OSError):  # the package, or the libjpeg-turbo it loads, is missing
        pass
    return candidates


def encoder_costs(config: StagesBenchConfig) -> list[dict]:
    """Per encoder and size: ms per image, bytes per image, and the speed-up of two threads over one
    (near 2 on two cores when the encoder releases the GIL)."""
    rows = []
    for side, grey in [(side, True) for side in config.small_sizes] + [(side, False) for side in config.sizes]:
        images = [photo(side, grey)] * config.encode_images
        for name, encode in encoder_candidates().items():
            encode(images[0])
            tick = time.perf_counter()
            sizes = [len(encode(image)) for image in images]
            one = time.perf_counter() - tick
            with ThreadPoolExecutor(2) as pool:
                tick = time.perf_counter()
                list(pool.map(encode, images))
                two = time.perf_counter() - tick
            rows.append({"encoder": name, "side": side, "grey": grey,
                         "ms_per_image": round(1000 * one / len(images), 4), "bytes": int(np.mean(sizes)),
                         "two_thread_speedup": round(one / two, 2)})
    return rows


# -- network stages, each measured in a fresh process ------------------------------------------------
def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _graph_of(kind: str, name: str):
    """(torch module, example input for batch b) of one stage: a SiT denoiser or a VAE decoder."""
    import torch

    if kind == "text":
        encoder, tokens = _text_encoder(name)

        class TextEncoderGraph(torch.nn.Module):
            input_names, output_name = ("ids",), "hidden"

            def __init__(self):
                super().__init__()
                self.encoder = encoder.eval()

            def forward(self, ids):
                return self.encoder(ids, return_dict=False)[0]

        return TextEncoderGraph(), lambda batch: {"ids": torch.randint(0, 1000, (batch, tokens))}
    if kind == "denoiser":
        from distill.models import Teacher
        from distill.sit import sit_config
        from export.onnx_export import TeacherGraph

        graph = TeacherGraph(Teacher(sit_config(name)), 1.0)  # w = 1: one pass, the student's cost per step

        def inputs(batch):
            return {"x": torch.randn(batch, 4, 32, 32), "t": torch.rand(batch),
                    "label": torch.randint(0, 1000, (batch,))}

        return graph, inputs
    import diffusers

    from export.decoder import DecoderGraph

    side, vae_kind = name.split(":")
    if vae_kind == "tiny":
        vae = diffusers.AutoencoderTiny()
    else:
        vae = diffusers.AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                      down_block_types=["DownEncoderBlock2D"] * 4,
                                      up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
                                      norm_num_groups=32, scaling_factor=0.18215)
    latent = int(side) // 8
    return DecoderGraph(vae.eval()), lambda batch: {"latent": torch.randn(batch, 4, latent, latent)}


def _text_encoder(name: str):
    """(random-weight encoder, its token count): CLIP-L's text tower, or T5 v1.1-large's encoder (the
    shape of FLUX's and SD3's T5-XXL, scaled down to fit this machine)."""
    import transformers

    if name == "clip-l":
        return transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")), 77
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=32128, d_model=1024, d_ff=2816, d_kv=64, num_layers=24, num_heads=16,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)), 256


def measure_torch(kind: str, name: str, batch: int, export_to: str | None) -> dict:
    """In a fresh process: ms per image through torch eager and the process's peak memory; then, with
    `export_to`, the ONNX graph and the example feeds written there for `measure_onnx`."""
    import torch

    from export.onnx_export import export_onnx

    torch.manual_seed(0)
    graph, inputs = _graph_of(kind, name)
    feeds = inputs(batch)
    with torch.no_grad():
        torch_ms = timed_ms(lambda: graph(*feeds.values()), _repeats(name)) / batch
    row = {"kind": kind, "name": name, "batch": batch, "torch_ms_per_image": round(torch_ms, 1),
           "params_m": round(sum(p.numel() for p in graph.parameters()) / 1e6, 1),
           "torch_peak_rss_mb": round(_peak_mb(), 0)}  # before the export, which costs far more than a forward
    if export_to:
        export_onnx(graph, inputs(2), Path(export_to) / "stage.onnx")
        np.savez(Path(export_to) / "feeds.npz", **{k: v.numpy() for k, v in feeds.items()})
    return row


def measure_onnx(folder: str, name: str, batch: int) -> dict:
    """In a fresh process that imports no torch: ms per image through ONNX Runtime with its default
    threads and with one thread, and the peak memory of a process that serves only this graph."""
    import onnxruntime as ort

    feeds = dict(np.load(Path(folder) / "feeds.npz"))
    row = {}
    for key, threads in (("onnx_ms_per_image", 0), ("onnx_1_thread_ms_per_image", 1)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        run = ort.InferenceSession(str(Path(folder) / "stage.onnx"), options, providers=["CPUExecutionProvider"]).run
        row[key] = round(timed_ms(lambda run=run: run(None, feeds), _repeats(name)) / batch, 1)
    row["onnx_peak_rss_mb"] = round(_peak_mb(), 0)
    return row


def _repeats(name: str) -> int:
    return 1 if "sd-vae" in name or name in ("XL/2", "t5-large") else 2  # seconds a call on 2 CPUs


def measure_stage(kind: str, name: str, batch: int, onnx: bool) -> dict:
    """One stage in torch, then (with `onnx`) through ONNX Runtime, each in a process of its own."""
    if not onnx:
        return in_fresh_process(measure_torch, kind, name, batch, None)
    with tempfile.TemporaryDirectory() as folder:
        row = in_fresh_process(measure_torch, kind, name, batch, folder)
        return {**row, **in_fresh_process(measure_onnx, folder, name, batch)}


def stage_costs(config: StagesBenchConfig, say) -> list[dict]:
    rows = []
    for size in config.denoisers:
        for batch in config.batches if size in config.batched_denoisers else (1,):
            say(f"[bench stages] SiT-{size} denoiser, batch {batch}")
            rows.append(measure_stage("denoiser", size, batch, True))
    for decoder in config.decoders:
        for side in config.sizes:
            for batch in config.batches if decoder == "tiny" else (1,):
                say(f"[bench stages] {decoder} decoder, {side} px, batch {batch}")
                rows.append(measure_stage("decoder", f"{side}:{decoder}", batch, True))
    return rows


def text_stage_costs(config: StagesBenchConfig, say) -> list[dict]:
    rows = []
    for encoder in config.text_encoders:
        for batch in config.batches:
            say(f"[bench stages] {encoder} text encoder, batch {batch}")
            rows.append(measure_stage("text", encoder, batch, True))
    return rows


# -- a real-size latent bundle, served -----------------------------------------------------------------
def announce(text: str) -> None:
    print(f"[bench stages] {text}", flush=True)


def build_latent_bundle(out: str | Path, say, denoiser: str = "S/2", latent: tuple[int, int, int] = (4, 32, 32),
                        vae=None, programs: bool = False, parity_batches: tuple[int, ...] | None = None) -> Path:
    """A SiT teacher (random weights, the public layout), its FreeFlow student after one step, a verifier
    on random images of the decoder's size, and the decoder (by default the tiny one): exported as a
    format 2 bundle (with torch.export programs when `programs`; checked at `parity_batches` if given)."""
    import diffusers
    import torch

    from distill.data import Dataset
    from distill.freeflow import FreeFlowConfig
    from distill.models import Teacher
    from distill.pipeline import distill_student, train_verifier
    from distill.sit import sit_config
    from distill.trainer import TrainConfig
    from distill.verifier import VerifierConfig
    from export.decoder import DecoderGraph
    from export.onnx_export import PARITY_BATCHES
    from export.writer import export_bundle

    out = Path(out)
    runs = out.parent / f"{out.name}-runs"
    runs.mkdir(parents=True, exist_ok=True)
    say(f"building the latent bundle in {out}")
    torch.manual_seed(0)
    teacher_spec = f"sit:{runs / 'sit.pt'}"
    torch.save(public_layout(Teacher(sit_config(denoiser, latent))), runs / "sit.pt")
    quick = TrainConfig(steps=1, batch_size=2, ema_decay=0.0)
    distill_student("freeflow", teacher_spec, FreeFlowConfig(), quick, runs / "student", progress=False)
    vae = vae if vae is not None else diffusers.AutoencoderTiny()
    side = DecoderGraph(vae.eval()).image_shape(latent)[1]
    images = torch.rand(16, 3, side, side) * 2 - 1
    train_verifier(Dataset("random", images, torch.arange(16) % 1000, [str(i) for i in range(1000)]),
                   VerifierConfig(width=8, feature_dim=32), quick, runs / "verifier", progress=False)
    vae.save_pretrained(runs / "vae")
    export_bundle(runs / "student", teacher_spec, runs / "verifier", out, (1.0,), progress=False, decoder=runs / "vae",
                  programs=programs, parity_batches=parity_batches or PARITY_BATCHES)
    return out


def public_layout(teacher) -> dict:
    """Our SiT teacher's weights under the public SiT key names (the inverse of distill/sit.py)."""
    import torch

    net, config = teacher.net, teacher.config
    patch, channels = config.patch, config.shape[0]
    state = {"x_embedder.proj.weight": net.patch_in.weight.reshape(config.width, channels, patch, patch),
             "x_embedder.proj.bias": net.patch_in.bias, "pos_embed": net.pos,
             "y_embedder.embedding_table.weight": net.y_embed.weight,
             "final_layer.adaLN_modulation.1.weight": net.final.ada[1].weight,
             "final_layer.adaLN_modulation.1.bias": net.final.ada[1].bias}
    for index in (0, 2):
        state[f"t_embedder.mlp.{index}.weight"] = net.t_embed.mlp[index].weight
        state[f"t_embedder.mlp.{index}.bias"] = net.t_embed.mlp[index].bias
    for b, block in enumerate(net.blocks):
        for theirs, layer in (("attn.qkv", block.attn.qkv), ("attn.proj", block.attn.proj), ("mlp.fc1", block.mlp[0]),
                              ("mlp.fc2", block.mlp[2]), ("adaLN_modulation.1", block.ada[1])):
            state[f"blocks.{b}.{theirs}.weight"], state[f"blocks.{b}.{theirs}.bias"] = layer.weight, layer.bias
    # our (c, p, q) output order -> SiT's (p, q, c), without the variance channels
    order = torch.arange(channels * patch * patch).reshape(channels, patch, patch).permute(1, 2, 0).reshape(-1)
    state["final_layer.linear.weight"] = net.final.linear.weight[order]
    state["final_layer.linear.bias"] = net.final.linear.bias[order]
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def served_throughput(config: StagesBenchConfig, say) -> dict:
    from flowmap.bench_serve import ServerProcess
    from flowmap.loadgen import run_load

    bundle = Path(config.bundle)
    if not (bundle / "manifest.json").is_file():
        in_fresh_process(build_latent_bundle, str(bundle), announce)
    say(f"[bench stages] serving {bundle}: {config.served_clients} clients, jpeg, {config.served_seconds:g} s")
    server = ServerProcess(str(bundle), 8730, "--max-batch-size", "4", "--decoder-max-batch-size", "4",
                           "--max-queue-size", "64", "--no-ui")
    try:
        bodies = [{"labels": [i % 1000], "seeds": [i], "output_format": "jpeg"} for i in range(64)]
        result = asyncio.run(run_load("127.0.0.1", server.port, "/v1/generate", bodies, config.served_clients,
                                      config.served_seconds, 1, warmup_s=5.0)).summary()
        metrics = server.metrics()
    finally:
        server.stop()
    return {"images_per_s": result["images_per_s"], "p50_ms": result["p50_ms"], "statuses": result["statuses"],
            "stage_ms_per_request": stage_ms(metrics, ("noise", "student", "decoder", "encode"))}


# -- text: a bundle with real-size text encoders, served with and without the prompt cache ---------------
TEXT_PROMPTS = [f"a {size} {colour} {thing} {place}" for size, colour, thing, place in zip(
    ["small", "large", "tiny", "huge", "medium", "small", "large", "giant"] * 4,
    ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"] * 4,
    ["cat", "dog", "house", "tree", "car", "boat", "bird", "flower", "robot", "castle", "lamp", "chair"] * 3,
    ["on a beach", "in a forest", "at night", "in the snow", "under a bridge", "on the moon", "in a city",
     "by a lake"] * 4, strict=False)]


def build_text_bundle(out: str | Path, say) -> Path:
    """A FLUX-layout pipeline with random weights: CLIP-L and T5-large text encoders (real shapes), a
    small FLUX transformer and a small 16-channel VAE at 256 px; FreeFlow for one step on prompts;
    exported as a text bundle (the T5 graph's weights in external data)."""
    import diffusers
    import torch

    from distill.diffusers_models import save_pipeline
    from distill.freeflow import FreeFlowConfig
    from distill.pipeline import distill_student
    from distill.text import train_tokenizer
    from distill.trainer import TrainConfig
    from export.writer import export_bundle

    out = Path(out)
    runs = out.parent / f"{out.name}-runs"
    folder = runs / "pipeline"
    say(f"[bench stages] building the text bundle in {out}")
    torch.manual_seed(0)
    clip_tokens = train_tokenizer("clip", TEXT_PROMPTS * 3, 2000)
    t5_tokens = train_tokenizer("t5", TEXT_PROMPTS * 3, 2000)
    clip_tokens.model_max_length, t5_tokens.model_max_length = 77, 256
    parts = {
        "transformer": diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=1024, pooled_projection_dim=768, axes_dims_rope=[16, 24, 24],
            guidance_embeds=True),
        "vae": diffusers.AutoencoderKL(
            block_out_channels=[32, 64, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, latent_channels=16, norm_num_groups=32,
            sample_size=256),
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        "tokenizer": clip_tokens, "tokenizer_2": t5_tokens,
        "text_encoder": _text_encoder("clip-l")[0], "text_encoder_2": _text_encoder("t5-large")[0],
    }
    save_pipeline(folder, "FluxPipeline", parts)
    quick = TrainConfig(steps=1, batch_size=2, ema_decay=0.0)
    distill_student("freeflow", f"diffusers:{folder}", FreeFlowConfig(), quick, runs / "student", progress=False,
                    prompts=TEXT_PROMPTS)
    export_bundle(runs / "student", f"diffusers:{folder}", None, out, (1.0,), progress=False)
    return out


def served_text(config: StagesBenchConfig, say) -> dict:
    """The text bundle served, one image a request: a demo's prompts (a few, repeated) with the prompt
    cache on and off, and an API's (every prompt new) with it on."""
    from flowmap.bench_serve import ServerProcess
    from flowmap.loadgen import run_load

    bundle = Path(config.text_bundle)
    if not (bundle / "manifest.json").is_file():
        in_fresh_process(build_text_bundle, str(bundle), print)
    demo = [{"prompts": [TEXT_PROMPTS[i % config.demo_prompts]], "seeds": [i], "output_format": "jpeg"}
            for i in range(64)]
    api = [{"prompts": [f"{TEXT_PROMPTS[i % len(TEXT_PROMPTS)]}, take {i}"], "seeds": [i], "output_format": "jpeg"}
           for i in range(20000)]
    runs = {}
    for label, cache, bodies in (("demo mix, cache on", 4096, demo), ("demo mix, cache off", 0, demo),
                                 ("API mix, cache on", 4096, api)):
        say(f"[bench stages] serving {bundle}: {label}, {config.served_seconds:g} s")
        server = ServerProcess(str(bundle), 8731, "--max-batch-size", "4", "--decoder-max-batch-size", "4",
                               "--max-queue-size", "64", "--no-ui", "--prompt-cache-size", str(cache))
        try:
            result = asyncio.run(run_load("127.0.0.1", server.port, "/v1/generate", bodies, config.served_clients,
                                          config.served_seconds, 1, warmup_s=5.0, disjoint=True)).summary()
            metrics = server.metrics()
        finally:
            server.stop()
        runs[label] = {"images_per_s": result["images_per_s"], "p50_ms": result["p50_ms"],
                       "statuses": result["statuses"], "cache_hit_ratio": metrics.get("flowmap_prompt_cache_hit_ratio"),
                       "stage_ms_per_request": stage_ms(metrics, ("text_encoder", "student", "decoder", "encode"))}
    return runs


def stage_ms(metrics: dict, stages) -> dict:
    """Mean ms a request spent in each of `stages` (its queue waits included), from a server's /metrics."""
    out = {}
    for stage in stages:
        total = metrics.get(f'flowmap_stage_duration_seconds_sum{{stage="{stage}"}}', 0.0)
        count = metrics.get(f'flowmap_stage_duration_seconds_count{{stage="{stage}"}}', 0.0)
        out[stage] = round(1000 * total / count, 1) if count else None
    return out


def run_stages_bench(config: StagesBenchConfig, progress: bool = True) -> dict:
    say = print if progress else (lambda *a, **k: None)
    parts = set(config.parts)
    if parts - set(PARTS):
        raise ValueError(f"--parts: unknown {sorted(parts - set(PARTS))}; the parts are {', '.join(PARTS)}")
    path = Path(config.out).with_suffix(".json")
    previous = json.loads(path.read_text()) if path.is_file() else {}
    keys = {"encoders": "encoders", "stages": "stages", "served": "served", "text": "stages",
            "text-served": "text_served", "handoffs": "handoffs", "buckets": "buckets", "memory": "memory"}
    missing = [part for part in set(PARTS) - parts if keys[part] not in previous]
    if missing:
        raise ValueError(f"--parts: {path} has no earlier {', '.join(sorted(missing))} to keep; measure them too")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    measured = {part: when if part in parts else previous.get("measured", {}).get(part, "earlier") for part in PARTS}
    report = {"config": asdict(config), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "measured": measured}
    if "encoders" in parts:
        say("[bench stages] image encoders")
    report["encoders"] = encoder_costs(config) if "encoders" in parts else previous["encoders"]
    network = (stage_costs(config, say) if "stages" in parts
               else [row for row in previous["stages"] if row["kind"] != "text"])
    text = (text_stage_costs(config, say) if "text" in parts
            else [row for row in previous["stages"] if row["kind"] == "text"])
    report["stages"] = network + text
    report["served"] = served_throughput(config, say) if "served" in parts else previous["served"]
    report["text_served"] = served_text(config, say) if "text-served" in parts else previous["text_served"]
    if "handoffs" in parts:
        say("[bench stages] encode jobs beside busy Python threads, by GIL switch interval")
    report["handoffs"] = (handoff_rows(photo(256), config.handoff_intervals_ms, config.handoff_busy_threads,
                                       config.handoff_seconds) if "handoffs" in parts else previous["handoffs"])
    if "buckets" in parts:
        say("[bench stages] batches split at the engine's buckets against padded, at several loads")
        engine, feeds = bucketed_engine(config.bucket_bundle, config.bucket_max_batch)
        report["buckets"] = bucket_rows(engine, feeds, config.bucket_loads, config.bucket_seconds,
                                        config.bucket_rounds)
    else:
        report["buckets"] = previous["buckets"]
    if "memory" in parts:
        say(f"[bench stages] host memory of the serving path's array handling at {config.memory_side} px")
    report["memory"] = (memory_rows(config.memory_side, config.memory_images) if "memory" in parts
                        else previous["memory"])
    report["limit"] = stage_limit(report)
    write_report(report, config.out, _plot, render_stages_markdown)
    return report


def one_thread_ms(report: dict, kind: str, name: str) -> float:
    """A stage's cheapest per-image cost on one thread (ONNX Runtime) over the measured batches."""
    return min(r["onnx_1_thread_ms_per_image"] for r in report["stages"] if r["kind"] == kind and r["name"] == name)


def stage_limit(report: dict) -> dict:
    """Images/s the served bundle's stages allow at best: every core busy, each on one stage's work on
    one thread (threads inside one call scale worse than calls side by side). The stages are the
    SiT-S/2 student's one jump, the tiny decoder at 256 px, and a jpeg."""
    jpeg = min(r["ms_per_image"] for r in report["encoders"] if r["side"] == 256 and r["encoder"].startswith("jpeg")
               and not r["grey"])
    per_image = {"student": one_thread_ms(report, "denoiser", "S/2"),
                 "decoder": one_thread_ms(report, "decoder", "256:tiny"), "encode": jpeg}
    limit = report["machine"]["cpus"] * 1000 / sum(per_image.values())
    return {"ms_per_image": {k: round(v, 2) for k, v in per_image.items()}, "images_per_s": round(limit, 2),
            "served_vs_limit": round(report["served"]["images_per_s"] / limit, 3)}


def stage_name(row: dict) -> str:
    if row["kind"] == "text":
        return {"clip-l": "CLIP-L text encoder (77 tokens)", "t5-large": "T5-large encoder (256 tokens)"}[row["name"]]
    if row["kind"] == "denoiser":
        return f"SiT-{row['name']} denoiser (one forward, 4x32x32)"
    side, vae = row["name"].split(":")
    return f"{'SD-VAE' if vae == 'sd-vae' else 'tiny (TAESD-shape)'} decoder, {side} px"


def stage_table(report: dict) -> list[str]:
    """The network stages as markdown rows (docs/stages.md and the README)."""
    lines = ["| stage | params (M) | batch | torch eager | ONNX Runtime | ONNX Runtime, 1 thread "
             "| torch peak RSS MB | ORT peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["stages"]:
        lines.append(f"| {stage_name(row)} | {row['params_m']} | {row['batch']} | {row['torch_ms_per_image']} "
                     f"| {row['onnx_ms_per_image']} | {row['onnx_1_thread_ms_per_image']} "
                     f"| {row['torch_peak_rss_mb']:.0f} | {row['onnx_peak_rss_mb']:.0f} |")
    return lines


def text_served_table(report: dict) -> list[str]:
    """The text bundle served under each prompt mix, as markdown rows."""
    runs = report.get("text_served") or {}
    if not runs:
        return []
    base = runs.get("demo mix, cache off", {}).get("images_per_s")
    lines = ["| run | images/s | vs demo mix, cache off | cache hit ratio | p50 ms | text encoder ms / request "
             "| student ms | decoder ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, run in runs.items():
        stages, ratio = run["stage_ms_per_request"], f"{run['images_per_s'] / base:.2f}x" if base else ""
        hit = run["cache_hit_ratio"]
        lines.append(f"| {label} | {run['images_per_s']} | {ratio} | {'' if hit is None else f'{hit:.3f}'} "
                     f"| {run['p50_ms']:.0f} | {stages['text_encoder']} | {stages['student']} | {stages['decoder']} |")
    return lines


def render_stages_markdown(report: dict, plot_name: str) -> str:
    limit, served = report["limit"], report["served"]
    lines = [
        "# What each stage costs",
        "",
        f"Written by `flowmap bench stages` on {report['machine']['cpus']} CPUs ({report['machine']['platform']}); "
        "one run, the machine shared: compare within a table, not across runs. Random weights of the real shapes; "
        "each network stage measured in a fresh process (its peak memory is its own). Parts measured: "
        + ", ".join(f"{part} {when}" for part, when in report.get("measured", {}).items()) + ".",
        "",
        "## Network stages",
        "",
        "ms per image; peak memory of a process that runs only that stage (torch: model and forward, before "
        "any export; ONNX Runtime: a process that imports no torch, as a serving replica).",
        "",
    ] + stage_table(report)
    shares = {k: v / sum(limit["ms_per_image"].values()) for k, v in limit["ms_per_image"].items()}
    lines += [
        "",
        "## A 256 px latent bundle, served",
        "",
        f"SiT-S/2 student and teacher, the tiny decoder, jpeg output (`{report['config']['bundle']}`, random "
        f"weights). Per image on one thread, at the cheapest measured batch: "
        + ", ".join(f"{k} {v} ms ({100 * shares[k]:.1f}%)" for k, v in limit["ms_per_image"].items())
        + f"; so at most **{limit['images_per_s']} images/s** on {report['machine']['cpus']} cores, each busy all "
        "the time with one stage's work.",
        "",
        f"Served over HTTP ({report['config']['served_clients']} clients, one image a request): "
        f"**{served['images_per_s']} images/s** = **{limit['served_vs_limit']}x** that limit (goal >= 0.8x), "
        f"p50 {served['p50_ms']:.0f} ms, statuses {served['statuses']}. Stage time per request as the server "
        f"measured it (ms): {served['stage_ms_per_request']}.",
        "",
        "## Text: the encoders and the prompt cache",
        "",
        f"A FLUX-layout text bundle (`{report['config']['text_bundle']}`): CLIP-L and T5-large text encoders at "
        "their real shapes (the rows above), a small FLUX transformer and a small 16-channel VAE at 256 px, "
        "random weights, jpeg output. One image a request, "
        f"{report['config']['served_clients']} clients; the demo mix cycles through "
        f"{report['config']['demo_prompts']} prompts, the API mix never repeats one.",
        "",
        *text_served_table(report),
        "",
        "## Threads back from GIL-free work",
        "",
        "The server's encode job (one 256 px photograph to a base64 JPEG, quality 90), run over and over in two "
        "threads beside busy pure-Python threads (standing in for the event loop and the engines' glue). CPython "
        "lets a busy thread keep the GIL for up to the switch interval (5 ms by default) while another waits, and the "
        "job waits like that each time it comes back from the encoder. The server's `--gil-switch-interval-ms` "
        "sets it, 0.5 ms by default.",
        "",
        *handoff_table(report["handoffs"]),
        "",
        "## Batches split at the engine's buckets",
        "",
        f"The server's batcher over the `{report['config']['bucket_bundle']}` bundle's student (onnxruntime, one "
        "thread), padding each batch to the batch buckets the GPU backends pad to (1, 2, 4, ... "
        f"{report['config']['bucket_max_batch']} rows). One-row requests arrive at random (Poisson) at a fraction "
        "of the engine's full-batch rows per second; the same arrivals are served with batches padded up to the "
        "next bucket and with `--split-to-buckets` (the default): the largest bucket below now and the rest next, "
        "where the batches' measured costs say that is cheaper. On a CPU a padding row costs what a real one does.",
        "",
        *bucket_table(report["buckets"]),
        "",
        "## Host memory at 1024 px",
        "",
        "What the serving path's array handling adds to a request's resident memory at the users' sizes, each "
        "operation in a fresh process beside its whole-array form (how the server did it before), as a multiple of "
        "the data it handles: joining a request's decoder batches frees each batch once copied, a batch's feeds are "
        "gathered and padded in one copy, the verifier clips in place, images are quantised 32 MB at a time, "
        "the candidates of a search share their prompt's condition, and a search makes, decodes and scores its "
        "candidates 64 at a time, keeping its best (its stage run with engines that answer arrays of their "
        "outputs' sizes; its whole-array form is the same stage with every candidate in one chunk).",
        "",
        *memory_table(report["memory"]),
        "",
        "## Image encoders",
        "",
        "A photograph resized to each size, encoded over and over; two threads on the same images tell "
        "whether the encoder releases the GIL (about 2x on two cores if it does, about 1x if not).",
        "",
        "| encoder | image | ms / image | bytes | 2 threads vs 1 |",
        "|---|---|---:|---:|---:|",
    ]
    for row in report["encoders"]:
        image = f"{row['side']} px {'grey' if row['grey'] else 'RGB'}"
        lines.append(f"| {row['encoder']} | {image} | {row['ms_per_image']} | {row['bytes']} "
                     f"| {row['two_thread_speedup']}x |")
    return "\n".join(lines + ["", f"![stage costs]({plot_name})", ""])


def _plot(report: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    side = max(report["config"]["sizes"])
    rows = [r for r in report["encoders"] if r["side"] == side and not r["grey"]]
    ax.barh([r["encoder"] for r in rows], [r["ms_per_image"] for r in rows], color="tab:blue")
    ax.set_xlabel(f"ms per {side} px image")
    ax.invert_yaxis()
    save_figure(fig, path)
