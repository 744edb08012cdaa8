"""The torch serving backend on the CPU (its CUDA half is in test_gpu_torch.py): bundles exported with
torch.export programs, each program against onnxruntime, bf16 parity refused past its tolerance,
compiled buckets against eager, and servers on `--backend torch` answering as onnxruntime ones do."""

import base64
import io
import re

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from export.bundle import BundleError, read_bundle
from export.tensorrt import random_feeds
from export.writer import export_bundle
from server.engines import _graphs
from server.torch_engine import ParityError, TorchOptions, TorchProgramEngine, on_device

from serving import Server, decoded, serve_raw


@pytest.fixture(scope="module")
def program_bundle(tiny_digits_runs, tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("programs") / "tiny"
    runs = tiny_digits_runs
    traces, trace = [], torch.export.export
    with pytest.MonkeyPatch.context() as patch:  # counts torch.export's traces, the ONNX exporter's own included
        patch.setattr(torch.export, "export", lambda *args, **kwargs: traces.append(1) or trace(*args, **kwargs))
        export_bundle(runs / "freeflow", str(runs / "teacher"), runs / "verifier", out, (1.5, 3.0), progress=False,
                      programs=True, parity_batches=(1, 2))
    # four graphs, each traced once for both its ONNX file and its program
    assert len(traces) == 4, f"{len(traces)} torch.export traces for 4 graphs"
    return out


def onnx_and_torch(graph, name, options=None, batch=3, num_classes=10):
    session = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
    feeds = random_feeds(session.get_inputs(), batch, num_classes, seed=batch)
    engine = TorchProgramEngine(graph.program, name, 8, options or TorchOptions())
    return session.run(None, feeds)[0], engine.run(feeds), engine


def test_every_graph_has_a_hashed_program_that_matches_onnx(program_bundle):
    bundle = read_bundle(program_bundle)
    graphs = _graphs(bundle)
    assert set(graphs) == {"student@1.5", "student@3", "teacher", "verifier"}
    for name, graph in graphs.items():
        assert graph.program is not None and graph.program.suffix == ".pt2"
        expected, actual, engine = onnx_and_torch(graph, name)
        assert engine.input_names == tuple(i.name for i in ort.InferenceSession(
            str(graph.path), providers=["CPUExecutionProvider"]).get_inputs())
        np.testing.assert_allclose(actual, expected, atol=1e-4, err_msg=name)
    checks = bundle.provenance["checks"]
    assert checks["student_w1.5.pt2"]["program_max_abs_err_b1"] <= 1e-4
    assert set(checks["student_w1.5.pt2"]) == {"program_max_abs_err_b1", "program_max_abs_err_b2"}  # --parity-batches
    assert {"parity_max_abs_err_b1", "parity_max_abs_err_b2"} <= set(checks["teacher_w1.5.onnx"])
    assert not [key for key in checks["teacher_w1.5.onnx"] if key.endswith("_b64")]


def test_a_changed_program_is_refused(program_bundle, tmp_path):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(program_bundle, copy)
    with open(copy / "teacher_w1.5.pt2", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="teacher_w1.5.pt2 fails its sha256 check"):
        read_bundle(copy)


def test_a_program_moves_whole_to_its_device(program_bundle):
    """The teacher's time embedding builds its frequencies with arange(device=cpu) in the traced graph: moved
    to another device ("meta" stands in for CUDA here), the graph, weights and example inputs follow."""
    import torch

    def devices(program):
        named = {str(node.kwargs["device"]) for node in program.graph.nodes if "device" in node.kwargs}
        return named | {str(p.device) for p in program.module().parameters()} | {
            str(x.device) for x in program.example_inputs[0]}

    teacher = read_bundle(program_bundle).teacher
    assert devices(on_device(torch.export.load(str(teacher.program)), "cpu")) == {"cpu"}
    assert devices(on_device(torch.export.load(str(teacher.program)), "meta")) == {"meta"}


def test_bf16_is_checked_against_fp32(program_bundle):
    teacher = read_bundle(program_bundle).teacher
    expected, actual, engine = onnx_and_torch(teacher, "teacher", TorchOptions(dtype="bfloat16"))
    assert 0 < engine.parity <= 0.05  # bf16 really ran, and stayed close
    assert np.abs(actual - expected).max() <= 0.05 * np.abs(expected).max() + 1e-6
    with pytest.raises(RuntimeError, match=r"bfloat16 differs from float32 by .*\(--torch-parity-tolerance\); serve "
                       "it in float32"):
        TorchProgramEngine(teacher.program, "teacher", 8, TorchOptions(dtype="bfloat16", parity_tolerance=1e-9))


def test_float8_scales_each_token_and_each_output_channel():
    import torch

    from server.torch_engine import float8_linear

    torch.manual_seed(0)
    # tokens and output channels six orders of magnitude apart: one scale for all would crush the small ones
    tokens = torch.randn(2, 6, 64) * torch.logspace(-3, 3, 6)[:, None]
    weight = torch.randn(48, 64) * torch.logspace(-3, 3, 48)[:, None]
    bias = torch.randn(48)
    expected = tokens @ weight.T + bias
    scale = weight.abs().amax(dim=1, keepdim=True) / 448
    out = float8_linear(tokens, (weight / scale).to(torch.float8_e4m3fn), scale.T.contiguous(), bias.bfloat16())
    assert out.shape == expected.shape and out.dtype == torch.bfloat16
    # each output's error against the magnitude of what it sums
    magnitude = (tokens[..., None, :] * weight).abs().sum(-1) + bias.abs()
    error = (out.float() - expected).abs() / magnitude
    assert error.max() < 0.03, f"{error.max():.3g}"


def test_float8_runs_a_transformers_token_linears_in_e4m3_and_is_checked_against_fp32(tmp_path):
    import torch

    from export.programs import export_program
    from flowmap.gpu_stages import model

    torch.manual_seed(0)
    graph, inputs = model("sit-xl/2", "tiny")  # a two-block SiT-S/2: linear layers over tokens and per-image ones
    path = export_program(graph, inputs(2), tmp_path / "sit.pt2")
    feeds = {name: value.numpy() for name, value in inputs(3).items()}
    expected = TorchProgramEngine(path, "sit", 4, TorchOptions()).run(feeds)
    bf16, float8 = (TorchProgramEngine(path, "sit", 4, TorchOptions(dtype=dtype)) for dtype in ("bfloat16", "float8"))
    # each block's qkv, projection and two MLP layers, and the patch embedding and final layer: in float8, their
    # bf16 weights gone; the adaLN modulations and the timestep embedding stay bf16
    quantised = [name for name, buffer in float8.module.named_buffers() if buffer.dtype == torch.float8_e4m3fn]
    blocks = len(graph.teacher.net.blocks)
    assert len(quantised) == 4 * blocks + 2
    kept = {name for name, parameter in float8.module.named_parameters() if parameter.dtype == torch.bfloat16}
    assert not any(".attn." in name or ".blocks." in name and ".mlp." in name for name in kept)
    assert sum(".ada." in name for name in kept) == 2 * (blocks + 1)  # and the final layer's
    answer = float8.run(feeds)
    error = np.abs(answer - expected).max() / np.abs(expected).max()
    assert float8.parity > 2 * bf16.parity and error < 0.1, (float8.parity, bf16.parity, error)
    with pytest.raises(ParityError, match=r"float8 differs from float32 by .*; serve it in bfloat16 or float32$"):
        TorchProgramEngine(path, "sit", 4, TorchOptions(dtype="float8", parity_tolerance=float8.parity / 2))


def test_float8_replaces_a_linear_layer_fed_by_another_and_answers_as_the_two():
    import torch

    from server.torch_engine import float8_linears

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 32, bias=False))
    tokens = torch.randn(2, 5, 32)
    module = torch.export.export(layers, (tokens,)).module()
    assert float8_linears(module) == 2  # the second reads the first's float8 output, not a traced tensor
    assert not list(module.parameters())  # both weights and the bias replaced, so dropped
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = layers(tokens), module(tokens).float()
    assert (actual - expected).abs().max() < 0.1 * expected.abs().max()


