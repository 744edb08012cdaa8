"""The torch backend for production: a bundle's graphs as torch.export programs (`.pt2`, written by
`flowmap export --torch-programs`) on the CPU or a CUDA GPU, for machines where neither TensorRT nor
onnxruntime-gpu can be installed.

Low precision runs under autocast (matrix products and convolutions in bf16/fp16, reductions and the
graph's own constants in fp32), checked at start against fp32 on the program's example inputs: an
engine whose error passes `parity_tolerance` (relative to the output's largest value) refuses to
start. The weights only matrix products and convolutions read are cast once, which autocast would
otherwise redo every forward (it keeps no cast cache that could outlive a CUDA graph). The fp32 output
comes from the program's archive, where export saved it, so the weights are cast on the host and reach the
device in low precision (a FLUX-size transformer's weights take 24 GB there, not 48); a program exported before
that holds none, and its fp32 output is computed on the device before its weights are cast.

`compile` runs each batch bucket through torch.compile (the batcher pads every batch to a bucket, so
every bucket is compiled, at start; `compile_cache` keeps what it compiled on disk for the next start);
`cuda_graphs` replays each bucket as a CUDA graph (through torch.compile's "reduce-overhead" mode when
compiling, captured by hand otherwise). `compile_mode="max-autotune"` has inductor time its own matrix-product
kernels against cuBLAS for each bucket, compiled static (a kernel tuned for one shape), and fuse what follows
a product into it: minutes more at start, for a faster forward where the tuned kernels win. `channels_last` lays
out a graph's 2-D convolutions NHWC (their weights and its 4-D inputs), which inductor does itself only for graphs
static in the batch. torch.compile
keeps its CUDA graphs per thread (torch before 2.13 sets that state up only in the thread that imported it, and
fails in any other), so such an engine makes every call, the start's included, in a thread of its own.

On CUDA each engine works on a stream of its own and `run` returns once its batch is done. On one shared
stream a small batch of the student queued behind a large one of the decoder, and a decoder that returned
before its images were ready let its batcher queue the next batch ahead of the last one's JPEG encoding.
Returning when the batch is done also gives the batcher and admission the batch's real time.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.gpu_jpeg import quantised
from server.imaging import DeviceImages

log = logging.getLogger("flowmap.torch")

# float8: the linear layers over token sequences in float8 (e4m3, scaled; see float8_linear), the rest in bfloat16
DTYPES = ("float32", "bfloat16", "float16", "float8")
COMPILE_MODES = ("default", "max-autotune")
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # what compile and CUDA graphs specialise to
# low precision's largest error against float32, relative to the output's largest value, past which an engine refuses
# to start: what the check is for (fp16 overflowing in a T5, a norm losing its precision) errs by far more, while bf16
# transformers err by about 0.005 and a bf16 SD-VAE decoder by 0.055 (measured on an H200, docs/gpu.md)
LOW_PRECISION_TOLERANCE = 0.1


@dataclass(frozen=True)
class TorchOptions:
    device: str = "cpu"  # "cpu" or "cuda" (or "cuda:N")
    dtype: str = "float32"  # float32, bfloat16 or float16 (autocast), or float8 (token linears in e4m3, else bf16)
    compile: bool = False  # torch.compile each batch bucket
    cuda_graphs: bool = False  # replay each bucket as a CUDA graph
    parity_tolerance: float = LOW_PRECISION_TOLERANCE  # low precision against fp32: max abs error / max abs fp32 output
    # torch.compile's on-disk cache (inductor's compiled graphs and kernels): a restart, or another replica, with the
    # same folder loads what the first start compiled ("": torch's default, a folder under /tmp)
    compile_cache: str = ""
    compile_mode: str = "default"  # or "max-autotune": each bucket compiled static with inductor's tuned kernels
    # a program with 2-D convolutions: their weights and its 4-D inputs laid out channels-last (NHWC), the layout
    # cuDNN's and oneDNN's convolution kernels work in (given NCHW they convert around each convolution)
    channels_last: bool = False
    # CUDA: cuDNN times its convolution algorithms on each shape's first call and keeps the fastest (the buckets'
    # shapes are fixed, so once, at warm-up, before any CUDA graph records). The flag is torch's, for the whole
    # process: every engine sets it to its options' value, so one server's engines agree
    cudnn_benchmark: bool = False

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"torch_compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError("torch_compile_mode needs --torch-compile")
        if self.dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise ValueError("cuda_graphs needs --device cuda")
        if self.cudnn_benchmark and not self.device.startswith("cuda"):
            raise ValueError("torch_cudnn_benchmark needs --device cuda")
        if self.compile_cache and not self.compile:
            raise ValueError("torch_compile_cache needs --torch-compile")


def inductor_mode(options: TorchOptions) -> tuple[str, bool | None]:
    """torch.compile's (mode, dynamic) for compiled options. By default, automatic dynamic shapes: the first bucket
    compiles static (torch always specialises a batch of 1), the next one compiles a graph general in the batch that
    every later bucket reuses, so start-up compiles twice, not once per bucket. Tuned kernels are tuned for one
    shape, so max-autotune compiles each bucket static. CUDA graphs are recorded per bucket either way."""
    if options.compile_mode == "max-autotune":
        return ("max-autotune" if options.cuda_graphs else "max-autotune-no-cudagraphs"), False
    return ("reduce-overhead" if options.cuda_graphs else "default"), None


def batch_buckets(max_batch: int, buckets: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The batch sizes an engine pads to and specialises (compiles, captures) at start: `buckets`, or the powers of
    two, up to `max_batch`; without given buckets `max_batch` itself too (a batch of 48 from a batcher of 48 rows
    would otherwise run at a size of its own, and compile or record a CUDA graph inside a visitor's request)."""
    wanted = tuple(b for b in (buckets or BUCKETS) if b <= max_batch)
    return wanted if buckets or max_batch in wanted else (*wanted, max_batch)


