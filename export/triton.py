"""A Triton Inference Server model repository for a bundle's graphs: one model per graph, each with a
`config.pbtxt` (dynamic batching, max batch size, instance groups) and its ONNX file (or TensorRT
plan) in version folder 1. Shapes and types are read from the ONNX graphs themselves. A bundle with a
text encoder or a decoder also gets an ensemble per student chaining them: a text bundle's takes the
prompts' token ids (from the bundle's tokenizer files) where a class bundle's takes labels, a latent
bundle's gives decoded images."""

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
        for name in ("max_batch_size", "instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"--triton-{'max-batch' if name == 'max_batch_size' else name} must be at least 1, "
                                 f"got {getattr(self, name)}")
        if self.kind not in ("KIND_CPU", "KIND_GPU"):
            raise ValueError(f"kind must be KIND_CPU or KIND_GPU, got {self.kind!r}")
        if any(b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise ValueError("preferred batch sizes must not exceed max_batch_size")


def preferred_batches(max_batch_size: int) -> tuple[int, ...]:
    """The default preferred batch sizes that fit under `max_batch_size`, or that size alone."""
    return tuple(size for size in TritonConfig.preferred_batch_sizes if size <= max_batch_size) or (max_batch_size,)


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
    """Write one Triton model per bundle graph into `out`, and per student an ensemble where the bundle has a text
    encoder or a decoder to chain it with; returns the config paths."""
    config = config or TritonConfig()
    bundle = read_bundle(bundle_dir)
    out = Path(out)
    text_encoder = bundle.text.encoder if bundle.text is not None else None
    graphs = [(f"{bundle.name}_student_w{g.guidance_scale:g}", g) for g in bundle.students]
    graphs += [(f"{bundle.name}_{part}", graph)
               for part, graph in (("teacher", bundle.teacher), ("verifier", bundle.verifier),
                                   ("decoder", bundle.decoder), ("text_encoder", text_encoder))
               if graph is not None]
    plans = {p.source: p for p in bundle.tensorrt if p.precision == config.tensorrt_precision}
    written = []
    for name, graph in graphs:
        model_dir = out / model_name(name)
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
            if graph.data is not None:  # the graph names its weights file; it must sit beside it
                shutil.copyfile(graph.data, version / graph.data.name)
            platform = "onnxruntime_onnx"
        (model_dir / "config.pbtxt").write_text(model_config(model_dir.name, platform, inputs, outputs, config))
        written.append(model_dir / "config.pbtxt")
    if text_encoder is None and bundle.decoder is None:
        return written
    for name, graph in graphs:
        if "_student_" in name:
            # prompts' token ids -> condition -> the student's jump -> the decoder's image, as far as the bundle goes
            chain = [*([(f"{bundle.name}_text_encoder", text_encoder.path, None)] if text_encoder else []),
                     (name, graph.path, "label" if text_encoder else None),
                     *([(f"{bundle.name}_decoder", bundle.decoder.path, "latent")] if bundle.decoder else [])]
            written.append(write_ensemble(out, f"{model_name(name)}_image", chain, config))
    return written


def model_name(name: str) -> str:
    """A Triton model's folder name: a guidance scale's point would read as a file extension ("w1.5" -> "w1_5")."""
    return name.replace(".", "_")


def write_ensemble(out: Path, name: str, chain: list[tuple[str, Path, str | None]], config: TritonConfig) -> Path:
    """`name`: a Triton ensemble running `chain`'s models in turn, each as (model, its ONNX graph, the input the
    model before feeds, None for the first); the ensemble takes every other input of them and gives the last
    one's output."""
    steps, inputs = [], []
    for i, (model, path, fed) in enumerate(chain):
        (model_inputs, (output, *_)) = graph_signature(path)
        inputs += [row for row in model_inputs if row[0] != fed]
        maps = [f'      input_map {{ key: "{n}" value: "{n}" }}' for n, _, _ in model_inputs if n != fed]
        if fed is not None:
            maps.append(f'      input_map {{ key: "{fed}" value: "{chain[i - 1][0]}_out" }}')
        last = i == len(chain) - 1
        maps.append(f'      output_map {{ key: "{output[0]}" value: "{output[0] if last else model + "_out"}" }}')
        steps.append("\n".join(["    {", f'      model_name: "{model_name(model)}"', "      model_version: -1", *maps,
                                "    }"]))
    text = "\n".join([
        f'name: "{name}"',
        'platform: "ensemble"',
        f"max_batch_size: {config.max_batch_size}",
        "input [", ",\n".join(_tensor_block(*row) for row in inputs), "]",
        "output [", _tensor_block(*output), "]",
        "ensemble_scheduling {",
        "  step [",
        ",\n".join(steps),
        "  ]",
        "}",
        "",
    ])
    model_dir = out / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text)
    return model_dir / "config.pbtxt"
