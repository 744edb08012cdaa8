"""The torch backend on a CUDA GPU: bf16 parity, compiled buckets with CUDA graphs, hand-captured CUDA
graphs, nvJPEG, and a server on `--backend torch --device cuda`. `scripts/gpu_check.sh` runs these on
a lent GPU; elsewhere they skip and say what is missing."""

import base64
import io

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, JpegImagePlugin

from export.bundle import read_bundle
from export.tensorrt import random_feeds
from export.writer import export_bundle
from server.imaging import to_uint8

from serving import Server


def _missing() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA GPU"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_missing() is not None, reason=f"needs a CUDA GPU: {_missing()}")]


@pytest.fixture(scope="module")
def program_bundle(tiny_digits_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-programs") / "tiny"
    export_bundle(tiny_digits_runs / "freeflow", str(tiny_digits_runs / "teacher"), tiny_digits_runs / "verifier",
                  out, (1.5,), progress=False, programs=True)
    return out


def reference(graph, batch):
    session = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
    feeds = random_feeds(session.get_inputs(), batch, 10, seed=batch)
    return feeds, session.run(None, feeds)[0]


@pytest.mark.parametrize("compile_, graphs", [(False, False), (True, False), (True, True), (False, True)])
def test_cuda_engines_match_onnxruntime(program_bundle, compile_, graphs):
    from server.torch_engine import TorchOptions, TorchProgramEngine

    teacher = read_bundle(program_bundle).teacher
    engine = TorchProgramEngine(teacher.program, "teacher", 8, TorchOptions("cuda", "bfloat16", compile_, graphs),
                                buckets=(4, 8))
    assert engine.buckets == (4, 8) and 0 < engine.parity <= 0.05
    for batch in (4, 8, 4):  # a bucket replayed again after another
        feeds, expected = reference(teacher, batch)
        actual = engine.run(feeds)
        assert np.abs(actual - expected).max() <= 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("compile_, graphs", [(False, False), (True, True), (False, True)])
def test_float8_engines_on_cuda_answer_as_float32(tmp_path, compile_, graphs):
    import torch

    from export.programs import export_program
    from flowmap.gpu_stages import model
    from server.torch_engine import TorchOptions, TorchProgramEngine

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"float8 matrix products need compute capability 8.9, {torch.cuda.get_device_name()} has less")
    torch.manual_seed(0)
    graph, inputs = model("sit-xl/2", "tiny")
    path = export_program(graph, inputs(2), tmp_path / "sit.pt2")
    feeds = {name: value.numpy() for name, value in inputs(8).items()}
    expected = TorchProgramEngine(path, "sit", 8, TorchOptions()).run(feeds)
    engine = TorchProgramEngine(path, "sit", 8, TorchOptions("cuda", "float8", compile_, graphs), buckets=(4, 8))
    assert 0 < engine.parity <= 0.1
    for batch in (4, 8, 4):  # a bucket replayed again after another
        actual = engine.run({name: value[:batch] for name, value in feeds.items()})
        assert np.abs(actual - expected[:batch]).max() <= 0.1 * np.abs(expected).max()


def recorded_graphs(engine) -> int:
    """How many CUDA graphs torch.compile has recorded in the engine's own thread."""
    import torch
    from torch._inductor import cudagraph_trees

    def count() -> int:
        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        return 0 if manager is None else sum(len(nodes) for nodes in manager.roots.values())

    return engine._in_thread(count)


def test_a_compiled_engine_records_its_cuda_graphs_at_start_and_replays_them_for_any_thread(program_bundle):
    """torch.compile records a bucket's CUDA graph at its second call, and keeps it in the thread that recorded
    it (torch 2.11 fails outright in a thread other than the one that imported it): called from the batcher's
    thread, an engine must replay what it recorded at start, not record in a visitor's request."""
    import threading

    import torch
    from torch._inductor import cudagraph_trees

    from server.torch_engine import TorchOptions, TorchProgramEngine

    teacher = read_bundle(program_bundle).teacher
    engines = [TorchProgramEngine(teacher.program, f"teacher{i}", 8, TorchOptions("cuda", "bfloat16", True, True),
                                  buckets=(4, 8)) for i in range(2)]  # two: each in a thread of its own
    at_start = [recorded_graphs(engine) for engine in engines]
    seen = {}

    def serve() -> None:  # as a batcher's worker thread does
        try:
            for engine in engines:
                for batch in (4, 8):
                    feeds, expected = reference(teacher, batch)
                    seen[engine.name, batch] = np.abs(engine.run(feeds) - expected).max() / np.abs(expected).max()
            try:
                here = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
            except AssertionError:  # torch before 2.13: a thread that never set CUDA-graph state up has none
                here = None
            seen["graphs here"] = here
        except Exception as err:  # noqa: BLE001 (reported below, not lost with the thread)
            seen["error"] = err

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    assert "error" not in seen, seen.get("error")
    assert seen.pop("graphs here") is None and max(seen.values()) <= 0.05
    assert at_start == [recorded_graphs(engine) for engine in engines] and min(at_start) >= 2


