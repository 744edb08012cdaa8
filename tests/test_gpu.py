"""TensorRT and CUDA paths. They need an NVIDIA GPU with tensorrt, cuda-python and onnxruntime-gpu
(`pip install .[gpu]`); elsewhere they skip and say why."""

import shutil

import numpy as np
import pytest

from export.bundle import read_bundle

from serving import BUNDLE, Server


def _missing() -> str | None:
    """What this machine lacks for the TensorRT path, or None."""
    import importlib.util

    absent = [name for name, module in (("tensorrt", "tensorrt"), ("cuda-python", "cuda")) if
              importlib.util.find_spec(module) is None]
    if absent:
        return f"{' and '.join(absent)} not installed (the gpu extra: pip install .[gpu])"
    try:
        from export.trt_runtime import import_tensorrt

        _, cudart = import_tensorrt()
        error, count = cudart.cudaGetDeviceCount()
    except Exception as err:
        return f"TensorRT does not load: {type(err).__name__}: {err}"
    return None if int(error) == 0 and count > 0 else "cuda-python finds no CUDA device"


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_missing() is not None, reason=f"TensorRT path: {_missing()}"),
    pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(), reason=f"no bundle at {BUNDLE}"),
]


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory):
    from export.tensorrt import TensorRTConfig, add_tensorrt_engines

    copy = tmp_path_factory.mktemp("gpu") / "digits"
    shutil.copytree(BUNDLE, copy)
    for precision in ("fp32", "fp16"):
        config = TensorRTConfig(precision=precision, min_batch=1, opt_batch=32, max_batch=128,
                             timing_cache=str(copy.parent / "timing.cache"))
        add_tensorrt_engines(copy, config, progress=False)
    return copy


def test_engines_are_listed_and_parity_checked(gpu_bundle):
    bundle = read_bundle(gpu_bundle)
    graphs = len(bundle.students) + 2
    assert len(bundle.tensorrt) == 2 * graphs
    for plan in bundle.tensorrt:
        assert plan.max_batch == 128 and plan.device_name
    manifest = bundle.manifest.tensorrt
    assert all(e["parity_max_abs_err"] <= {"fp32": 1e-3, "fp16": 3e-2}[e["precision"]] for e in manifest)
    assert any(e["fp32_norm_layers"] > 0 for e in manifest if e["precision"] == "fp16")


def test_runner_is_batch_invariant_with_cuda_graphs(gpu_bundle):
    from export.trt_runtime import TrtRunner

    plan = next(p for p in read_bundle(gpu_bundle).tensorrt if p.precision == "fp32" and "student" in p.source)
    runner = TrtRunner(plan.path, cuda_graphs=True)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((16, 1, 8, 8), dtype=np.float32), "t": np.ones(16, np.float32),
             "s": np.zeros(16, np.float32), "label": rng.integers(0, 10, 16)}
    batch = runner.run(feeds)
    alone = runner.run({k: v[3:4] for k, v in feeds.items()})
    assert np.abs(batch[3:4] - alone).max() < 1e-4
    assert np.array_equal(runner.run(feeds), batch)  # a replayed CUDA graph gives the same numbers
    runner.close()


@pytest.mark.parametrize("flags", [["--backend", "tensorrt", "--cuda-graphs"], ["--providers", "cuda"]])
def test_server_on_the_gpu(gpu_bundle, flags):
    import httpx

    srv = Server(*flags, bundle=gpu_bundle).wait_ready(timeout=300)
    try:
        body = {"labels": [7, 1, 7], "seeds": [5, 6, 5]}
        images = httpx.post(srv.url + "/v1/generate", json=body, timeout=60).json()["images"]
        assert images[0] == images[2] != images[1]
    finally:
        srv.stop()