class ParityError(RuntimeError):
    """Low precision strays from float32 past the tolerance: the engine refuses to start."""


def relative_error(reference, other) -> float:
    scale = float(reference.abs().max()) or 1.0
    return float((reference - other.float()).abs().max()) / scale


def without_dtype_asserts(module):
    """The program's graph without torch.export's tensor-metadata asserts: they pin each intermediate's
    traced dtype (float32), which autocast changes by design."""
    import torch

    # an older torch has no such op (and writes no such asserts)
    checks = {op.default for op in [getattr(torch.ops.aten, "_assert_tensor_metadata", None)] if op is not None}
    for graph_module in module.modules():
        if isinstance(graph_module, torch.fx.GraphModule):
            for node in list(graph_module.graph.nodes):
                if node.op == "call_function" and node.target in checks and not node.users:
                    graph_module.graph.erase_node(node)
            graph_module.recompile()
    return module


# ops whose argument 1 is a weight and 2 a bias, which autocast runs in low precision
WEIGHT_OPS = {f"aten::{op}" for op in ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                                       "conv_transpose3d")}


def cast_matmul_weights(module, dtype, device_type: str) -> int:
    """Cast, in place, every parameter of a program's module that only linear layers and convolutions read (as
    weight or bias) to `dtype`; returns how many. Autocast would cast them to the same values every forward (a
    SiT-XL/2 forward reads and writes its 675M weights for it); norms, embeddings and anything else a parameter
    feeds keep their float32 weights, and so does an op autocast leaves alone on `device_type` (on CUDA, a
    convolution with padding="same"), which would otherwise meet float32 inputs with a bf16 weight."""
    import torch

    autocast = f"Autocast{device_type.upper()}"  # AutocastCPU, AutocastCUDA: the dispatch key autocast runs under

    def read_as_weight(node, user) -> bool:
        return (user.op == "call_function" and isinstance(user.target, torch._ops.OpOverload)
                and user.target.name().split(".")[0] in WEIGHT_OPS
                and torch._C._dispatch_has_kernel_for_dispatch_key(user.target.name(), autocast)
                and node in user.args[1:3] and node is not user.args[0] and node not in user.kwargs.values())

    readers: dict[str, list[bool]] = {}  # parameter name -> for each read, whether it reads a weight or bias
    for node in module.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(node.target, []).extend(read_as_weight(node, user) for user in node.users)
    parameters = dict(module.named_parameters())
    cast = [name for name, reads in readers.items() if reads and all(reads) and name in parameters]
    with torch.no_grad():
        for name in cast:
            parameters[name].data = parameters[name].data.to(dtype)
    return len(cast)