def test_float8_refuses_a_model_without_linear_layers_over_tokens(program_bundle):
    teacher = _graphs(read_bundle(program_bundle))["teacher"]  # the digits MLP: flat rows, no tokens
    with pytest.raises(RuntimeError, match=r"teacher: --torch-dtype float8 found no linear layer over tokens"):
        TorchProgramEngine(teacher.program, "teacher", 8, TorchOptions(dtype="float8"))


def test_a_closed_engine_lets_go_of_its_weights(program_bundle):
    """The GPU bench starts engine after engine in one process: a closed one gives its weights back at once (its
    objects refer to each other, so dropping it would leave them to a garbage collection some time later)."""
    import weakref

    teacher = read_bundle(program_bundle).teacher
    engine = TorchProgramEngine(teacher.program, "teacher", 8, TorchOptions(dtype="bfloat16"))
    weights = [weakref.ref(parameter) for parameter in engine.module.parameters()]
    engine.close()
    assert weights and not any(weight() is not None for weight in weights)


def test_low_precision_is_checked_against_the_float32_output_export_saved(program_bundle, tmp_path):
    """The weights reach the device cast (no float32 copy there for the check): the float32 output comes from the
    archive. One without it (exported before it was saved) is checked against float32 computed at start."""
    import torch

    from export.programs import REFERENCE_FILE, read_program
    from server.torch_engine import ParityError

    teacher = read_bundle(program_bundle).teacher
    program, reference = read_program(teacher.program)
    with torch.no_grad():
        np.testing.assert_allclose(reference, program.module()(*program.example_inputs[0]).numpy(), atol=1e-5)
    saved = TorchProgramEngine(teacher.program, "teacher", 8, TorchOptions(dtype="bfloat16"))
    bare, wrong = tmp_path / "bare.pt2", tmp_path / "wrong.pt2"
    torch.export.save(program, str(bare))
    computed = TorchProgramEngine(bare, "teacher", 8, TorchOptions(dtype="bfloat16"))
    assert read_program(bare)[1] is None and 0 < computed.parity == pytest.approx(saved.parity, rel=1e-3)
    buffer = io.BytesIO()
    np.save(buffer, 2 * reference)  # the check reads the saved output: a wrong one stops the engine
    torch.export.save(program, str(wrong), extra_files={REFERENCE_FILE: base64.b64encode(buffer.getvalue()).decode()})
    with pytest.raises(ParityError, match=r"bfloat16 differs from float32 by 0\.[45]"):
        TorchProgramEngine(wrong, "teacher", 8, TorchOptions(dtype="bfloat16"))


