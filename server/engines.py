"""Engines: one interface, `run(feeds) -> array`, over onnxruntime (CPU, CUDA or TensorRT execution
providers), native TensorRT engines, and torch: the bundle's torch.export programs (server/torch_engine.py),
or, for development, graphs rebuilt from digits-style run directories."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from export.bundle import Bundle, Graph
from server.imaging import fill_rows


class Engine(Protocol):
    name: str
    max_batch: int
    buckets: tuple[int, ...]  # batch sizes the backend is fastest at (padding targets); () = any size

    # an array with rows first, sliced per request by the batcher: numpy, or (the torch backend's decoder)
    # server/imaging.DeviceImages: its images left on its device, their 8-bit pixels on the host. Called from one
    # thread at a time (the batcher's worker; Ray's decoder deployment through SerialDecoder): a CUDA-graph engine's
    # static buffers hold one batch
    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


# Batch sizes the GPU backends prefer (padding targets, CUDA-graph shapes) and the metrics' histogram buckets.
POWERS_OF_TWO = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


# the kinds of engine a bundle makes; a student's engine is named student@<w>, the others by their kind
STAGES = ("student", "teacher", "verifier", "text_encoder", "decoder")


def stage_of(engine: str) -> str:
    """`student@1.5` -> `student`; `decoder` -> `decoder`."""
    return engine.split("@")[0]


def student_engine(guidance_scale: float) -> str:
    """The engine name of the student graph with this baked guidance scale: `student@1.5`."""
    return f"student@{guidance_scale:g}"


def padded_size(rows: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `rows`, or `rows` itself when there are no buckets."""
    return next((b for b in buckets if b >= rows), rows)


def pad_rows(array: np.ndarray, size: int) -> np.ndarray:
    """`array` with its last row repeated up to `size` rows (a bucket's): padding whose output is dropped."""
    return array if size <= len(array) else stack_rows([array], size)


def stack_rows(blocks: list[np.ndarray], size: int) -> np.ndarray:
    """The blocks' rows in order in one new array of at least `size` rows, the last row repeated as padding: one
    copy (a 64-row batch of FLUX conditions is 537 MB; joining, then padding, copied it twice). It empties
    `blocks` (server/imaging.py's fill_rows)."""
    out = np.empty((max(sum(len(block) for block in blocks), size), *blocks[0].shape[1:]), np.result_type(*blocks))
    rows = fill_rows(out, blocks)
    out[rows:] = out[rows - 1]
    return out


def check_providers(providers: str) -> list[str]:
    """onnxruntime's execution providers for `--providers` (cpu, cuda or tensorrt), in the order tried; a
    ValueError naming the flag where this onnxruntime lacks the first (checked before the server starts)."""
    import onnxruntime as ort

    wanted = {"cpu": ["CPUExecutionProvider"],
              "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}[providers]
    available = set(ort.get_available_providers())
    if wanted[0] not in available:
        raise ValueError(f"--providers {providers}: onnxruntime has no {wanted[0]} here (available: "
                         f"{sorted(available)}); install onnxruntime-gpu (the gpu extra) on a CUDA machine or use "
                         "--providers cpu")
    return wanted


class OnnxRuntimeEngine:
    """An onnxruntime session tuned for throughput: full graph optimisation, a memory arena, and
    the execution provider chosen by flag."""

    def __init__(self, path: str | Path, name: str, providers: str = "cpu", intra_op_threads: int = 0,
                 max_batch: int = 64, trt_cache_dir: str | None = None):
        import onnxruntime as ort

        self.name, self.max_batch, self.buckets = name, max_batch, ()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_cpu_mem_arena = True
        options.enable_mem_pattern = True
        options.log_severity_level = 3
        # The engine shares the cores with the event loop: idle pool threads must sleep, not spin.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        chosen = self._providers(ort, providers, trt_cache_dir, max_batch)
        self.session = ort.InferenceSession(str(path), options, providers=chosen)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        if providers != "cpu":  # the TensorRT/CUDA providers prefer the batch sizes they were tuned for
            self.buckets = tuple(b for b in POWERS_OF_TWO if b <= max_batch)

    @staticmethod
    def _providers(ort, providers: str, trt_cache_dir: str | None, max_batch: int) -> list:
        wanted = check_providers(providers)
        if providers != "tensorrt":
            return wanted
        if trt_cache_dir is None:
            raise ValueError("the TensorRT provider needs an engine cache folder (--trt-cache-dir)")
        cache = Path(trt_cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        trt_options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                       "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                       "trt_fp16_enable": True, "trt_max_workspace_size": 4 << 30,
                       "trt_builder_optimization_level": 3}
        return [("TensorrtExecutionProvider", trt_options), *wanted[1:]]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feeds)[0]


class TensorRTEngine:
    """A native engine built by `flowmap export --tensorrt`, run through export.trt_runtime."""

    def __init__(self, path: str | Path, name: str, cuda_graphs: bool = False):
        from export.trt_runtime import TrtRunner

        self.runner = TrtRunner(path, cuda_graphs=cuda_graphs)
        self.name, self.max_batch = name, self.runner.max_batch
        # Each CUDA graph is captured per shape: keep the set of shapes small.
        self.buckets = tuple(b for b in POWERS_OF_TWO if self.runner.min_batch <= b <= self.runner.max_batch)
        self.input_names = tuple(self.runner.inputs)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.runner.run(feeds)


class TorchEngine:
    """Development only: the torch graph modules from run directories, no export needed."""

    def __init__(self, module, name: str, input_names: tuple[str, ...], max_batch: int = 64):
        import torch

        self.torch, self.module = torch, module.eval()
        self.name, self.max_batch, self.buckets, self.input_names = name, max_batch, (), input_names

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self.torch.no_grad():
            return self.module(*(self.torch.from_numpy(feeds[n]) for n in self.input_names)).numpy()


