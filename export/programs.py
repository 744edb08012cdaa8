"""Graphs as `torch.export` programs (`.pt2`), beside their ONNX files: what the torch serving backend
loads on a GPU where neither TensorRT nor onnxruntime-gpu can be installed. The program is the same
graph module the ONNX file came from, with the same input names and a dynamic batch axis, and it is
parity-checked against that module like every graph. Its archive also holds the module's float32 output at
the program's example inputs, which the torch backend checks its low-precision output against."""

from __future__ import annotations

import base64
import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_export import BATCH_AXIS_MAX, PARITY_BATCHES, PARITY_TOLERANCE, ExportError

# in each program's archive: the module's float32 output at the program's example inputs, which a server checks its
# bf16/fp16 output against without holding float32 weights on its GPU (a FLUX-size transformer's are 48 GB)
REFERENCE_FILE = "reference_output.npy"


def program_file(onnx_file: str) -> str:
    """`student_w1.5.onnx` -> `student_w1.5.pt2`."""
    return str(Path(onnx_file).with_suffix(".pt2"))


def export_program(graph: nn.Module, inputs: dict[str, torch.Tensor], path: str | Path) -> Path:
    """torch.export with a dynamic batch axis on every input, saved as a .pt2 archive."""
    return save_program(trace_program(graph, inputs), graph, inputs, path)


def trace_program(graph: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch axis on every input.

    Some models branch on the batch size (diffusers' Upsample2D makes its input contiguous from 64 rows
    up), which a dynamic axis cannot follow: a draft export finds the range the traced branch holds for,
    and the program is exported over that range (the torch engine then batches within it)."""
    args = tuple(inputs.values())

    def export(batch):
        return torch.export.export(graph.eval(), args, dynamic_shapes={name: {0: batch} for name in graph.input_names})

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            return export(torch.export.Dim("batch", min=1, max=BATCH_AXIS_MAX))
        except (torch.fx.experimental.symbolic_shapes.ConstraintViolationError, torch._dynamo.exc.UserError) as err:
            # the error suggests the range that holds ("batch = Dim('batch', max=63)"); a draft export finds it
            # where it does not, at about twice an export's time
            suggested = re.search(r"Dim\('batch'[^)]*max=(\d+)", str(err))
            limit = int(suggested.group(1)) if suggested else batch_limit(torch.export.draft_export(
                graph.eval(), args, dynamic_shapes={name: {0: torch.export.Dim("batch", min=1, max=BATCH_AXIS_MAX)}
                                                    for name in graph.input_names}))
            return export(torch.export.Dim("batch", min=1, max=limit))


def save_program(program: torch.export.ExportedProgram, graph: nn.Module, inputs: dict[str, torch.Tensor],
                 path: str | Path) -> Path:
    """The traced `program` as a .pt2 archive at `path`, with `graph`'s float32 output at `inputs` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        reference = graph.eval()(*inputs.values())
    buffer = io.BytesIO()
    np.save(buffer, reference.float().numpy())
    torch.export.save(program, str(path), extra_files={REFERENCE_FILE: base64.b64encode(buffer.getvalue()).decode()})
    return path


def read_program(path: str | Path) -> tuple[torch.export.ExportedProgram, np.ndarray | None]:
    """A `.pt2` program on the CPU, and the float32 output at its example inputs that export saved beside it (None
    in an archive written before it was)."""
    extra = {REFERENCE_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    text = extra[REFERENCE_FILE]
    return program, np.load(io.BytesIO(base64.b64decode(text))) if text else None


def batch_limit(program) -> int:
    """The most rows a program runs (BATCH_AXIS_MAX where its batch axis was not narrowed)."""
    uppers = [value.upper for value in program.range_constraints.values()]
    bounded = (int(upper) for upper in uppers if upper != float("inf") and int(upper) < BATCH_AXIS_MAX)
    return min([BATCH_AXIS_MAX, *bounded])


def check_program(graph: nn.Module, path: str | Path, make_inputs: Callable[[int], dict[str, torch.Tensor]],
                  label: str, batches=PARITY_BATCHES, tolerance: float = PARITY_TOLERANCE) -> dict:
    """The saved program, loaded back, against the module it came from at each batch size."""
    module = torch.export.load(str(path)).module()
    errors = {}
    with torch.no_grad():
        for batch in batches:
            inputs = make_inputs(batch)
            error = float(np.abs(graph(*inputs.values()).numpy() - module(*inputs.values()).numpy()).max())
            errors[f"program_max_abs_err_b{batch}"] = error
            if not error <= tolerance:
                raise ExportError(f"{label} ({Path(path).name}): the torch.export program differs from torch at "
                                  f"batch {batch}: max abs error {error:.3g} > {tolerance:g}")
    return errors