def test_compiled_buckets_match_eager_and_a_restart_loads_them_from_the_cache(program_bundle, tmp_path, monkeypatch,
                                                                             caplog):
    import logging

    import torch
    from torch._dynamo.utils import counters

    from server.settings import Settings

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "default"))  # what the test leaves is put back
    caplog.set_level(logging.INFO, logger="flowmap.torch")
    cache = tmp_path / "compiled"
    options = Settings(backend="torch", torch_compile=True, torch_compile_cache=str(cache)).torch_options("student")
    student = read_bundle(program_bundle).students[0]
    try:
        engine = TorchProgramEngine(student.program, "student", 4, options, buckets=(2, 4))
    except Exception as err:  # inductor needs a C++ compiler; where there is none, compile is not available
        pytest.skip(f"torch.compile does not run here: {type(err).__name__}: {str(err)[:120]}")
    assert engine.buckets == (2, 4)
    # a start that compiles for minutes says how far it has got
    assert re.search(r"student: batch 2 compiled in [0-9.]+ s \(bucket 1 of 2\)", caplog.text)
    assert re.search(r"student: batch 4 compiled in [0-9.]+ s \(bucket 2 of 2\)", caplog.text)
    expected, actual, _ = onnx_and_torch(student, "student", batch=4)
    session = ort.InferenceSession(str(student.path), providers=["CPUExecutionProvider"])
    feeds = random_feeds(session.get_inputs(), 4, 10, seed=4)
    np.testing.assert_allclose(engine.run(feeds), expected, atol=1e-4)
    assert any((cache / "fxgraph").rglob("*")) and not (tmp_path / "default").exists()
    torch._dynamo.reset()  # as a new process: what it compiled is forgotten, only the folder remembers
    counters.clear()
    restarted = TorchProgramEngine(student.program, "student", 4, options, buckets=(2, 4))
    assert counters["inductor"]["fxgraph_cache_hit"] >= 2 and not counters["inductor"]["fxgraph_cache_miss"]
    np.testing.assert_allclose(restarted.run(feeds), expected, atol=1e-4)