FLOAT8_MAX = 448.0  # float8_e4m3fn's largest finite value: a row's largest magnitude is scaled to it
FLOAT8_ALIGN = 16  # torch._scaled_mm's matrices: both sizes of the weight a multiple of this


def float8_rows(values):
    """(`values` in e4m3, [rows, 1] float32 scales): each row scaled so its largest magnitude is e4m3's largest."""
    import torch

    scale = values.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FLOAT8_MAX
    return (values / scale).to(torch.float8_e4m3fn), scale


def float8_linear(x, weight, weight_scale, bias):
    """`x @ W.T + bias` in float8: `x`'s rows (tokens) each scaled so its largest magnitude is e4m3's largest,
    then cast; `weight` is W cast the same way per output channel at start, with `weight_scale` ([1, out]) its
    scales. The product accumulates in float32 and comes out in bfloat16. Scaling per row, not per tensor, keeps
    one large token (or channel) from crushing the small ones into float8's few subnormal values. The engine runs it
    under bf16 autocast, which the ops after it need (its output is bf16)."""
    import torch

    quantised, scale = float8_rows(x.reshape(-1, x.shape[-1]).float())
    # contiguous: a CUDA float8 product takes its first matrix row-major, which a permuted `x` is not
    out = torch._scaled_mm(quantised.contiguous(), weight.t(), scale_a=scale, scale_b=weight_scale, bias=bias,
                           out_dtype=torch.bfloat16)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def float8_linears(module) -> int:
    """Replace, in place, each linear layer of a program's module that reads a sequence of tokens (an input of 3 or
    more dimensions) and has a weight of sizes `FLOAT8_ALIGN` divides with `float8_linear`; returns how many. Those
    carry a transformer's matrix-product time; a per-image one (the timestep embedding, adaLN's modulation) is
    cheap, and its error would scale every token of its image, so it stays in bfloat16. The replaced float32 or
    bf16 weights are dropped."""
    import torch

    graph, parameters = module.graph, dict(module.named_parameters())
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
            continue
        x, weight, bias = (*node.args, None)[:3]
        tokens = getattr(x, "meta", {}).get("val")
        if (node.kwargs or weight.op != "get_attr" or weight.target not in parameters or tokens is None
                or tokens.dim() < 3
                or (bias is not None and getattr(bias, "target", None) not in parameters)
                or any(size % FLOAT8_ALIGN for size in parameters[weight.target].shape)):
            continue
        with torch.no_grad():
            quantised, scale = float8_rows(parameters[weight.target].float())
            prefix = f"float8_{replaced}"
            module.register_buffer(f"{prefix}_weight", quantised)
            module.register_buffer(f"{prefix}_scale", scale.t().contiguous())  # [1, out]: one per output channel
            if bias is not None:  # _scaled_mm adds a bias of its output's dtype
                module.register_buffer(f"{prefix}_bias", parameters[bias.target].to(torch.bfloat16))
        with graph.inserting_before(node):
            read = [graph.get_attr(f"{prefix}_{part}") for part in ("weight", "scale")]
            read.append(graph.get_attr(f"{prefix}_bias") if bias is not None else None)
            replacement = graph.call_function(float8_linear, (x, *read))
        replacement.meta = dict(node.meta)  # its shape, which a linear it feeds is judged by
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        replaced += 1
    graph.eliminate_dead_code()
    still_read = {node.target for node in graph.nodes if node.op == "get_attr"}
    for name in parameters.keys() - still_read:  # the weights float8 replaced: no longer read, so freed
        owner, _, leaf = name.rpartition(".")
        delattr(module.get_submodule(owner), leaf)
    module.recompile()
    return replaced


def channels_last_weights(module) -> int:
    """Lay out, in place, the 4-D weights a program's 2-D convolutions read channels-last; returns how many."""
    import torch

    aten = torch.ops.aten
    convolutions = {aten.conv2d, aten.convolution, aten.conv_transpose2d}  # every overload (padding="same" too)
    read = {node.args[1].target for node in module.graph.nodes
            if node.op == "call_function" and getattr(node.target, "overloadpacket", None) in convolutions
            and isinstance(node.args[1], torch.fx.Node) and node.args[1].op == "get_attr"}
    parameters = dict(module.named_parameters())
    laid_out = [name for name in read if name in parameters and parameters[name].dim() == 4]
    with torch.no_grad():
        for name in laid_out:
            parameters[name].data = parameters[name].data.contiguous(memory_format=torch.channels_last)
    return len(laid_out)