def _engine_for(graph: Graph, name: str, bundle: Bundle, settings) -> Engine:
    if settings.backend == "tensorrt":
        plans = [p for p in bundle.tensorrt if p.source == graph.path.name]
        if not plans:
            raise RuntimeError(f"bundle has no TensorRT engine for {graph.path.name}: run "
                               f"`flowmap export --tensorrt --skip-onnx ... --out {bundle.root}` on this GPU")
        return TensorRTEngine(plans[0].path, name, settings.cuda_graphs)
    return OnnxRuntimeEngine(graph.path, name, settings.providers, settings.intra_op_threads,
                             batch_size(name, settings), settings.trt_cache_dir)


NEEDS_PROGRAMS = ("the torch backend needs the bundle's torch.export programs: export it with "
                  "`flowmap export --torch-programs`, or serve it with --backend onnxruntime")


def _development(settings) -> bool:
    """Whether the torch options are what the development engines (networks rebuilt from runs) run: CPU, fp32,
    eager."""
    return (settings.device, settings.torch_dtype, settings.torch_compile, settings.cuda_graphs) == (
        "cpu", "float32", False, False)


def decoder_engine(bundle: Bundle, settings) -> Engine:
    """The bundle's decoder alone, built for the settings' backend as build_engines builds it (a Ray deployment
    of its own). Its output is on the host whatever the backend."""
    if settings.backend != "torch":
        return _engine_for(bundle.decoder, "decoder", bundle, settings)
    if bundle.decoder.program is None:
        raise RuntimeError(NEEDS_PROGRAMS)
    return _program_engine("decoder", bundle.decoder, settings, device_output=False)


def _torch_engines(bundle: Bundle, settings) -> dict[str, Engine]:
    from distill.models import load_student, load_teacher
    from distill.verifier import load_verifier
    from export.onnx_export import StudentGraph, TeacherGraph, VerifierGraph

    runs = Path(os.environ.get("FLOWMAP_TORCH_RUNS", "runs/digits"))
    method = bundle.provenance.get("method", "freeflow")
    student, _ = load_student(runs / method)
    engines: dict[str, Engine] = {
        student_engine(g.guidance_scale): TorchEngine(StudentGraph(student, g.guidance_scale),
                                                      student_engine(g.guidance_scale), StudentGraph.input_names,
                                                      settings.max_batch_size)
        for g in bundle.students
    }
    engines["teacher"] = TorchEngine(TeacherGraph(load_teacher(str(runs / "teacher")), bundle.teacher.guidance_scale),
                                     "teacher", TeacherGraph.input_names, settings.max_batch_size)
    engines["verifier"] = TorchEngine(VerifierGraph(load_verifier(runs / "verifier")), "verifier",
                                      VerifierGraph.input_names, settings.max_batch_size)
    return engines


def _graphs(bundle: Bundle) -> dict[str, Graph]:
    """Engine name -> graph, for every graph the bundle serves."""
    graphs = {student_engine(g.guidance_scale): g for g in bundle.students}
    graphs["teacher"] = bundle.teacher
    optional = {"verifier": bundle.verifier, "text_encoder": bundle.text.encoder if bundle.text else None,
                "decoder": bundle.decoder}
    return {**graphs, **{name: graph for name, graph in optional.items() if graph is not None}}


def _program_engines(graphs: dict[str, Graph], settings) -> dict[str, Engine]:
    # the decoder's images stay on the device, their pixels come to the host per batch (on the CPU too: one path,
    # tested in CI)
    return {name: _program_engine(name, graph, settings, device_output=name == "decoder")
            for name, graph in graphs.items()}


def _program_engine(name: str, graph: Graph, settings, device_output: bool) -> Engine:
    """One graph's torch program as an engine; a failed parity check names the flag that keeps its stage fp32."""
    from server.torch_engine import ParityError, TorchProgramEngine

    try:
        return TorchProgramEngine(graph.program, name, batch_size(name, settings), settings.torch_options(name),
                                  device_output=device_output)
    except ParityError as err:
        raise ParityError(f"{err}: --torch-float32-stages {stage_of(name)}") from None


def batch_size(engine: str, settings, built: Engine | None = None) -> int:
    """Rows per run of an engine: the decoder has its own limit (it costs far more per row), and a torch
    program traced through a batch-size branch runs at most its `max_rows` (export/programs.py)."""
    rows = settings.decoder_max_batch_size if engine == "decoder" else settings.max_batch_size
    return min(rows, getattr(built, "max_rows", rows))


def build_engines(bundle: Bundle, settings, remote: dict[str, Engine] | None = None) -> dict[str, Engine]:
    """One engine per graph: `student@<w>` for each baked scale, `teacher`, and `verifier`, `decoder`
    and `text_encoder` when the bundle has them. `remote` replaces engines by ones that run elsewhere (a
    Ray deployment)."""
    remote = remote or {}
    graphs = {name: graph for name, graph in _graphs(bundle).items() if name not in remote}
    if settings.backend == "torch":
        if all(graph.program is not None for graph in graphs.values()):
            return {**_program_engines(graphs, settings), **remote}
        if bundle.text is not None or bundle.decoder is not None or not _development(settings):
            raise RuntimeError(f"{NEEDS_PROGRAMS} (without them it rebuilds a digits bundle's networks from "
                               "FLOWMAP_TORCH_RUNS, on the CPU in float32 only)")
        return _torch_engines(bundle, settings)
    return {**{name: _engine_for(graph, name, bundle, settings) for name, graph in graphs.items()}, **remote}