def test_max_autotune_compiles_each_bucket_static_and_matches_eager(program_bundle, tmp_path, monkeypatch):
    import torch
    from torch._dynamo.utils import counters

    from server.settings import Settings
    from server.torch_engine import inductor_mode

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold compile: the graphs are counted
    options = Settings(backend="torch", torch_compile=True, torch_compile_mode="max-autotune").torch_options()
    assert inductor_mode(options) == ("max-autotune-no-cudagraphs", False)
    assert inductor_mode(Settings(backend="torch", torch_compile=True).torch_options()) == ("default", None)
    student = read_bundle(program_bundle).students[0]
    torch._dynamo.reset()
    counters.clear()
    try:
        engine = TorchProgramEngine(student.program, "student", 8, options, buckets=(2, 4, 8))
    except Exception as err:  # inductor needs a C++ compiler; where there is none, compile is not available
        pytest.skip(f"torch.compile does not run here: {type(err).__name__}: {str(err)[:120]}")
    # one graph per bucket (automatic dynamic shapes would have made two: 2, then one general in the batch)
    assert counters["stats"]["unique_graphs"] == 3
    session = ort.InferenceSession(str(student.path), providers=["CPUExecutionProvider"])
    feeds = random_feeds(session.get_inputs(), 3, 10, seed=3)  # padded to the bucket of 4
    np.testing.assert_allclose(engine.run(feeds), session.run(None, feeds)[0], atol=1e-4)


def test_every_batch_a_batcher_can_send_has_a_bucket_made_at_start():
    from server.torch_engine import batch_buckets

    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)  # 33..48 rows: padded to 48, not run at sizes of their own
    assert batch_buckets(63, (1, 8, 32, 64)) == (1, 8, 32)  # given buckets are the caller's: only cut to the limit


def test_options_name_the_bad_flag():
    from pydantic import ValidationError

    from server.settings import Settings

    with pytest.raises(ValidationError, match="cuda_graphs needs --device cuda"):
        Settings(backend="torch", cuda_graphs=True)
    with pytest.raises(ValidationError, match="torch_cudnn_benchmark needs --device cuda"):
        Settings(backend="torch", torch_cudnn_benchmark=True)
    with pytest.raises(ValidationError, match="torch_compile_cache needs --torch-compile"):
        Settings(backend="torch", torch_compile_cache="models/.compiled")
    with pytest.raises(ValidationError, match="torch_compile_mode needs --torch-compile"):
        Settings(backend="torch", torch_compile_mode="max-autotune")
    with pytest.raises(ValidationError, match="torch_compile_mode must be one of default, max-autotune, got 'fast'"):
        Settings(backend="torch", torch_compile=True, torch_compile_mode="fast")
    with pytest.raises(ValidationError, match="torch_dtype must be one of float32, bfloat16, float16"):
        Settings(backend="torch", torch_dtype="int8")
    # a torch flag given to another backend, which would ignore it, is refused by name
    with pytest.raises(ValidationError, match="--torch-dtype applies to --backend torch only, not onnxruntime"):
        Settings(backend="onnxruntime", torch_dtype="bfloat16")
    with pytest.raises(ValidationError, match="--cuda-graphs applies to --backend torch or tensorrt only"):
        Settings(backend="onnxruntime", cuda_graphs=True)
    with pytest.raises(ValidationError, match="--device cuda applies to --backend torch only: onnxruntime runs"):
        Settings(backend="onnxruntime", device="cuda")  # a GPU asked for and not used is refused, not ignored
    with pytest.raises(ValidationError, match="torch_float32_stages: unknown stage 'vae'; stages: student, teacher"):
        Settings(backend="torch", torch_float32_stages="decoder, vae")