def own_cuda_graph_trees() -> None:
    """Set up, in the calling thread, the per-thread state of torch.compile's CUDA graphs: torch before 2.13
    does so only in the thread that imported it and fails with a bare AssertionError in any other."""
    import threading
    from collections import defaultdict

    import torch
    from torch._inductor import cudagraph_trees

    if hasattr(cudagraph_trees, "_initialize_tls"):  # torch 2.13 and later: what it does itself in a new thread
        cudagraph_trees._initialize_tls(cudagraph_trees.local)
        return
    state = cudagraph_trees.local
    state.tree_manager_containers, state.tree_manager_locks = {}, defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", state.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", state.tree_manager_locks)


def on_device(program, device):
    """The program with its weights, constants, example inputs, and the devices its graph names (a program traced
    on the CPU creates its constants there, e.g. `arange(..., device=cpu)`), all moved to `device`."""
    import torch
    from torch.export.passes import move_to_device_pass

    return program if torch.device(device).type == "cpu" else move_to_device_pass(program, torch.device(device))


class TorchProgramEngine:
    """One `.pt2` program as a serving engine, the `Engine` protocol: numpy in, numpy out (a tensor on the device
    with `device_output`)."""

    def __init__(self, path: str | Path, name: str, max_batch: int, options: TorchOptions,
                 buckets: tuple[int, ...] | None = None, device_output: bool = False):
        import torch

        # device_output: `run` answers DeviceImages (server/imaging.py), not a host array: the decoder's float
        # images stay on the GPU (nvJPEG, scoring and raw arrays read them there or copy them), and their 8-bit
        # pixels come to the host in one copy per batch for the CPU encoders
        self.torch, self.name, self.options, self.device_output = torch, name, options, device_output
        self.device = torch.device(options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{name}: --device {options.device} but torch sees no CUDA GPU "
                               f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
        from export.programs import batch_limit, read_program

        if options.dtype == "float8" and self.device.type == "cuda" and \
                torch.cuda.get_device_capability(self.device) < (8, 9):
            card = torch.cuda.get_device_name(self.device)
            raise RuntimeError(f"{name}: --torch-dtype float8 needs a GPU with float8 matrix products (compute "
                               f"capability 8.9 or later: Ada, Hopper, Blackwell); {card} has "
                               f"{'.'.join(map(str, torch.cuda.get_device_capability(self.device)))}")
        program, reference = read_program(path)
        # autocast's dtype: float8 runs its token linears in e4m3 and everything else autocast runs in bfloat16
        self.dtype = torch.bfloat16 if options.dtype == "float8" else getattr(torch, options.dtype)
        low = options.dtype != "float32"
        if low and reference is not None:  # cast on the host (the module shares the program's weights), then moved
            cast = cast_matmul_weights(program.module(), self.dtype, self.device.type)
        program = on_device(program, self.device)
        self.stream = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the weights' copies, queued on the default stream, are done
            torch.backends.cudnn.benchmark = options.cudnn_benchmark
            self.stream = torch.cuda.Stream(self.device)
        self.input_names = tuple(program.graph_signature.user_inputs)
        self.module = without_dtype_asserts(program.module())  # on the device with its program
        # inductor lays out convolutions channels-last itself only in graphs static in the batch; here in any
        self.channels_last = options.channels_last and channels_last_weights(self.module) > 0
        self.max_rows = batch_limit(program)  # a program traced through a batch-size branch runs fewer rows
        if max_batch > self.max_rows:
            log.warning("%s: the program runs at most %d rows a batch; batching at %d, not %d", name, self.max_rows,
                        self.max_rows, max_batch)
        self.max_batch = min(max_batch, self.max_rows)
        specialised = options.compile or options.cuda_graphs
        # buckets only where shapes are specialised (compile, CUDA graphs) or a GPU likes them; else any size
        self.buckets = batch_buckets(self.max_batch, buckets) if specialised or self.device.type == "cuda" else ()
        self.graphs: dict[int, tuple] = {}  # bucket -> (graph, static inputs, static output), hand-captured
        self.parity = 0.0
        with self._on_stream():
            example = self._example(program)
            if low:
                if reference is None:  # an archive exported without its fp32 output: computed here, before the cast
                    with torch.no_grad():
                        reference = self.module(*example.values()).float()
                    cast = cast_matmul_weights(self.module, self.dtype, self.device.type)
                else:
                    reference = torch.from_numpy(reference).to(self.device)
                log.info("%s: %d linear and convolution weights and biases cast to %s once", name, cast,
                         str(self.dtype).removeprefix("torch."))
                if options.dtype == "float8":
                    replaced = float8_linears(self.module)
                    if not replaced:
                        raise RuntimeError(f"{name}: --torch-dtype float8 found no linear layer over tokens with "
                                           f"both weight sizes a multiple of {FLOAT8_ALIGN}; serve it in bfloat16")
                    log.info("%s: %d linear layers over tokens in float8", name, replaced)
                self.parity = self._check_parity(reference, example)
            self._synchronize()
        # the program's state dict still holds the weights float8 replaced: let go of them before the warm-up
        del program, reference
        self.forward = self.module
        if options.compile:
            if options.compile_cache:  # inductor reads its cache's folder from the environment, at each lookup
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(options.compile_cache).resolve())
            # at most one compiled graph per bucket: allow that many (the limit's name changed across torch versions)
            config = torch._dynamo.config
            limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, limit, max(getattr(config, limit), 4 * len(BUCKETS)))
            mode, dynamic = inductor_mode(options)
            self.forward = torch.compile(self.module, mode=mode, dynamic=dynamic)
        # torch.compile's CUDA graphs belong to the thread that recorded them: a compiled engine with CUDA graphs
        # makes all its calls in a thread of its own, which the batcher's thread hands each batch to
        self._thread = None
        if options.compile and options.cuda_graphs:
            from concurrent.futures import ThreadPoolExecutor

            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"torch-{name}",
                                              initializer=own_cuda_graph_trees)
        if specialised:  # compile / capture every bucket now, not in a visitor's request
            try:
                self._in_thread(self._warm_up, example)
            except BaseException:  # out of memory at a large bucket, say: what the smaller ones recorded goes too
                self.close()
                raise

    def _warm_up(self, example: dict) -> None:
        done = " and ".join(what for what, on in (("compiled", self.options.compile),
                                                  ("its CUDA graph recorded", self.options.cuda_graphs)) if on)
        with self._on_stream():
            for number, bucket in enumerate(self.buckets, 1):
                tick = time.perf_counter()
                # twice: torch.compile runs a bucket plain the first time and records its CUDA graph the second
                for _ in range(2):
                    self._call({name: self._rows(value, bucket) for name, value in example.items()})
                self._synchronize()
                # a compiled start takes minutes on a large model: say how far it has got
                log.info("%s: batch %d %s in %.1f s (bucket %d of %d)", self.name, bucket, done,
                         time.perf_counter() - tick, number, len(self.buckets))

    def _in_thread(self, function, *args):
        """`function(*args)` in the engine's own thread where it has one, else in the caller's."""
        return function(*args) if self._thread is None else self._thread.submit(function, *args).result()

    def _on_stream(self):
        """The engine's own CUDA stream as the current one (nothing on the CPU)."""
        import contextlib

        return self.torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def _example(self, program) -> dict:
        """The program's own example inputs (saved with it), on the device."""
        if program.example_inputs is None:
            raise RuntimeError(f"{self.name}: the program holds no example inputs to check and warm up with; "
                               "export the bundle again with `flowmap export --torch-programs`")
        args, _ = program.example_inputs
        return {name: value.to(self.device) for name, value in zip(self.input_names, args, strict=True)}

    def _rows(self, tensor, rows: int):
        repeats = -(-rows // tensor.shape[0])
        return tensor.repeat(repeats, *([1] * (tensor.dim() - 1)))[:rows].contiguous()

    def _laid_out(self, inputs: dict) -> dict:
        """The inputs as the engine's convolutions read them: 4-D ones channels-last where the engine lays out so."""
        if not self.channels_last:
            return inputs
        layout = self.torch.channels_last
        return {name: value.contiguous(memory_format=layout) if value.dim() == 4 else value
                for name, value in inputs.items()}

    def _check_parity(self, reference, example: dict) -> float:
        """The low-precision output's largest error against the float32 `reference`, relative to its scale."""
        with self.torch.no_grad(), self._autocast():
            low = self.module(*self._laid_out(example).values())
        error = relative_error(reference, low)
        if not error <= self.options.parity_tolerance:
            raise ParityError(f"{self.name}: {self.options.dtype} differs from float32 by {error:.3g} of the output's "
                              f"scale > {self.options.parity_tolerance:g} (--torch-parity-tolerance); serve it in "
                              f"{'bfloat16 or ' if self.options.dtype == 'float8' else ''}float32")
        log.info("%s: %s parity with float32 %.3g (tolerance %g)", self.name, self.options.dtype, error,
                 self.options.parity_tolerance)
        return error

    def _autocast(self):
        import contextlib

        if self.options.dtype == "float32":
            return contextlib.nullcontext()
        # no weight-cast cache: it would outlive a CUDA graph's capture (and a forward uses each weight once)
        return self.torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    def _call(self, inputs: dict):
        """The output as a float32, C-order tensor on the device (C order: as onnxruntime gives a decoder's permute)."""
        torch = self.torch
        rows = next(iter(inputs.values())).shape[0]
        with torch.no_grad(), self._autocast():
            if self.options.cuda_graphs and not self.options.compile and rows in self.buckets:
                if rows not in self.graphs:
                    self.graphs[rows] = self._capture(self._laid_out(inputs))
                graph, static_inputs, output = self.graphs[rows]
                for name, value in inputs.items():
                    static_inputs[name].copy_(value)  # into the captured layout, in the one copy
                graph.replay()
                replayed = True
            else:
                output = self.forward(*self._laid_out(inputs).values())
                replayed = self.options.compile and self.options.cuda_graphs
        kept = output.float().contiguous()
        # a CUDA graph overwrites its output at the next replay: a kept output is a copy (the cast to float32
        # of a bf16 output already is one)
        return kept.clone() if replayed and kept.data_ptr() == output.data_ptr() else kept

    def _capture(self, inputs: dict) -> tuple:
        """A CUDA graph of the eager module at this batch size, warmed up and captured on the engine's own stream.
        Graphs captured on torch's one default capture stream would share cuBLAS's workspace (torch keys it by
        stream), which two engines replaying at once would race on; and a new stream per bucket would wrap around
        torch's pool of 32 streams onto another engine's."""
        torch = self.torch
        static_inputs = {name: value.clone() for name, value in inputs.items()}
        with torch.cuda.stream(self.stream):
            for _ in range(2):
                self.module(*static_inputs.values())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                static_output = self.module(*static_inputs.values())
        return graph, static_inputs, static_output

    def close(self) -> None:
        """Give back the memory the engine holds on its device (weights, CUDA graphs, compiled graphs' pools), for a
        process that starts engines one after another (the GPU bench). Its objects refer to each other, so without
        this only a garbage collection frees them, and torch.compile keeps its CUDA graphs in the engine's thread.
        Code torch.compile made for it is torch's to drop (`torch._dynamo.reset()`, for every engine at once)."""
        import gc

        if self._thread is not None:
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            self._thread.submit(reset_cudagraph_trees).result()
            self._thread.shutdown()
            self._thread = None
        self.graphs.clear()
        self.module = self.forward = None
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray | DeviceImages:
        """One batch, done when it returns: a device output is ready for any stream that reads it."""
        return self._in_thread(self._run, feeds)

    def _run(self, feeds: dict[str, np.ndarray]):
        with self._on_stream():
            inputs = {name: self.torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device,
                                                                                        non_blocking=True)
                      for name in self.input_names}
            output = self._call(inputs)
            if not self.device_output:
                return output.cpu().numpy()  # the copy waits for the batch
            pixels = self._pixels_on_host(output)
            if self.stream is not None:
                self.stream.synchronize()  # the batch and its pixels' copy
                # its readers on the default stream (a search keeping its best rows) may still be queued when it is
                # freed: its memory waits for them before this stream gets it again
                output.record_stream(self.torch.cuda.default_stream(self.device))
            return DeviceImages(output, pixels.numpy())

    def _pixels_on_host(self, images):
        """The batch's 8-bit [N, H, W, C] pixels, quantised on the device and queued for the host in one copy (into
        pinned memory on a GPU, so the copy runs on the engine's stream)."""
        pixels = quantised(images).permute(0, 2, 3, 1).contiguous()
        if self.stream is None:
            return pixels.cpu()
        host = self.torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
        return host.copy_(pixels, non_blocking=True)
