"""ONNX -> TensorRT engines with the tensorrt Python API: an optimisation profile over the batch axis,
fp32 / fp16 / bf16, LayerNorm kept in fp32 under reduced precision, a timing cache, and a parity
check of every engine against onnxruntime on the same inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from export.bundle import Manifest, read_bundle, sha256_of
from export.onnx_export import ExportError
from export.trt_runtime import TrtRunner, import_tensorrt

# fp16/bf16 have ~3 significant digits; these bound the max abs error on outputs of order 1.
PARITY_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 1e-1}


@dataclass
class TensorRTConfig:
    precision: str = "fp16"  # "fp32", "fp16" or "bf16"
    min_batch: int = 1  # the optimisation profile's smallest batch ...
    opt_batch: int = 64  # ... the batch it is tuned for ...
    max_batch: int = 256  # ... and its largest
    workspace_gb: float = 4.0  # scratch memory the builder may use
    timing_cache: str = "models/.trt_timing.cache"  # shared across builds; git-ignored

    def __post_init__(self) -> None:
        if self.precision not in PARITY_TOLERANCE:
            raise ValueError(f"precision must be one of {sorted(PARITY_TOLERANCE)}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")


def _keep_norms_in_fp32(trt, network) -> int:
    """Pin normalisation layers (and the reductions a decomposed LayerNorm is made of) to fp32."""
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        is_norm = layer.type == trt.LayerType.NORMALIZATION
        in_layernorm = "layernorm" in layer.name.lower() or "layer_norm" in layer.name.lower()
        if is_norm or in_layernorm:
            layer.precision = trt.float32
            for out in range(layer.num_outputs):
                layer.set_output_type(out, trt.float32)
            pinned += 1
    return pinned


def build_engine(onnx_path: str | Path, engine_path: str | Path, config: TensorRTConfig) -> dict:
    """Build and serialize one engine; returns its manifest entry (without the sha256)."""
    trt, _ = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gb * (1 << 30)))
    pinned = 0
    if config.precision in ("fp16", "bf16"):
        builder_config.set_flag(trt.BuilderFlag.FP16 if config.precision == "fp16" else trt.BuilderFlag.BF16)
        builder_config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _keep_norms_in_fp32(trt, network)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (config.min_batch, *rest), (config.opt_batch, *rest), (config.max_batch, *rest))
    builder_config.add_optimization_profile(profile)
    cache_path = Path(config.timing_cache)
    cache = builder_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    builder_config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(builder_config.get_timing_cache().serialize()))
    device_name = _device_name()
    return {"file": Path(engine_path).name, "source": Path(onnx_path).name, "precision": config.precision,
            "min_batch": config.min_batch, "opt_batch": config.opt_batch, "max_batch": config.max_batch,
            "fp32_norm_layers": pinned, "device_name": device_name, "tensorrt_version": trt.__version__}


def _device_name() -> str:
    _, cudart = import_tensorrt()
    error, props = cudart.cudaGetDeviceProperties(0)
    name = props.name
    return name.decode().rstrip("\x00") if isinstance(name, bytes) else str(name)


def engine_parity(onnx_path: str | Path, engine_path: str | Path, feeds_for, config: TensorRTConfig) -> float:
    """Max abs difference between the engine and onnxruntime (CPU) over a few batch sizes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    runner = TrtRunner(engine_path)
    try:
        worst = 0.0
        for batch in sorted({config.min_batch, min(7, config.max_batch), config.opt_batch, config.max_batch}):
            feeds = feeds_for(batch)
            expected = session.run(None, feeds)[0]
            worst = max(worst, float(np.abs(runner.run(feeds) - expected).max()))
    finally:
        runner.close()
    tolerance = PARITY_TOLERANCE[config.precision]
    if not worst <= tolerance:
        raise ExportError(f"TensorRT engine {Path(engine_path).name} ({config.precision}) differs from onnxruntime "
                          f"by {worst:.3g} > {tolerance:g}")
    return worst


def random_feeds(session_inputs, batch: int, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a bundle graph from its ONNX input list (x/latent/image, t, s, a class label or a text
    condition, token ids)."""
    rng = np.random.default_rng(seed)
    feeds, t = {}, rng.random(batch, dtype=np.float32)
    for spec in session_inputs:
        if spec.name in ("x", "latent", "image", "negative") or (spec.name == "label" and len(spec.shape) > 1):
            feeds[spec.name] = rng.standard_normal((batch, *spec.shape[1:]), dtype=np.float32).clip(-3, 3)
        elif spec.name.startswith("ids"):  # token ids (text encoder, scorer): low ids exist in every vocabulary
            feeds[spec.name] = rng.integers(0, 32, (batch, *spec.shape[1:])).astype(np.int64)
        elif spec.name == "t":
            feeds[spec.name] = t
        elif spec.name == "s":
            feeds[spec.name] = (t * rng.random(batch, dtype=np.float32)).astype(np.float32)
        elif spec.name == "label":
            feeds[spec.name] = rng.integers(0, num_classes, batch).astype(np.int64)
    return feeds


def engine_sources(bundle) -> list:
    """Every ONNX graph of a bundle that gets a TensorRT engine: students, teacher, and the verifier,
    decoder and text encoder where the bundle has them."""
    optional = (bundle.verifier, bundle.decoder, bundle.text.encoder if bundle.text else None)
    return [*bundle.students, bundle.teacher, *(graph for graph in optional if graph is not None)]


def add_tensorrt_engines(bundle_dir: str | Path, config: TensorRTConfig, progress: bool = True) -> list[dict]:
    """Build an engine for every ONNX graph of a bundle, check parity, and list them in the manifest."""
    import onnxruntime as ort

    import_tensorrt()  # fail early with the install hint
    bundle = read_bundle(bundle_dir)
    entries = []
    for graph in engine_sources(bundle):
        engine_path = graph.path.with_name(f"{graph.path.stem}.{config.precision}.engine")
        entry = build_engine(graph.path, engine_path, config)
        inputs = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"]).get_inputs()
        entry["parity_max_abs_err"] = engine_parity(
            graph.path, engine_path, lambda b, i=inputs: random_feeds(i, b, bundle.num_classes, seed=b), config)
        entry["sha256"] = sha256_of(engine_path)
        entries.append(entry)
        if progress:
            print(f"  built {engine_path.name}: parity {entry['parity_max_abs_err']:.2e}", flush=True)
    manifest = Manifest.load(bundle_dir)
    manifest.tensorrt = [e for e in manifest.tensorrt if e.get("precision") != config.precision] + entries
    manifest.provenance["tensorrt_config"] = asdict(config)
    manifest.save(bundle_dir)
    read_bundle(bundle_dir)
    return entries