def test_stages_named_float32_stay_float32_under_bf16(program_bundle):
    from server.engines import build_engines
    from server.settings import Settings

    settings = Settings(bundle=str(program_bundle), backend="torch", torch_dtype="bfloat16",
                        torch_float32_stages="teacher,verifier")
    engines = build_engines(read_bundle(program_bundle), settings)
    assert {name: (engine.options.dtype, engine.parity > 0) for name, engine in engines.items()} == {
        "student@1.5": ("bfloat16", True), "student@3": ("bfloat16", True), "teacher": ("float32", False),
        "verifier": ("float32", False)}
    strict = settings.model_copy(update={"torch_float32_stages": ["student", "verifier"],
                                         "torch_parity_tolerance": 1e-9})
    with pytest.raises(RuntimeError, match=r"teacher: bfloat16 differs .* float32: --torch-float32-stages teacher$"):
        build_engines(read_bundle(program_bundle), strict)  # the failed check names the flag that fixes it


def test_a_server_on_the_torch_backend_answers_as_onnxruntime(program_bundle):
    body = {"labels": [3, 7], "seeds": [1, 2], "steps": 2}
    torch_answer = serve_raw(program_bundle, body, "--backend", "torch")
    onnx_answer = serve_raw(program_bundle, body)
    np.testing.assert_allclose(decoded(torch_answer), decoded(onnx_answer), atol=1e-4)


def test_a_latent_search_on_the_torch_backend_answers_as_onnxruntime(tiny_latent):
    """Best-of-N on a latent bundle: decoded candidates (a torch tensor from the torch decoder, kept on its
    device until used) scored, the best kept, the teacher's finish decoded and scored, then JPEG and PNG."""
    bundle, _, _ = tiny_latent
    body = {"label": 2, "seed": 5, "n": 6, "top_k": 2, "teacher_steps": 2}
    answers = {}
    for backend in ("torch", "onnxruntime"):
        server = Server("--no-ui", "--backend", backend, bundle=bundle).wait_ready()
        try:
            answers[backend] = [httpx.post(server.url + "/v1/search", json={**body, "output_format": output},
                                           timeout=60) for output in ("jpeg", "png")]
        finally:
            log = server.stop()
        assert all(r.status_code == 200 for r in answers[backend]), log[-3000:]
    for ours, theirs in zip(answers["torch"], answers["onnxruntime"], strict=True):
        ours, theirs = ours.json(), theirs.json()
        assert ours["chosen_seeds"] == theirs["chosen_seeds"] and len(ours["images"]) == 2
        np.testing.assert_allclose([c["score"] for c in ours["candidates"]],
                                   [c["score"] for c in theirs["candidates"]], atol=1e-3)
        np.testing.assert_allclose(ours["final_scores"], theirs["final_scores"], atol=1e-3)
    jpeg = Image.open(io.BytesIO(base64.b64decode(answers["torch"][0].json()["images"][0])))
    assert jpeg.format == "JPEG" and jpeg.mode == "RGB"


def test_weights_are_cast_only_where_autocast_runs_their_op():
    """Transposed convolutions and linear layers are cast for both devices and a norm for neither; a convolution
    with padding="same" only for the CPU: autocast leaves it in float32 on CUDA, where a bf16 weight would meet
    float32 inputs."""
    import torch

    from server.torch_engine import cast_matmul_weights

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.same = torch.nn.Conv2d(2, 4, 3, padding="same")
            self.up = torch.nn.ConvTranspose2d(4, 4, 2, stride=2)
            self.norm = torch.nn.GroupNorm(2, 4)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.norm(self.up(self.same(x))))

    for device, same in (("cuda", torch.float32), ("cpu", torch.bfloat16)):
        module = torch.export.export(Net().eval(), (torch.randn(1, 2, 4, 4),)).module()
        assert cast_matmul_weights(module, torch.bfloat16, device) == (4 if device == "cuda" else 6)
        low = {"up", "head"} | ({"same"} if same == torch.bfloat16 else set())
        assert {name: p.dtype for name, p in module.named_parameters()} == {
            f"{layer}.{kind}": torch.bfloat16 if layer in low else torch.float32
            for layer in ("same", "up", "norm", "head") for kind in ("weight", "bias")}


