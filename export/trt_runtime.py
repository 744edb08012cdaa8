"""Run a serialized TensorRT engine from numpy: the torch-free runtime that the server's `tensorrt`
engine and export's parity check share. Needs `tensorrt` and `cuda-python` (the `gpu` extra).

Device buffers are allocated once per optimisation-profile maximum and reused; with `cuda_graphs`,
each batch size is captured once into a CUDA graph and replayed (fixed shapes and addresses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def import_tensorrt():
    """(tensorrt, cudart) or a clear ImportError saying what to install."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise ImportError("TensorRT is not installed: `pip install flowmap-serve[gpu]` on a machine with an "
                          "NVIDIA GPU (tensorrt >= 10)") from err
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as err:
            raise ImportError("cuda-python is not installed: `pip install cuda-python` (the gpu extra)") from err
    return trt, cudart


def _check(result):
    """cuda-python returns (error, *values); raise on an error and unwrap the values."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise RuntimeError(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else (values or None)


class TrtRunner:
    """`run({name: array}) -> first output` for an engine with a dynamic batch axis."""

    def __init__(self, engine_path: str | Path, cuda_graphs: bool = False, profile: int = 0):
        trt, self.cudart = import_tensorrt()
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path} (built for another GPU or version?)")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.context.set_optimization_profile_async(profile, self.stream)
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs).append(name)
        first = self.inputs[0]
        self.min_batch, self.opt_batch, self.max_batch = (
            shape[0] for shape in self.engine.get_tensor_profile_shape(first, profile))
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in self.inputs + self.outputs}
        self.buffers = {}
        for name in self.inputs + self.outputs:
            shape = list(self.engine.get_tensor_shape(name))
            shape[0] = self.max_batch
            if name in self.inputs:
                shape = list(self.engine.get_tensor_profile_shape(name, profile)[2])
            nbytes = int(np.prod(shape)) * self.dtypes[name].itemsize
            self.buffers[name] = _check(self.cudart.cudaMalloc(nbytes))
            self.context.set_tensor_address(name, int(self.buffers[name]))
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[int, object] = {}

    def _copy(self, dst, src, nbytes, kind):
        _check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        batch = next(iter(feeds.values())).shape[0]
        if not self.min_batch <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} is outside the engine's profile [{self.min_batch}, {self.max_batch}]")
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.inputs:
            array = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            self.context.set_input_shape(name, array.shape)
            self._copy(self.buffers[name], array.ctypes.data, array.nbytes, h2d)
        if self.cuda_graphs:
            self._launch_graph(batch)
        elif not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        name = self.outputs[0]
        out = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name])
        self._copy(out.ctypes.data, self.buffers[name], out.nbytes, d2h)
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return out

    def _launch_graph(self, batch: int) -> None:
        if batch not in self.graphs:
            # One plain run first so TensorRT finishes any lazy set-up outside the capture.
            self.context.execute_async_v3(self.stream)
            mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
            _check(self.cudart.cudaStreamBeginCapture(self.stream, mode))
            self.context.execute_async_v3(self.stream)
            graph = _check(self.cudart.cudaStreamEndCapture(self.stream))
            self.graphs[batch] = _check(self.cudart.cudaGraphInstantiate(graph, 0))
        _check(self.cudart.cudaGraphLaunch(self.graphs[batch], self.stream))

    def close(self) -> None:
        for pointer in self.buffers.values():
            self.cudart.cudaFree(pointer)
        self.buffers.clear()
