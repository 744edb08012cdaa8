"""Latent bundles (format 2): tiny random diffusers VAEs written with save_pretrained, their decoders
exported and parity-checked, and a latent bundle served end to end in every output format."""

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill.pipeline import train_verifier
from distill.trainer import TrainConfig
from distill.verifier import VerifierConfig
from export.bundle import FORMAT_2, read_bundle
from export.decoder import DECODER_TOLERANCE, DecoderGraph, load_vae
from export.onnx_export import check_graph, example_inputs, export_onnx
from export.writer import export_bundle

from serving import in_process
from tiny_latent import IMAGE, LATENT, VAE_KINDS, random_data

pytest.importorskip("diffusers", reason="diffusers is not installed (the train extra)")


@pytest.fixture(scope="module")
def vaes(tiny_latent):
    return tiny_latent[2]


@pytest.mark.parametrize("kind", VAE_KINDS)
def test_decoder_exports_with_its_scaling_baked_and_matches_torch(vaes, kind, tmp_path):
    vae = load_vae(vaes[kind])
    graph = DecoderGraph(vae)
    assert graph.image_shape(LATENT) == IMAGE
    latent = torch.randn(2, *LATENT)
    with torch.no_grad():  # the graph decodes z / scale + shift, as diffusers pipelines do
        shift = vae.config.get("shift_factor") or 0  # AutoencoderDC has none
        expected = vae.decode(latent / vae.config.scaling_factor + shift).sample.clamp(-1, 1)
        assert torch.allclose(graph(latent), expected)
    make = lambda batch: example_inputs(graph, batch, LATENT, 3, seed=batch)
    path = export_onnx(graph, make(2), tmp_path / "decoder.onnx")
    errors = check_graph(graph, path, make, "decoder", batches=(1, 3), tolerance=DECODER_TOLERANCE)
    assert errors["parity_max_abs_err_b3"] <= DECODER_TOLERANCE


def test_a_folder_that_is_not_a_vae_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="a 'UNet2DModel' is not a decoder we export"):
        load_vae(tmp_path)


@pytest.fixture(scope="module")
def latent_bundle(tiny_latent):
    """Teacher and student on 4x4x4 latents, a verifier on the 3x8x8 images the VAE decodes them to."""
    return tiny_latent[:2]


def test_the_latent_bundle_is_format_2(latent_bundle):
    out, _ = latent_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == FORMAT_2 and manifest["decoder"]["file"] == "decoder.onnx"
    assert manifest["latent"] == {"channels": 4, "height": 4, "width": 4}
    assert manifest["image"]["channels"] == 3 and manifest["image"]["height"] == 8
    bundle = read_bundle(out)
    assert bundle.sample_shape == LATENT and bundle.image_shape == IMAGE and bundle.decoder is not None


def test_a_verifier_of_the_wrong_shape_is_refused(latent_bundle, vaes, tmp_path):
    _, runs = latent_bundle
    quick = TrainConfig(steps=1, batch_size=8)
    train_verifier(random_data(LATENT), VerifierConfig(width=8, feature_dim=16), quick, tmp_path / "v", progress=False)
    with pytest.raises(ValueError, match=r"the verifier scores the served images, \[3, 8, 8\] \(the decoder's "
                                         r"output\), but .* was trained on \[4, 4, 4\]"):
        export_bundle(runs / "freeflow", str(runs / "teacher"), tmp_path / "v", tmp_path / "x", (1.5,),
                      progress=False, decoder=vaes["AutoencoderTiny"])


def test_export_refuses_what_would_not_fit_and_a_bundle_of_rgba_images_serves_png_and_webp(latent_bundle, vaes,
                                                                                            tiny_digits_runs, tmp_path):
    """The latent runs exported without a decoder make a class bundle of 4-channel (RGBA) images. Before any graph
    is written, export refuses a student of another teacher, a verifier of other classes, two scales of one name
    and a folder holding something else; a second export into a bundle's folder leaves none of the first's files."""
    from distill.data import Dataset

    _, runs = latent_bundle
    quick = TrainConfig(steps=1, batch_size=8)
    train_verifier(random_data(LATENT), VerifierConfig(width=8, feature_dim=16), quick, tmp_path / "v", progress=False)
    student, teacher = runs / "freeflow", str(runs / "teacher")
    with pytest.raises(ValueError, match=r"was distilled from .*teacher, and does not fit --teacher .*: num_classes "
                                         r"3 \(student\) against 10 \(teacher\); shape \[4, 4, 4\]"):
        export_bundle(student, str(tiny_digits_runs / "teacher"), tmp_path / "v", tmp_path / "x", progress=False)
    two = random_data(LATENT)
    train_verifier(Dataset("two", two.samples, two.labels % 2, ["a", "b"]), VerifierConfig(width=8, feature_dim=16),
                   quick, tmp_path / "v2", progress=False)
    with pytest.raises(ValueError, match="scores 2 classes, but the teacher generates 3"):
        export_bundle(student, teacher, tmp_path / "v2", tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="--guidance-scales: 1.2 given more than once"):
        export_bundle(student, teacher, tmp_path / "v", tmp_path / "x", (1.2, 1.2000001), progress=False)
    digits_student = tiny_digits_runs / "freeflow"  # 1-channel samples, which a 4-channel VAE cannot decode
    with pytest.raises(ValueError, match=r"--decoder .* does not decode the student's \[1, 8, 8\] latents"):
        export_bundle(digits_student, str(tiny_digits_runs / "teacher"), tiny_digits_runs / "verifier",
                      tmp_path / "x", progress=False, decoder=vaes["AutoencoderKL"])
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*partial"))  # refused before any folder
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no bundle"):
        export_bundle(student, teacher, tmp_path / "v", tmp_path / "busy", progress=False)
    out = tmp_path / "rgba"
    export_bundle(student, teacher, tmp_path / "v", out, (1.5, 2.0), progress=False, parity_batches=(1, 3))
    export_bundle(student, teacher, tmp_path / "v", out, (1.5,), progress=False, parity_batches=(1, 3))
    assert not (out / "student_w2.onnx").exists() and (out / "student_w1.5.onnx").is_file()

    async def scenario():
        async with in_process(bundle=out, max_batch_size=4) as (client, _):
            return {fmt: await client.post("/v1/generate", json={"labels": ["a"], "seeds": [1], "output_format": fmt})
                    for fmt in ("png", "webp", "jpeg")}

    answers = asyncio.run(scenario())
    for fmt in ("png", "webp"):
        assert answers[fmt].status_code == 200, answers[fmt].text
        image = Image.open(io.BytesIO(base64.b64decode(answers[fmt].json()["images"][0])))
        assert image.mode == "RGBA" and image.size == (4, 4)
    assert answers["jpeg"].status_code == 422
    assert "jpeg has no alpha channel, and this bundle's images are RGBA: ask for png or webp" in \
        answers["jpeg"].json()["error"]["message"]