def test_a_model_that_branches_on_the_batch_size_exports_over_the_range_its_branch_holds(tmp_path):
    """diffusers' Upsample2D changes its code path from 64 rows up: the SD-VAE decoder's program is exported
    for 1..63 rows, and the engine batches within that and still matches the module."""
    import torch

    from export.decoder import DecoderGraph
    from export.programs import batch_limit, export_program
    from flowmap.gpu_stages import sd_vae

    graph = DecoderGraph(sd_vae(tiny=True).eval())
    path = export_program(graph, {"latent": torch.randn(2, 4, 8, 8)}, tmp_path / "decoder.pt2")
    assert batch_limit(torch.export.load(str(path))) == 63
    engine = TorchProgramEngine(path, "decoder", 64, TorchOptions())
    assert engine.max_rows == engine.max_batch == 63
    latent = torch.randn(5, 4, 8, 8)
    with torch.no_grad():
        expected = graph(latent).numpy()
    assert np.abs(engine.run({"latent": latent.numpy()}) - expected).max() < 1e-4
    assert not [name for name in torch.export.load(str(path)).state_dict if ".encoder." in name]  # decoding only


def test_bf16_casts_convolution_and_linear_weights_once_and_answers_as_autocast(tmp_path):
    """The weights only convolutions and linear layers read are bf16 from the start (norms keep float32), and
    the engine answers exactly what autocast does casting them every forward."""
    import torch

    from export.decoder import DecoderGraph
    from export.programs import export_program
    from flowmap.gpu_stages import sd_vae
    from server.torch_engine import without_dtype_asserts

    torch.manual_seed(0)
    graph = DecoderGraph(sd_vae(tiny=True).eval())
    path = export_program(graph, {"latent": torch.randn(2, 4, 8, 8)}, tmp_path / "decoder.pt2")
    engine = TorchProgramEngine(path, "decoder", 8, TorchOptions(dtype="bfloat16"))
    kinds = {name: type(graph.get_submodule(name.rsplit(".", 1)[0])) for name, _ in engine.module.named_parameters()}
    low = {name for name, parameter in engine.module.named_parameters() if parameter.dtype == torch.bfloat16}
    assert low == {name for name, kind in kinds.items() if kind in (torch.nn.Conv2d, torch.nn.Linear)}
    assert torch.nn.GroupNorm in kinds.values() and low
    latent = torch.randn(3, 4, 8, 8)
    module = without_dtype_asserts(torch.export.load(str(path)).module())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        expected = module(latent).float().numpy()
    assert np.array_equal(engine.run({"latent": latent.numpy()}), expected)


def test_without_programs_the_torch_backend_refuses_what_only_programs_run():
    """Without programs it rebuilds a digits bundle's networks, on the CPU in float32: asked for bf16 (or a GPU,
    compile, CUDA graphs) it refuses rather than serve something else quietly."""
    from server.engines import build_engines
    from server.settings import Settings

    from serving import BUNDLE

    assert all(graph.program is None for graph in _graphs(read_bundle(BUNDLE)).values())
    with pytest.raises(RuntimeError, match="needs the bundle's torch.export programs"):
        build_engines(read_bundle(BUNDLE), Settings(bundle=str(BUNDLE), backend="torch", torch_dtype="bfloat16"))


def test_a_decoder_deployment_runs_the_backend_the_settings_name(tiny_latent):
    """Ray's decoder deployment: the torch program under --backend torch, answering on the host (Ray ships
    numpy), as onnxruntime does."""
    from server.engines import OnnxRuntimeEngine, decoder_engine
    from server.settings import Settings

    bundle = read_bundle(tiny_latent[0])
    on_torch = decoder_engine(bundle, Settings(bundle=str(bundle.root), backend="torch"))
    on_onnx = decoder_engine(bundle, Settings(bundle=str(bundle.root)))
    assert isinstance(on_torch, TorchProgramEngine) and isinstance(on_onnx, OnnxRuntimeEngine)
    feeds = random_feeds(on_onnx.session.get_inputs(), 2, 10, seed=0)
    ours = on_torch.run(feeds)
    assert isinstance(ours, np.ndarray)
    np.testing.assert_allclose(ours, on_onnx.run(feeds), atol=1e-3)


