"""Export: a tiny model exported in the test, parity and batch invariance, the baked guidance, the
reader refusing tampered or incomplete bundles, and the committed models/digits bundle."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export.bundle import BundleError, read_bundle
from export.onnx_export import PARITY_TOLERANCE
from export.writer import export_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tiny_digits_runs):
    return tiny_digits_runs


@pytest.fixture(scope="module")
def bundle(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle(runs / "freeflow", str(runs / "teacher"), runs / "verifier", out, (1.5, 3.0),
                  metrics={"rows": []}, progress=False)
    return out


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_manifest_and_checks(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "flowmap-bundle/1"
    assert manifest["image"] == {"channels": 1, "height": 8, "width": 8, "range": [-1, 1]}
    assert manifest["classes"] == [str(i) for i in range(10)]
    assert [s["cfg_scale"] for s in manifest["student"]] == [1.5, 3.0]
    provenance = manifest["provenance"]
    assert provenance["method"] == "freeflow" and provenance["steps"] == 3
    assert provenance["source_commit"]
    for name, checks in provenance["checks"].items():
        errors = [v for k, v in checks.items() if k.startswith("parity")]
        assert len(errors) == 3 and max(errors) <= PARITY_TOLERANCE, name
        assert checks["batch_invariance_max_abs_err"] <= PARITY_TOLERANCE
    loaded = read_bundle(bundle)
    assert loaded.guidance_scales == (1.5, 3.0) and loaded.num_classes == 10


def test_graph_signatures_have_a_dynamic_batch(bundle):
    student = session(bundle / "student_w1.5.onnx")
    assert [i.name for i in student.get_inputs()] == ["x", "t", "s", "label"]  # no guidance input: it is baked
    assert [i.shape for i in student.get_inputs()][0] == ["batch", 1, 8, 8]
    assert [i.name for i in session(bundle / "teacher_w1.5.onnx").get_inputs()] == ["x", "t", "label"]
    verifier = session(bundle / "verifier.onnx")
    assert [i.name for i in verifier.get_inputs()] == ["image"]
    out = verifier.run(None, {"image": np.zeros((5, 1, 8, 8), np.float32)})[0]
    assert out.shape == (5, 10)


def test_the_guidance_scale_is_baked(bundle):
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((8, 1, 8, 8), dtype=np.float32), "t": np.ones(8, np.float32),
             "s": np.zeros(8, np.float32), "label": rng.integers(0, 10, 8)}
    low = session(bundle / "student_w1.5.onnx").run(None, feeds)[0]
    high = session(bundle / "student_w3.onnx").run(None, feeds)[0]
    assert np.abs(low - high).max() > 1e-4  # two scales, two different graphs
    again = session(bundle / "student_w1.5.onnx").run(None, feeds)[0]
    assert np.array_equal(low, again)


def test_the_teacher_graph_makes_one_pass_at_w1_and_two_above(runs):
    import torch

    from distill.flow import guided_velocity, null_condition
    from distill.models import load_teacher
    from export.onnx_export import TeacherGraph

    teacher = load_teacher(str(runs / "teacher"))
    rows = []
    teacher.net.register_forward_hook(lambda module, args, out: rows.append(len(out)))
    x, t, label = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 4, 9])
    with torch.no_grad():
        for scale in (1.0, 2.0):
            guided = guided_velocity(teacher.velocity, x, t, label, scale, null_condition(teacher, label))
            assert torch.allclose(TeacherGraph(teacher, scale)(x, t, label), guided, atol=1e-6)
    assert rows == [6, 3, 6, 6]  # guided_velocity always batches both passes; the w=1 graph only one


def test_reader_refuses_a_tampered_file(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "verifier.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "verifier.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="verifier.onnx fails its sha256 check"):
        read_bundle(copy)
    read_bundle(copy, verify=False)  # the structure itself is still fine


def test_reader_errors_name_the_problem(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "teacher_w1.5.onnx").unlink()
    with pytest.raises(BundleError, match="teacher file teacher_w1.5.onnx is missing"):
        read_bundle(copy)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "someone-else/9"}))
    with pytest.raises(BundleError, match="unknown format 'someone-else/9'"):
        read_bundle(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle(copy)
    with pytest.raises(BundleError, match="manifest.json is missing"):
        read_bundle(tmp_path / "nothing")
    escaped = {**manifest, "teacher": {"file": "../teacher_w1.5.onnx", "sha256": "0", "cfg_scale": 1.5}}
    (copy / "manifest.json").write_text(json.dumps(escaped))
    with pytest.raises(BundleError, match="plain name inside the bundle"):
        read_bundle(copy)


def test_reader_imports_neither_torch_nor_onnx():
    import subprocess
    import sys

    code = ("import sys; import export.bundle, export.trt_runtime; "
            "print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_the_committed_digits_bundle_passes_the_reader():
    bundle = read_bundle(ROOT / "models" / "digits")
    assert bundle.image_shape == (1, 8, 8) and bundle.num_classes == 10
    assert bundle.provenance["method"] == "freeflow"
    metrics = bundle.provenance["metrics"]
    assert any(r["model"] == "student" and r["steps"] == 1 for r in metrics["rows"])
    for shipped in (ROOT / "models").iterdir():  # each shipped bundle stays small enough for git
        size = sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file())
        assert size < 20 * 1024 * 1024, f"{shipped.name} is {size / 2**20:.1f} MiB; keep a bundle under 20 MiB"


def test_torch_backend_serves_the_same_images_as_onnxruntime(runs, bundle):
    """The development backend runs the torch graphs from the run directories, no export needed."""
    import httpx

    from serving import Server

    body = {"labels": [3, 8], "seeds": [4, 5], "steps": 2, "format": "raw"}
    outputs = {}
    for backend in ("torch", "onnxruntime"):
        srv = Server("--backend", backend, "--no-ui", bundle=bundle, env={"FLOWMAP_TORCH_RUNS": str(runs)})
        try:
            srv.wait_ready()
            outputs[backend] = np.asarray(httpx.post(srv.url + "/v1/generate", json=body, timeout=60).json()["arrays"])
        finally:
            srv.stop()
    assert outputs["torch"].shape == (2, 1, 8, 8)
    assert np.abs(outputs["torch"] - outputs["onnxruntime"]).max() <= PARITY_TOLERANCE


def test_the_manifest_model_writes_the_committed_manifest_back_byte_for_byte(tmp_path):
    from export.bundle import Manifest

    committed = ROOT / "models" / "digits"
    Manifest.load(committed).save(tmp_path)
    assert (tmp_path / "manifest.json").read_bytes() == (committed / "manifest.json").read_bytes()


def test_a_scale_the_student_was_not_distilled_at_is_refused_before_any_export(runs, tmp_path):
    from export.writer import check_trained_guidance, trained_guidance

    assert trained_guidance({"guidance_min": 1.0, "guidance_max": 2.0}) == (1.0, 2.0)
    assert trained_guidance({"dm_guidance_scale": 1.5}) == (1.5, 1.5)  # DMD2, FSF-DMD: one scale
    assert trained_guidance({}) is None
    check_trained_guidance({"guidance_min": 1.0, "guidance_max": 2.0}, (1.0, 2.0))  # both ends are trained
    with pytest.raises(ValueError, match="--guidance-scales 4: the student was distilled at guidance 1..2 only"):
        check_trained_guidance({"guidance_min": 1.0, "guidance_max": 2.0}, (1.0, 4.0))
    with pytest.raises(ValueError, match="--guidance-scales 0.5: "):
        check_trained_guidance({"guidance_min": 1.0, "guidance_max": 2.0}, (0.5,))
    with pytest.raises(ValueError, match="distilled at guidance 1.5 only"):
        check_trained_guidance({"dm_guidance_scale": 1.5}, (2.0,))
    with pytest.raises(ValueError, match="--guidance-scales 5"):  # the tiny student was distilled over 1..3
        export_bundle(runs / "freeflow", str(runs / "teacher"), runs / "verifier", tmp_path / "b", (5.0,),
                      progress=False)
    assert not (tmp_path / "b").exists()  # refused before anything was written
