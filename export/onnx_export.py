"""torch -> ONNX for the graphs of a bundle, with the guidance scale baked in as a constant, and the
checks every export must pass: onnx.checker, parity with torch at batch 1, 7 and 64 (a decoder at 1
and 3), and batch invariance (a row alone equals the same row inside the largest batch)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.flow import guided_velocity, null_condition

OPSET = 18  # torch's exporter implements >= 18; TensorRT 10 and onnxruntime >= 1.16 read it
PARITY_BATCHES = (1, 7, 64)
PARITY_TOLERANCE = 1e-4
BATCH_AXIS_MAX = 65536  # the dynamic batch axis's upper bound in every exported graph and program
# protobuf cannot hold a message over 2 GB: heavier graphs keep their weights in `<file>.data` beside them
EXTERNAL_DATA_BYTES = 1 << 30


class ExportError(RuntimeError):
    """An exported graph failed a check; the message names the graph and the error."""


class StudentGraph(nn.Module):
    """(x, t, s, label) -> f(x, t, s) at one guidance scale, baked in as a constant."""

    input_names = ("x", "t", "s", "label")
    output_name = "x_s"

    def __init__(self, student: nn.Module, guidance_scale: float):
        super().__init__()
        self.student, self.guidance_scale = student, float(guidance_scale)

    @property
    def onnx_optimize(self) -> bool:  # see DecoderGraph: models that divide by `x + 1e-15` opt out
        return getattr(self.student, "onnx_optimize", True)

    def forward(self, x, t, s, label):
        return self.student.jump(x, t, s, label, torch.full_like(t, self.guidance_scale))


class TeacherGraph(nn.Module):
    """(x, t, label) -> u_w(x, t, label): both guidance passes inside one graph, the scale baked in; at
    w = 1 guidance is the conditional velocity, so the graph makes the one pass."""

    input_names = ("x", "t", "label")
    output_name = "velocity"

    def __init__(self, teacher: nn.Module, guidance_scale: float, t_lo: float = 0.0, t_hi: float = 1.0):
        super().__init__()
        self.teacher, self.guidance_scale, self.t_lo, self.t_hi = teacher, float(guidance_scale), t_lo, t_hi

    @property
    def onnx_optimize(self) -> bool:
        return getattr(self.teacher, "onnx_optimize", True)

    def forward(self, x, t, label):
        if self.guidance_scale == 1.0:
            return self.teacher.velocity(x, t, label)
        null = null_condition(self.teacher, label)
        return guided_velocity(self.teacher.velocity, x, t, label, self.guidance_scale, null, self.t_lo, self.t_hi)


class NegativeTeacherGraph(TeacherGraph):
    """(x, t, label, negative) -> u_w with `negative` as the unconditional side: a text teacher with
    guidance serves negative prompts (the server feeds the empty prompt's condition otherwise)."""

    input_names = ("x", "t", "label", "negative")

    def forward(self, x, t, label, negative):
        return guided_velocity(self.teacher.velocity, x, t, label, self.guidance_scale, negative, self.t_lo, self.t_hi)


class VerifierGraph(nn.Module):
    """image -> logits."""

    input_names = ("image",)
    output_name = "logits"

    def __init__(self, verifier: nn.Module):
        super().__init__()
        self.verifier = verifier

    def forward(self, image):
        return self.verifier(image)


def example_inputs(graph: nn.Module, batch: int, image_shape: tuple[int, ...], num_classes: int,
                   seed: int = 0, conditions: Callable | None = None) -> dict[str, torch.Tensor]:
    """Random inputs of the graph's signature (t >= s, labels including the null label's neighbours, or
    `conditions(batch, generator)` for models conditioned otherwise, e.g. on text)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *image_shape), generator=gen)
    t = torch.rand(batch, generator=gen)
    label = conditions(batch, gen) if conditions else torch.randint(0, num_classes, (batch,), generator=gen)
    values = {"x": x, "latent": x, "image": x.clamp(-1, 1), "t": t, "s": t * torch.rand(batch, generator=gen),
              "label": label, "negative": conditions(batch, gen) if conditions else None}
    return {name: values[name] for name in graph.input_names}


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers a graph of this module carries."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def external_data_file(path: str | Path) -> Path:
    """Where the exporter puts a graph's weights when they are external: `<file>.data`."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def export_onnx(graph: nn.Module, inputs: dict[str, torch.Tensor], path: str | Path,
                external_data: bool | None = None, program: torch.export.ExportedProgram | None = None) -> Path:
    """Export with a dynamic batch axis named `batch` on every input and the output. The weights go to
    `<file>.data` when `external_data` is set, or (None) when they pass EXTERNAL_DATA_BYTES. A graph
    class with `onnx_optimize = False` skips the exporter's graph optimizer. `program`, the graph already
    traced by torch.export with that axis (the bundle's .pt2 program), is converted instead of tracing the
    graph a second time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = weight_bytes(graph) > EXTERNAL_DATA_BYTES
    external_data_file(path).unlink(missing_ok=True)  # a stale file from an earlier export would mislead
    batch = torch.export.Dim("batch", min=1, max=BATCH_AXIS_MAX)
    graph = graph.eval()
    # the exporter logs a warning per torchvision operator it cannot register when torchvision is absent;
    # none of our graphs use them
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            graph if program is None else program, tuple(inputs.values()), input_names=list(graph.input_names),
            output_names=[graph.output_name], opset_version=OPSET, dynamo=True, external_data=external_data,
            dynamic_shapes=None if program is not None else {name: {0: batch} for name in graph.input_names},
            optimize=getattr(graph, "onnx_optimize", True), verbose=False,
        )
        onnx_program.save(str(path), external_data=external_data)
    strip_source_metadata(path)
    return path


def strip_source_metadata(path: Path) -> None:
    """Drop what the exporter records of our source (stack traces with file paths and line numbers,
    FX node text): the graph then depends only on the weights and the operations, so the same
    training run gives byte-identical bundles whatever the checkout's path or later code edits."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    for node in model.graph.node:
        del node.metadata_props[:]
    del model.metadata_props[:]
    onnx.save(model, str(path))


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_graph(graph: nn.Module, path: str | Path, make_inputs: Callable[[int], dict[str, torch.Tensor]],
                label: str, batches=PARITY_BATCHES, tolerance: float = PARITY_TOLERANCE) -> dict:
    """onnx.checker, torch/onnxruntime parity at each batch size, and batch invariance (rows of the
    largest of `batches` computed alone and together).

    Raises ExportError naming the graph when any check fails; returns the measured errors.
    """
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{label} ({path.name}): onnx.checker failed: {err}") from err
    session = _session(path)
    names = [i.name for i in session.get_inputs()]
    if names != list(graph.input_names):
        raise ExportError(f"{label} ({path.name}): inputs are {names}, expected {list(graph.input_names)}")
    errors = {}
    with torch.no_grad():
        for batch in batches:
            inputs = make_inputs(batch)
            expected = graph(*inputs.values()).numpy()
            actual = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
            error = float(np.abs(expected - actual).max())
            errors[f"parity_max_abs_err_b{batch}"] = error
            if not error <= tolerance:
                raise ExportError(f"{label} ({path.name}): parity with torch fails at batch {batch}: "
                                  f"max abs error {error:.3g} > {tolerance:g}")
        largest = max(batches)
        rows = sorted({0, largest // 2, largest - 1})
        inputs = make_inputs(largest)
        full = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        alone = np.concatenate([session.run(None, {k: v[i:i + 1].numpy() for k, v in inputs.items()})[0]
                                for i in rows])
        error = float(np.abs(full[rows] - alone).max())
        errors["batch_invariance_max_abs_err"] = error
        if not error <= tolerance:
            raise ExportError(f"{label} ({path.name}): a row computed alone differs from the same row in a batch "
                              f"of {largest} by {error:.3g} > {tolerance:g}")
    return errors