def test_a_decoder_hands_on_its_images_on_the_device_and_their_pixels_on_the_host(tiny_latent):
    """The served decoder's batch: its float images stay where it ran, and their 8-bit pixels, quantised there,
    are on the host to the bit as the CPU quantises them; rows slice and join in pairs, and the encoder makes
    from the pixels the bytes it makes from the floats."""
    import asyncio

    import torch

    from server.encoding import Encoder, OutputFormat, encode_b64, encode_pixels_b64
    from server.imaging import DeviceImages, join_rows, on_host, to_uint8

    decoder = read_bundle(tiny_latent[0]).decoder
    engine = TorchProgramEngine(decoder.program, "decoder", 4, TorchOptions(), device_output=True)
    feeds = random_feeds(ort.InferenceSession(str(decoder.path)).get_inputs(), 3, 10, seed=1)
    out = engine.run(feeds)
    assert isinstance(out, DeviceImages) and isinstance(out.images, torch.Tensor) and out.shape[0] == len(out) == 3
    floats = on_host(out)
    np.testing.assert_array_equal(out.pixels, to_uint8(floats))
    joined = join_rows([out[:1], out[1:]])
    assert torch.equal(joined.images, out.images) and np.array_equal(joined.pixels, out.pixels)
    encoder = Encoder(1)
    try:
        for output in (OutputFormat("png"), OutputFormat("jpeg", 90)):
            assert asyncio.run(encoder.encode(out[1:], output)) == encode_b64(floats[1:], output)
        # the encoder reads the host pixels, not the device images
        inverted = DeviceImages(out.images, 255 - out.pixels)
        assert asyncio.run(encoder.encode(inverted, OutputFormat("png"))) == encode_pixels_b64(255 - out.pixels,
                                                                                                 OutputFormat("png"))
    finally:
        encoder.close()


