"""The Triton model repository, parsed with the protobuf schema that tritonclient ships."""

import numpy as np
import onnxruntime as ort
import pytest

from export.bundle import read_bundle
from export.triton import TritonConfig, write_triton_repository

from serving import BUNDLE

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient[grpc] is not installed (the dev extra)")
text_format = pytest.importorskip("google.protobuf.text_format")
pytestmark = pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(), reason=f"no bundle at {BUNDLE}")

NUMPY_OF = {model_config_pb2.TYPE_FP32: "tensor(float)", model_config_pb2.TYPE_INT64: "tensor(int64)"}


def test_every_config_parses_and_matches_its_onnx_graph(tmp_path):
    config = TritonConfig(max_batch_size=128, preferred_batch_sizes=(8, 32), max_queue_delay_us=500, instances=2)
    configs = write_triton_repository(BUNDLE, tmp_path, config)
    bundle = read_bundle(BUNDLE)
    assert len(configs) == len(bundle.students) + 2
    for path in configs:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 128
        assert list(config.dynamic_batching.preferred_batch_size) == [8, 32]
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        group = config.instance_group[0]
        assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        model = path.parent / "1" / "model.onnx"
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        graph_inputs = {i.name: i for i in session.get_inputs()}
        assert [i.name for i in config.input] == list(graph_inputs)
        for item in config.input:
            graph = graph_inputs[item.name]
            assert NUMPY_OF[item.data_type] == graph.type
            per_item = list(graph.shape[1:])
            if per_item:  # images: the dims are the graph's, without the batch axis
                assert list(item.dims) == per_item
            else:  # per-row scalars: [1] in Triton's API, reshaped to [] for the model
                assert list(item.dims) == [1] and list(item.reshape.shape) == []
        outputs = session.get_outputs()
        assert [o.name for o in config.output] == [o.name for o in outputs]
        assert list(config.output[0].dims) == list(outputs[0].shape[1:])


def test_the_repository_model_still_runs(tmp_path):
    write_triton_repository(BUNDLE, tmp_path)
    name = f"{read_bundle(BUNDLE).name}_verifier"
    session = ort.InferenceSession(str(tmp_path / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.zeros((3, 1, 8, 8), np.float32)})[0].shape == (3, 10)


def test_a_small_max_batch_keeps_the_preferred_sizes_under_it_and_no_instances_is_refused():
    from export.triton import preferred_batches

    assert preferred_batches(256) == (16, 64) and preferred_batches(32) == (16,) and preferred_batches(8) == (8,)
    TritonConfig(max_batch_size=8, preferred_batch_sizes=preferred_batches(8))
    with pytest.raises(ValueError, match="--triton-instances must be at least 1, got 0"):
        TritonConfig(instances=0)


def test_missing_tensorrt_plans_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no fp16 TensorRT engine"):
        write_triton_repository(BUNDLE, tmp_path, TritonConfig(tensorrt_precision="fp16", kind="KIND_GPU"))


def run_ensemble(repository, ensemble, feeds: dict) -> np.ndarray:
    """What Triton does with an ensemble's config: its steps in order, each model's inputs and outputs taken from and
    put in the tensors by the config's maps."""
    tensors = dict(feeds)
    for step in ensemble.ensemble_scheduling.step:
        session = ort.InferenceSession(str(repository / step.model_name / "1" / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        results = session.run(None, {key: tensors[value] for key, value in step.input_map.items()})
        tensors.update({value: results[names.index(key)] for key, value in step.output_map.items()})
    return tensors[ensemble.output[0].name]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_text_bundles_ensemble_takes_token_ids_and_gives_the_images(tiny_text_bundles, family, tmp_path):
    """A text bundle's repository has its text encoder, and per student an ensemble from the prompts' token ids
    (the bundle's tokenizer files) through the student to the decoder's image; FLUX's bundle has no verifier."""
    from tokenizers import Tokenizer

    bundle_dir, _ = tiny_text_bundles[family]
    bundle = read_bundle(bundle_dir)
    configs = {path.parent.name: path for path in write_triton_repository(bundle_dir, tmp_path)}
    name = bundle.name
    assert (f"{name}_verifier" in configs) == (bundle.verifier is not None) and f"{name}_text_encoder" in configs
    student = bundle.students[-1]
    ensemble = text_format.Parse(configs[f"{name}_student_w{student.guidance_scale:g}_image"].read_text(),
                                 model_config_pb2.ModelConfig())
    prompts = ["a red circle", "two blue squares above a green triangle"]
    feeds = {f"ids_{i}": np.array([encoding.ids for encoding in Tokenizer.from_file(str(path)).encode_batch(prompts)],
                                  np.int64)
             for i, path in enumerate(graph.path for graph in bundle.text.tokenizers)}
    latent = ort.InferenceSession(str(bundle.decoder.path)).get_inputs()[0].shape[1:]
    feeds |= {"x": np.random.default_rng(0).standard_normal((2, *latent)).astype(np.float32),
              "t": np.ones(2, np.float32), "s": np.zeros(2, np.float32)}
    assert sorted(i.name for i in ensemble.input) == sorted(feeds)

    def run(path, **inputs):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]

    condition = run(bundle.text.encoder.path, **{k: v for k, v in feeds.items() if k.startswith("ids_")})
    jumped = run(student.path, x=feeds["x"], t=feeds["t"], s=feeds["s"], label=condition)
    expected = run(bundle.decoder.path, latent=jumped)
    np.testing.assert_allclose(run_ensemble(tmp_path, ensemble, feeds), expected, rtol=1e-5, atol=1e-5)