def test_a_latent_bundle_serves_decoded_images_in_every_format(latent_bundle):
    out, _ = latent_bundle

    async def scenario():
        async with in_process(bundle=out, max_batch_size=4, max_queue_size=64) as (client, service):
            answers = {}
            for fmt in ("png", "jpeg", "webp"):
                answers[fmt] = (await client.post("/v1/generate", json={
                    "labels": ["a", "b", "c", "a", "b"], "seeds": [1, 2, 3, 4, 5], "output_format": fmt})).json()
            alone = (await client.post("/v1/generate", json={"labels": ["b"], "seeds": [2]})).json()
            raw = (await client.post("/v1/generate", json={"labels": ["a"], "seeds": [1], "format": "raw"})).json()
            search = (await client.post("/v1/search", json={"label": "c", "n": 6, "top_k": 2, "teacher_steps": 2,
                                                            "seed": 9})).json()
            decoded_rows = service.metrics.engine("decoder").inference_count._value.get()
            return answers, alone, raw, search, decoded_rows

    answers, alone, raw, search, decoded_rows = asyncio.run(scenario())
    for fmt, answer in answers.items():
        assert answer["output_format"] == fmt and len(answer["images"]) == 5
        image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
        assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt] and image.size == (8, 8)
        assert image.mode == "RGB"
    assert alone["images"][0] == answers["png"]["images"][1]  # the same seed, the same bytes, in any batch
    assert np.asarray(raw["arrays"]).shape == (1, *IMAGE)  # raw arrays are the decoded images
    assert [s["stage"] for s in search["stages"]] == ["student", "decoder", "verifier", "teacher", "decoder_final",
                                                      "verifier_final"]
    assert len(search["images"]) == 2
    assert decoded_rows >= 5 * 3 + 1 + 1 + 6 + 2  # every image served and every candidate scored was decoded


def test_the_triton_repository_chains_the_student_and_the_decoder(latent_bundle, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from export.triton import write_triton_repository

    out, _ = latent_bundle
    configs = {path.parent.name: path for path in write_triton_repository(out, tmp_path)}
    assert set(configs) == {"latent_student_w1_5", "latent_teacher", "latent_verifier", "latent_decoder",
                            "latent_student_w1_5_image"}
    ensemble = text_format.Parse(configs["latent_student_w1_5_image"].read_text(), model_config_pb2.ModelConfig())
    assert ensemble.platform == "ensemble"
    assert [i.name for i in ensemble.input] == ["x", "t", "s", "label"]
    assert [o.name for o in ensemble.output] == ["image"] and list(ensemble.output[0].dims) == [3, 8, 8]
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["latent_student_w1_5", "latent_decoder"]
    assert steps[0].output_map["x_s"] == steps[1].input_map["latent"] != ""  # a missing key would read ""


def test_graphs_with_external_weights_are_listed_checked_and_served_alike(latent_bundle, vaes, tmp_path):
    from export.bundle import BundleError
    from export.triton import write_triton_repository

    inline, runs = latent_bundle
    out = tmp_path / "external"
    export_bundle(runs / "freeflow", str(runs / "teacher"), runs / "verifier", out, (1.5,), progress=False,
                  decoder=vaes["AutoencoderKL"], external_data=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decoder"]["data"]["file"] == "decoder.onnx.data"
    assert all((out / entry["data"]["file"]).is_file() for entry in [*manifest["student"], manifest["teacher"]])
    assert (out / "decoder.onnx").stat().st_size < (out / "decoder.onnx.data").stat().st_size

    async def images(bundle):
        async with in_process(bundle=bundle, max_batch_size=4) as (client, _):
            body = {"labels": ["a", "c"], "seeds": [3, 4], "steps": 2}
            return (await client.post("/v1/generate", json=body)).json()["images"]

    assert asyncio.run(images(out)) == asyncio.run(images(inline))
    configs = write_triton_repository(out, tmp_path / "triton")
    model = next(config.parent / "1" for config in configs if "decoder" in config.parent.name)
    assert sorted(f.name for f in model.iterdir()) == ["decoder.onnx.data", "model.onnx"]
    with open(out / "decoder.onnx.data", "r+b") as handle:  # a flipped byte in the weights is caught
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 1]))
    with pytest.raises(BundleError, match="decoder.onnx.data fails its sha256 check"):
        read_bundle(out)