def test_the_device_quantises_as_the_host_does_halves_and_overflow_included():
    """Values about half-way between two levels round as numpy rounds them, and values outside [-1, 1] clip, in
    torch as in numpy: the same pixels whichever side quantised them."""
    import torch

    from server.gpu_jpeg import quantised
    from server.imaging import to_uint8

    halves = (np.arange(0, 255, dtype=np.float32) + 0.5) / np.float32(127.5) - 1
    values = np.concatenate([halves, np.linspace(-3, 3, 97, dtype=np.float32)]).reshape(1, 1, 1, -1)
    expected = to_uint8(values)
    truncated = np.floor((np.clip(values, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    assert (expected != truncated).sum() > 50  # rounding decides many of them
    np.testing.assert_array_equal(quantised(torch.from_numpy(values)).permute(0, 2, 3, 1).numpy(), expected)


def test_a_cpu_encoded_request_lets_go_of_its_device_floats_before_it_waits_for_the_encoders():
    """A request the CPU encodes holds only its host pixels while it waits for the encoders' pool: its decoder's
    float tensor is freed before its job starts. One nvJPEG encodes keeps the tensor and hands it over."""
    import asyncio
    import threading
    import weakref

    import torch

    from server.encoding import Encoder, OutputFormat, encode_pixels_b64
    from server.imaging import DeviceImages, to_uint8
    from server.stages import EncodeImages, State

    def decoded():
        floats = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
        return DeviceImages(floats, to_uint8(floats.numpy())), weakref.ref(floats)

    async def encode_while_the_pool_is_busy(encoder, output):
        state = State(seeds=[1, 2], labels=np.array([0, 1]))
        state.x, floats = decoded()
        busy = threading.Event()
        encoder.pool.submit(busy.wait)  # the request's job queues behind this one
        job = asyncio.create_task(EncodeImages(encoder, output, (3, 16, 16), 2, "n").run(state, None, None))
        await asyncio.sleep(0.05)
        waiting_with_floats = floats() is not None
        busy.set()
        await job
        return waiting_with_floats, state.encoded

    encoder = Encoder(1)
    try:
        png = OutputFormat("png")
        held, encoded = asyncio.run(encode_while_the_pool_is_busy(encoder, png))
        assert not held and encoded == encode_pixels_b64(decoded()[0].pixels, png)

        handed = []

        class DeviceJpeg:  # stands in for nvJPEG: records what it was handed
            def encode(self, images, quality, upscale):
                handed.append(images)
                return [b"jpeg"] * len(images)

        encoder.gpu_jpeg, encoder.gpu_jpeg_min_side = DeviceJpeg(), 16
        held, encoded = asyncio.run(encode_while_the_pool_is_busy(encoder, OutputFormat("jpeg", 90)))
        assert held and isinstance(handed[0], torch.Tensor) and encoded == [base64.b64encode(b"jpeg").decode()] * 2
    finally:
        encoder.close()


def test_a_search_scores_a_host_copy_that_replaces_the_device_candidates():
    """The verifier reads a host copy of the decoded candidates; it replaces the torch decoder's tensor, so a
    search's N candidates do not hold the GPU's memory while the verifier's queue drains."""
    import asyncio

    import torch

    from server.stages import Score, State

    state = State(seeds=[1, 2, 3], labels=np.array([0, 1, 2]))
    state.x = torch.linspace(-2, 2, 3 * 3 * 4 * 4).reshape(3, 3, 4, 4)  # the decoder's tensor, unclipped
    read = []

    async def call(engine, feeds, ticket):
        read.append(feeds["image"])
        return np.zeros((3, 10), np.float32)

    asyncio.run(Score(3, "n").run(state, call, None))
    assert isinstance(state.x, np.ndarray) and state.x is read[0]
    assert state.x.min() == -1 and state.x.max() == 1


def test_channels_last_lays_out_the_convolutions_and_answers_as_the_default_layout(tiny_latent):
    """--torch-channels-last: the weights the decoder's convolutions read and its 4-D input go channels-last (NHWC),
    and it answers as it does laid out by default; a graph without convolutions (this student) is left as it is."""
    import torch

    bundle = read_bundle(tiny_latent[0])
    decoder = bundle.decoder
    feeds = random_feeds(ort.InferenceSession(str(decoder.path)).get_inputs(), 3, 10, seed=2)
    expected = TorchProgramEngine(decoder.program, "decoder", 4, TorchOptions()).run(feeds)
    engine = TorchProgramEngine(decoder.program, "decoder", 4, TorchOptions(channels_last=True))
    assert engine.channels_last
    weights = [p for p in engine.module.parameters() if p.dim() == 4 and p.shape[2:] != (1, 1)]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                           for p in weights)
    inputs = engine._laid_out({"latent": torch.from_numpy(feeds["latent"]), "rows": torch.zeros(3)})
    assert inputs["latent"].is_contiguous(memory_format=torch.channels_last) and not inputs["latent"].is_contiguous()
    assert inputs["rows"].is_contiguous()
    np.testing.assert_allclose(engine.run(feeds), expected, atol=1e-4)
    student = bundle.students[0]
    assert not TorchProgramEngine(student.program, "student", 4, TorchOptions(channels_last=True)).channels_last


def test_channels_last_finds_every_kind_of_2d_convolution():
    """padding="same" and transposed convolutions export as overloads of their own: their weights go NHWC too."""
    import torch

    from server.torch_engine import channels_last_weights

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding="same"), torch.nn.Conv2d(8, 8, 3, padding=1),
                              torch.nn.ConvTranspose2d(8, 4, 2, stride=2), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    x = torch.randn(2, 3, 8, 8)
    expected = net(x)
    module = torch.export.export(net, (x,)).module()
    assert channels_last_weights(module) == 3
    weights = [p for p in module.parameters() if p.dim() == 4]
    assert len(weights) == 3 and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    torch.testing.assert_close(module(x.contiguous(memory_format=torch.channels_last)), expected)
