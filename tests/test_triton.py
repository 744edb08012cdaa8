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


def test_missing_tensorrt_plans_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no fp16 TensorRT engine"):
        write_triton_repository(BUNDLE, tmp_path, TritonConfig(tensorrt_precision="fp16", kind="KIND_GPU"))
