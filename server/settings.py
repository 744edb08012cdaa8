"""Server settings: `FLOWMAP_*` environment variables, overridden by `flowmap serve` flags."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.encoding import GPU_JPEG_MIN_SIDE
from server.schemas import bounds_of
from server.torch_engine import LOW_PRECISION_TOLERANCE
from ui.temp_files import DEFAULT_CACHE_SECONDS

# CPython lets a busy thread keep the GIL for up to the switch interval (5 ms) while another waits, and a thread
# back from GIL-free work (an encoder, an engine) waits so each time. Beside four busy Python threads a 256 px JPEG
# encode job took 9.5 ms at 5 ms and 1.5 ms at 0.5 ms (docs/stages.md, `flowmap bench stages --parts handoffs`).
# Served on the H200 at 0.5 ms with 8 encode threads, a 256 px request's encoding took 2.43 ms (docs/gpu.md; an
# earlier run at 5 ms with 2 threads made about 12 ms a job, worked out from its throughput, with a gate on the
# event loop in front of the threads as well). Served on this project's 2-core CPU, 0.5 ms neither cost nor bought
# anything measurable (scripts/switch_interval_ab.py, six alternating runs of each: digits made 3207 to 3477
# images/s at 5 ms and 3229 to 3619 at 0.5 ms), so it is the default everywhere.
DEFAULT_SWITCH_INTERVAL_MS = 0.5


# the torch backend's own flags, refused with another backend (which would ignore them)
TORCH_ONLY = ("torch_dtype", "torch_float32_stages", "torch_compile", "torch_compile_cache", "torch_compile_mode",
              "torch_channels_last", "torch_cudnn_benchmark")


def settings_error(err) -> str:
    """pydantic's refusal of settings as one line per field, naming its flag and variable and the allowed range."""
    lines = []
    for error in err.errors():
        name = str(error["loc"][0]) if error.get("loc") else ""
        field = Settings.model_fields.get(name)
        if field is None:  # a check across fields: its message names the flags
            lines.append(error["msg"].removeprefix("Value error, "))
            continue
        bounds = bounds_of(field)
        words = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
        if error.get("type") == "finite_number" and not set(bounds) >= {"le"}:
            allowed = "must be a finite number"
        elif set(bounds) == {"ge", "le"}:
            allowed = f"must lie in {bounds['ge']}..{bounds['le']}"
        elif bounds:
            allowed = "must be " + " and ".join(f"{words[key]} {value}" for key, value in bounds.items())
        else:
            allowed = error["msg"].removeprefix("Value error, ")
        lines.append(f"--{name.replace('_', '-')} (FLOWMAP_{name.upper()}) {allowed}, got {error.get('input')!r}")
    return "; ".join(lines)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWMAP_", extra="ignore", allow_inf_nan=False)

    bundle: str = Field("models/digits", description="the bundle folder to serve (manifest.json and graphs)")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for every interface)")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    backend: str = Field("onnxruntime", description="onnxruntime, tensorrt (native engines) or torch (the bundle's "
                         "torch.export programs, `flowmap export --torch-programs`)")
    providers: str = Field("cpu", description="onnxruntime providers: cpu, cuda or tensorrt (which builds its "
                           "engines in fp16)")
    trt_cache_dir: str = Field("models/.ort_trt_cache", description="engine cache of the TensorRT provider")
    cuda_graphs: bool = Field(False, description="tensorrt and torch backends: replay each batch size as a CUDA graph")
    device: str = Field("cpu", description="torch backend: cpu or cuda[:N]")
    torch_dtype: str = Field("float32", description="torch backend: float32, bfloat16 or float16 (autocast), or "
                             "float8 (linear layers over tokens in e4m3, the rest bfloat16; CUDA compute capability "
                             "8.9 or later, or the CPU), checked against float32 at start")
    torch_float32_stages: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="torch backend: comma-separated stages kept in float32 whatever "
        "--torch-dtype says (student, teacher, verifier, text_encoder, decoder): one whose parity check fails in "
        "bfloat16/float16/float8, e.g. a T5 text encoder in float16")
    torch_compile: bool = Field(False, description="torch backend: torch.compile every batch bucket at start")
    torch_compile_cache: str = Field("", description="torch backend with --torch-compile: a folder for "
                                     "torch.compile's cache (compiled graphs and kernels), which a restart or another "
                                     "replica given the same folder starts from instead of compiling again")
    torch_compile_mode: str = Field("default", description="torch backend with --torch-compile: default, or "
                                    "max-autotune (each batch bucket compiled static with matrix-product kernels that "
                                    "inductor times against cuBLAS: minutes more at start, for a faster forward)")
    torch_channels_last: bool = Field(False, description="torch backend: graphs with 2-D convolutions (VAE decoders) "
                                      "run channels-last (NHWC), their weights and 4-D inputs laid out so: the "
                                      "layout cuDNN's convolutions work in, which inductor picks itself only for "
                                      "graphs compiled static in the batch")
    torch_cudnn_benchmark: bool = Field(False, description="torch backend on CUDA: cuDNN times its convolution "
                                        "algorithms on each batch bucket's shape at start and keeps the fastest "
                                        "(the VAE decoders' convolutions)")
    torch_parity_tolerance: float = Field(LOW_PRECISION_TOLERANCE, gt=0, description="torch backend: largest error of "
                                          "bfloat16/float16 against float32, relative to the output's largest value")
    intra_op_threads: int = Field(0, ge=0, le=256, description="threads per engine run, 0..256; 0 = onnxruntime's "
                                  "default")
    max_batch_size: int = Field(64, ge=1, le=4096, description="rows per engine run, 1..4096")
    decoder_max_batch_size: int = Field(8, ge=1, le=4096, description="rows per run of the VAE decoder (format 2 "
                                        "bundles): it costs far more per row than a denoiser step")
    split_to_buckets: bool = Field(True, description="engines with batch buckets (GPU backends): run the largest "
                                   "bucket below the queued rows now and the rest next, where the measured batch "
                                   "costs say that beats padding them all to the bucket above")
    max_queue_delay_ms: float = Field(2.0, ge=0, le=10_000, description="how long the first row of a batch waits "
                                      "for company before the batch runs, 0..10000 ms")
    max_queue_size: int = Field(4096, ge=1, le=1 << 20, description="rows of admitted requests per engine; beyond "
                                "it new requests wait or get 429 (at least max_batch_size)")
    max_images_mb: float = Field(8192, ge=0.01, le=1 << 24, description="host memory for the images of admitted "
                                 "requests (float32, with their noise and latents; about 15 MB an image at 1024 px); "
                                 "beyond it a request waits or gets 429, and one larger than all of it 413")
    max_admission_wait_s: float = Field(1.0, ge=0, le=3600, description="how long a request may wait at the door, "
                                        "first come first served, for room in a full queue before 429; 0 = refuse at "
                                        "once")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request's deadline, from arrival; work "
                                     "that cannot finish by it is refused up front")
    prompt_cache_size: int = Field(4096, ge=0, le=1 << 20, description="text bundles: conditions of this many "
                                   "recent prompts kept, so a repeated prompt skips the text encoder; 0 = off")
    prompt_cache_mb: float = Field(1024, ge=0, le=1 << 20, description="text bundles: the prompt cache holds at "
                                   "most this many MB of conditions (one T5 condition of SD3 or FLUX is 5-8 MB)")
    encode_workers: int = Field(0, ge=0, le=64, description="threads that encode images (png/jpeg/webp) off the "
                                "event loop; the encoders release the GIL. 0 = 2 on a CPU (the engines need its "
                                "cores), half the cores this process may use (2..8) where "
                                "the engines run on a GPU")
    gil_switch_interval_ms: float = Field(DEFAULT_SWITCH_INTERVAL_MS, ge=0.05, le=100, description="how long a "
                                          "Python thread may keep the GIL from one that waits for it (CPython's "
                                          "default is 5 ms): threads back from GIL-free work, engines and encoders, "
                                          "wait that long behind a busy one, each time")
    gpu_jpeg_min_side: int = Field(GPU_JPEG_MIN_SIDE, ge=0, le=1 << 16, description="torch backend on CUDA: RGB "
                                   "JPEG images this many pixels wide or high, or more, are encoded by nvJPEG on the "
                                   "GPU, smaller ones on the CPU (4:2:0, as the CPU backend encodes); 0 = all on GPU")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30, description="largest request body accepted (413 beyond)")
    drain_timeout_s: float = Field(30.0, ge=0, le=3600, description="on SIGTERM, how long queued work may take")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                     description="comma-separated bearer tokens; when set, /v1, "
                                                                 "/metrics and the demo's calls need one")
    ui: bool = Field(True, description="mount the Gradio demo at /ui (with api_keys set it asks visitors for a key)")
    ui_cache_seconds: int = Field(DEFAULT_CACHE_SECONDS, ge=1, le=7 * 24 * 3600, description="the demo's "
                                  "temporary image files are deleted after this many seconds")
    fast_path: bool = Field(True, description="dispatch the generation routes straight from ASGI (same handlers "
                            "and errors, less CPU per request)")
    access_log: bool = Field(False, description="uvicorn's per-request log line (costs about 4 percent of a core "
                             "under load)")
    verify_bundle: bool = Field(True, description="check every file's sha256 at start")

    def engines_on_gpu(self) -> bool:
        """Whether the engines run on a GPU (the torch backend on CUDA, TensorRT, onnxruntime's CUDA or TensorRT
        providers), leaving the host's cores to the server's own threads."""
        if self.backend == "onnxruntime":
            return self.providers != "cpu"
        return self.backend == "tensorrt" or self.device.startswith("cuda")

    def encode_threads(self) -> int:
        """Encoding threads (--encode-workers, 0 = by device and cores)."""
        if self.encode_workers:
            return self.encode_workers
        if not self.engines_on_gpu():
            return 2
        # the cores this process may run on (a container's or a Ray replica's cpuset), not the host's
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
        return min(8, max(2, cores // 2))

    @field_validator("api_keys", "torch_float32_stages", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("torch_float32_stages")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        from server.engines import STAGES

        unknown = [stage for stage in value if stage not in STAGES]
        if unknown:
            raise ValueError(f"torch_float32_stages: unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
        return value

    @model_validator(mode="after")
    def _queue_holds_a_batch(self):
        if self.max_queue_size < self.max_batch_size:
            raise ValueError(f"--max-queue-size ({self.max_queue_size}) must be at least --max-batch-size "
                             f"({self.max_batch_size}): a queue smaller than one batch never fills it (and the "
                             "warm-up runs a full batch)")
        return self

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value not in ("onnxruntime", "tensorrt", "torch"):
            raise ValueError("backend must be onnxruntime, tensorrt or torch")
        return value

    @model_validator(mode="after")
    def _torch_options(self):
        if self.backend == "torch":
            self.torch_options()  # a bad dtype, device or CUDA graphs on a CPU fails here, naming the flag
        elif self.device != "cpu":  # the other torch flags are only ignored; a GPU that is not used is a surprise
            raise ValueError(f"--device {self.device} applies to --backend torch only: onnxruntime runs on a GPU with "
                             "--providers cuda or tensorrt, and --backend tensorrt always does")
        else:  # a torch flag given to another backend would be ignored: the operator meant something else
            defaults = Settings.model_fields
            given = [name for name in TORCH_ONLY if getattr(self, name) != defaults[name].get_default(
                call_default_factory=True)]
            if self.cuda_graphs and self.backend == "onnxruntime":
                given.insert(0, "cuda_graphs")
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} applies to --backend torch"
                                 f"{' or tensorrt' if given[0] == 'cuda_graphs' else ''} only, not {self.backend}")
        return self

    def torch_options(self, engine: str | None = None):
        """The torch backend's options (for `engine`: float32 where --torch-float32-stages names its stage); torch
        itself is imported only by the engine."""
        from server.engines import stage_of
        from server.torch_engine import TorchOptions

        dtype = "float32" if engine and stage_of(engine) in self.torch_float32_stages else self.torch_dtype
        return TorchOptions(self.device, dtype, self.torch_compile, self.cuda_graphs, self.torch_parity_tolerance,
                            self.torch_compile_cache, self.torch_compile_mode, self.torch_channels_last,
                            self.torch_cudnn_benchmark)

    @field_validator("providers")
    @classmethod
    def _providers(cls, value: str) -> str:
        if value not in ("cpu", "cuda", "tensorrt"):
            raise ValueError("providers must be cpu, cuda or tensorrt")
        return value


@dataclass
class RayOptions:
    """How `flowmap serve --ray` deploys: app replicas (or an autoscaling range), their resources, and
    the decoder deployment's."""

    replicas: int = 2
    autoscale_max: int = 0  # > replicas turns on autoscaling between `replicas` and this many
    target_ongoing_requests: int = 64  # the autoscaler's target per replica
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    decoder_replicas: int = 1  # replicas of the decoder deployment (bundles with a decoder)
    cpus_per_decoder: float = 1.0

    def __post_init__(self) -> None:
        # the smallest value each takes; Ray itself would fail later, inside a replica's start
        least = {"replicas": 1, "autoscale_max": 0, "target_ongoing_requests": 1, "cpus_per_replica": 0.01,
                 "gpus_per_replica": 0.0, "decoder_replicas": 1, "cpus_per_decoder": 0.01}
        for name, lowest in least.items():
            value = getattr(self, name)
            if not lowest <= value < float("inf"):  # NaN fails it too
                raise ValueError(f"--{name.replace('_', '-')} must be at least {lowest:g} and finite, got {value}")