@pytest.mark.parametrize("graphs", [False, True])
def test_an_engine_runs_on_its_own_stream_and_returns_when_its_batch_is_done(program_bundle, graphs):
    """A batch queued behind other work on the default stream would wait for it; a device output handed on
    before its batch is done would let the next batch overtake the encoding of this one."""
    import torch

    from server.torch_engine import TorchOptions, TorchProgramEngine

    teacher = read_bundle(program_bundle).teacher
    engine = TorchProgramEngine(teacher.program, "teacher", 8, TorchOptions("cuda", "bfloat16", False, graphs),
                                buckets=(8,), device_output=True)
    feeds, expected = reference(teacher, 8)
    engine.run(feeds)  # once before: a kernel's first load may wait for the whole device, the spin below included
    torch.cuda._sleep(2_000_000_000)  # the default stream spins for about a second
    with torch.cuda.stream(engine.stream):
        torch.cuda._sleep(200_000_000)  # and the engine's own for a tenth of one: its batch comes after
    output = engine.run(feeds)
    assert engine.stream.query()  # run returned after its stream had finished
    reader = torch.cuda.Stream()
    with torch.cuda.stream(reader):  # a stream that waits for neither
        actual = output.images.cpu().numpy()
    assert not torch.cuda.default_stream().query()  # all of it while the default stream still spun
    assert np.abs(actual - expected).max() <= 0.05 * np.abs(expected).max()
    np.testing.assert_array_equal(output.pixels, to_uint8(actual))  # its pixels' copy came with the batch
    torch.cuda.synchronize()


