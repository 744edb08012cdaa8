"""What a `flowmap bench gpu` run can be asked to measure (its parts, the models and the modes the torch engine runs
them in) and what one run is asked: which of those, at which batches, under which load."""

from __future__ import annotations

from dataclasses import dataclass

MODES = {  # name -> the torch engine's options (server/torch_engine.py's TorchOptions) beside device and cache
    "eager-fp32": {"dtype": "float32"},
    "eager-bf16": {"dtype": "bfloat16"},
    # eager kernels replayed as hand-captured CUDA graphs (what serving uses)
    "graphs-bf16": {"dtype": "bfloat16", "cuda_graphs": True},
    "compiled-bf16": {"dtype": "bfloat16", "compile": True},
    "compiled-graphs-bf16": {"dtype": "bfloat16", "compile": True, "cuda_graphs": True},  # "reduce-overhead"
    # graphs with convolutions (the decoders) laid out channels-last (NHWC), the layout cuDNN works in
    "graphs-bf16-nhwc": {"dtype": "bfloat16", "cuda_graphs": True, "channels_last": True},
    "compiled-graphs-bf16-nhwc": {"dtype": "bfloat16", "compile": True, "cuda_graphs": True, "channels_last": True},
    # and cuDNN's convolution algorithms timed per bucket at start (--torch-cudnn-benchmark)
    "graphs-bf16-nhwc-cudnn": {"dtype": "bfloat16", "cuda_graphs": True, "channels_last": True,
                               "cudnn_benchmark": True},
    "compiled-graphs-bf16-nhwc-cudnn": {"dtype": "bfloat16", "compile": True, "cuda_graphs": True,
                                        "channels_last": True, "cudnn_benchmark": True},
    # each bucket compiled static with inductor's tuned matrix products, CUDA graphs: "max-autotune"
    "autotuned-graphs-bf16": {"dtype": "bfloat16", "compile": True, "cuda_graphs": True,
                              "compile_mode": "max-autotune"},
    # a denoiser's linear layers over tokens in float8 (e4m3, scaled per token and per output channel), the rest bf16
    "compiled-graphs-fp8": {"dtype": "float8", "compile": True, "cuda_graphs": True},
    "autotuned-graphs-fp8": {"dtype": "float8", "compile": True, "cuda_graphs": True, "compile_mode": "max-autotune"},
}

# in the order a run cut off by its time limit would want them: the goals' denoisers first
MODELS = ("sit-xl/2", "sana-1024", "sd-vae-256", "dc-ae-1024")
DECODERS = ("sd-vae-256", "dc-ae-1024")  # the rest are denoisers (judged on MFU)
# one-step text-to-image at 1024 px, (denoiser, decoder): set beside SANA-Sprint's figure
ONE_STEP = ("sana-1024", "dc-ae-1024")

PARTS = ("peak", "jpeg", "served", "stages")
WHOLE_PARTS = tuple(part for part in PARTS if part != "stages")  # measured at once; stages go by model and mode


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
