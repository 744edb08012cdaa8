"""A Triton Inference Server model repository for a bundle's graphs: one model per graph, each with a
`config.pbtxt` (dynamic batching, max batch size, instance groups) and its ONNX file (or TensorRT
plan) in version folder 1. Shapes and types are read from the ONNX graphs themselves."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from export.bundle import read_bundle

ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 7: "TYPE_INT64", 6: "TYPE_INT32"}


@dataclass
class TritonConfig:
    max_batch_size: int = 256
    preferred_batch_sizes: tuple[int, ...] = (16, 64)
    max_queue_delay_us: int = 2000
    instances: int = 1
    kind: str = "KIND_CPU"  # KIND_GPU on a GPU server
    tensorrt_precision: str | None = None  # use the bundle's TensorRT plans of this precision instead of ONNX
    preserve_ordering: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("KIND_CPU", "KIND_GPU"):
            raise ValueError(f"kind must be KIND_CPU or KIND_GPU, got {self.kind!r}")
        if any(b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise ValueError("preferred batch sizes must not exceed max_batch_size")


def graph_signature(onnx_path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """([(name, triton type, per-item dims)], same for outputs): the batch axis dropped."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def describe(values):
        rows = []
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_value for d in tensor.shape.dim][1:]  # dim 0 is the dynamic batch axis
            rows.append((value.name, ONNX_TO_TRITON[tensor.elem_type], dims))
        return rows

    initializers = {i.name for i in model.graph.initializer}
    return describe([v for v in model.graph.input if v.name not in initializers]), describe(model.graph.output)


def _tensor_block(name: str, dtype: str, dims: list[int]) -> str:
    # Triton needs at least one dim per item: a per-row scalar is [1] in the API, reshaped to [] for the model.
    if dims:
        return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}'
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ 1 ] reshape: {{ shape: [ ] }} }}'


def model_config(name: str, platform: str, inputs, outputs, config: TritonConfig) -> str:
    preferred = ", ".join(str(b) for b in config.preferred_batch_sizes)
    return "\n".join([
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {config.max_batch_size}",
        "input [",
        ",\n".join(_tensor_block(*row) for row in inputs),
        "]",
        "output [",
        ",\n".join(_tensor_block(*row) for row in outputs),
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {preferred} ]",
        f"  max_queue_delay_microseconds: {config.max_queue_delay_us}",
        f"  preserve_ordering: {str(config.preserve_ordering).lower()}",
        "}",
        f"instance_group [ {{ count: {config.instances} kind: {config.kind} }} ]",
        "",
    ])


def write_triton_repository(bundle_dir: str | Path, out: str | Path, config: TritonConfig | None = None) -> list[Path]:
    """Write one Triton model per bundle graph into `out`; returns the config paths."""
    config = config or TritonConfig()
    bundle = read_bundle(bundle_dir)
    out = Path(out)
    graphs = [(f"{bundle.name}_student_w{g.guidance_scale:g}", g) for g in bundle.students]
    graphs += [(f"{bundle.name}_teacher", bundle.teacher), (f"{bundle.name}_verifier", bundle.verifier)]
    plans = {p.source: p for p in bundle.tensorrt if p.precision == config.tensorrt_precision}
    written = []
    for name, graph in graphs:
        model_dir = out / name.replace(".", "_")
        version = model_dir / "1"
        version.mkdir(parents=True, exist_ok=True)
        inputs, outputs = graph_signature(graph.path)
        if config.tensorrt_precision:
            if graph.path.name not in plans:
                raise ValueError(f"the bundle has no {config.tensorrt_precision} TensorRT engine for {graph.path.name}")
            shutil.copyfile(plans[graph.path.name].path, version / "model.plan")
            platform = "tensorrt_plan"
        else:
            shutil.copyfile(graph.path, version / "model.onnx")
            platform = "onnxruntime_onnx"
        (model_dir / "config.pbtxt").write_text(model_config(model_dir.name, platform, inputs, outputs, config))
        written.append(model_dir / "config.pbtxt")
    return written