def test_engines_replaying_cuda_graphs_at_once_keep_streams_of_their_own_and_answer_right(program_bundle):
    """Eight engines of seven buckets each, as a server's stages replay them, from threads of their own: a stream
    taken per bucket would wrap around torch's pool of 32 onto another engine's, and graphs captured on torch's one
    default capture stream share cuBLAS's workspace, which engines replaying at once would race on."""
    import threading

    from server.torch_engine import TorchOptions, TorchProgramEngine

    teacher = read_bundle(program_bundle).teacher
    options = TorchOptions("cuda", "bfloat16", False, True)  # hand-captured CUDA graphs
    engines = [TorchProgramEngine(teacher.program, f"teacher{number}", 64, options) for number in range(8)]
    assert all(len(engine.graphs) == 7 for engine in engines)
    assert len({engine.stream.cuda_stream for engine in engines}) == len(engines)
    feeds, expected = reference(teacher, 64)
    errors = []

    def replay(engine) -> None:
        for _ in range(20):
            errors.append(float(np.abs(engine.run(feeds) - expected).max()))

    threads = [threading.Thread(target=replay, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:  # the card's memory back for the tests after this one
        engine.close()
    assert len(errors) == 8 * 20 and max(errors) <= 0.05 * np.abs(expected).max()


def images_and_their_jpegs_agree(images: np.ndarray, encoded: list[bytes]) -> bool:
    from server.imaging import to_uint8

    for data, pixels in zip(encoded, to_uint8(images), strict=True):
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
        if decoded.shape != pixels.shape or np.abs(decoded - pixels).mean() >= 6:
            return False
    return True


def test_nvjpeg_encodes_what_the_cpu_encoder_does():
    from server.gpu_jpeg import CudaJpeg

    rng = np.random.default_rng(0)
    images = np.clip(rng.standard_normal((3, 3, 64, 48)) * 0.3, -1, 1).astype(np.float32)
    assert images_and_their_jpegs_agree(images, CudaJpeg("cuda").encode(images, 95))


def test_nvjpeg_encodes_images_still_being_made_on_the_callers_stream():
    """The encoder's stream waits for its caller's: read too early, these pixels are not made yet."""
    import torch

    from server.gpu_jpeg import CudaJpeg

    rng = np.random.default_rng(1)
    images = np.clip(rng.standard_normal((3, 3, 64, 48)) * 0.3, -1, 1).astype(np.float32)
    encoder, on_device = CudaJpeg("cuda"), torch.from_numpy(images).cuda()
    pending = torch.full_like(on_device, 0.5)  # what an encoder that did not wait would read: a flat grey
    torch.cuda._sleep(1_000_000_000)
    pending.copy_(on_device)
    assert images_and_their_jpegs_agree(images, encoder.encode(pending, 95))


@pytest.fixture(scope="module")
def rgb_bundle(tmp_path_factory):
    """A tiny latent bundle (SiT denoiser, SD-VAE-kind decoder: RGB images) with torch programs."""
    from flowmap.bench_stages import build_latent_bundle
    from flowmap.gpu_stages import sd_vae

    return build_latent_bundle(tmp_path_factory.mktemp("gpu-rgb") / "bundle", lambda text: None, "S/2", (4, 8, 8),
                               sd_vae(tiny=True), programs=True)


@pytest.mark.parametrize("fixture", ["program_bundle", "rgb_bundle"])
def test_a_server_on_cuda_serves_jpeg(fixture, request):
    """RGB images are encoded by nvJPEG (4:4:4 chroma, no fallback logged) at any size with --gpu-jpeg-min-side 0,
    grayscale ones (digits) on the CPU; a search scores decoded candidates that stayed on the GPU."""
    server = Server("--no-ui", "--backend", "torch", "--device", "cuda", "--torch-dtype", "bfloat16", "--cuda-graphs",
                    "--max-batch-size", "8", "--max-queue-size", "64", "--gpu-jpeg-min-side", "0",
                    bundle=request.getfixturevalue(fixture)).wait_ready(timeout=300)
    try:
        response = httpx.post(server.url + "/v1/generate", timeout=120, json={
            "labels": [3, 7, 1], "seeds": [1, 2, 3], "output_format": "jpeg"})
        # Best-of-N: decoded candidates (a latent bundle's stay on the GPU) scored, the best two encoded
        search = httpx.post(server.url + "/v1/search", timeout=120, json={
            "label": 3, "seed": 1, "n": 6, "top_k": 2, "teacher_steps": 2, "output_format": "jpeg"})
    finally:
        log = server.stop()
    assert response.status_code == 200 and search.status_code == 200, log[-3000:]
    assert len(search.json()["images"]) == 2
    answer = response.json()
    assert answer["output_format"] == "jpeg" and len(answer["images"]) == 3
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    assert image.format == "JPEG" and image.mode == ("RGB" if fixture == "rgb_bundle" else "L")
    if fixture == "rgb_bundle":
        assert JpegImagePlugin.get_sampling(image) == 0  # 4:4:4, nvJPEG's; the CPU's simplejpeg writes 4:2:0
    assert "GPU JPEG encoding failed" not in log


def test_a_channels_last_decoder_replays_its_cuda_graphs_as_the_default_layout_does(rgb_bundle):
    """--torch-channels-last on CUDA: the decoder's convolutions in NHWC, replayed from hand-captured CUDA graphs and
    compiled (a graph general in the batch, where inductor would not pick that layout itself) with CUDA graphs, answer
    at a bucket's size, replayed, as NCHW does in bf16; so do they with cuDNN's algorithms timed per bucket at start
    (--torch-cudnn-benchmark), a flag of the whole process that the next engine, without it, sets off again."""
    import torch

    from server.torch_engine import TorchOptions, TorchProgramEngine

    decoder = read_bundle(rgb_bundle).decoder
    feeds = random_feeds(ort.InferenceSession(str(decoder.path)).get_inputs(), 4, 10, seed=5)
    answers = {}
    for label, compiled, laid_out, timed in (("nchw", False, False, False), ("cudnn", True, True, True),
                                             ("graphs", False, True, False), ("compiled", True, True, False)):
        engine = TorchProgramEngine(decoder.program, "decoder", 4, TorchOptions(
            "cuda", "bfloat16", compiled, True, channels_last=laid_out, cudnn_benchmark=timed))
        try:
            assert engine.channels_last == laid_out and 4 in engine.buckets
            assert torch.backends.cudnn.benchmark == timed
            engine.run(feeds)  # a bucket recorded at start: this and the next are replays
            answers[label] = engine.run(feeds)
        finally:
            engine.close()
    scale = np.abs(answers["nchw"]).max()
    for label in ("graphs", "compiled", "cudnn"):  # two bf16 runs, the kernels' order of sums their only difference
        assert np.abs(answers[label] - answers["nchw"]).max() <= 0.05 * scale, label
