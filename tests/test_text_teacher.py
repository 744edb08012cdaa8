"""The embedded text-to-image path, tiny: the shapes CLIP, a SANA-layout teacher trained on shapes
captions by our trainer, a FreeFlow student of it, a pixel-space text bundle with the CLIP as its
verifier, and a search over HTTP by prompt."""

import json

import httpx
import numpy as np
import pytest
import torch

from serving import Server

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def shapes_bundle(tmp_path_factory):
    from distill.clip import ClipConfig, save_clip, train_clip
    from distill.freeflow import FreeFlowConfig
    from distill.pipeline import distill_student
    from distill.text_teacher import ShapesTeacherConfig, train_shapes_teacher
    from distill.trainer import TrainConfig
    from export.writer import export_bundle

    root = tmp_path_factory.mktemp("shapes")
    clip, tokenizer = train_clip(ClipConfig(width=32, layers=1, heads=2, steps=20, batch_size=32), progress=False)
    clip_folder = save_clip(clip, tokenizer, root / "clip")
    quick = TrainConfig(steps=4, batch_size=8, lr=1e-3, log_every=2, checkpoint_every=4)
    pipeline = train_shapes_teacher(clip, tokenizer, root / "teacher", ShapesTeacherConfig(width=32, heads=2, layers=1),
                                    quick, progress=False)
    distill_student("freeflow", f"diffusers:{pipeline}", FreeFlowConfig(), quick, root / "student", progress=False,
                    prompts=["a small red circle", "a large blue square above a small green triangle"])
    export_bundle(root / "student", f"diffusers:{pipeline}", f"clip:{clip_folder}", root / "bundle", (1.0, 2.0),
                  teacher_guidance_scale=2.0, progress=False)
    return root


def test_the_trained_teacher_is_a_diffusers_pipeline_that_learnt(shapes_bundle):
    from distill.models import load_teacher

    log = (shapes_bundle / "teacher" / "run" / "log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in log if "loss" in json.loads(line)]
    teacher = load_teacher(f"diffusers:{shapes_bundle / 'teacher' / 'pipeline'}")
    assert teacher.config.family == "sana" and teacher.config.shape == (3, 32, 32)
    x, t = torch.randn(2, 3, 32, 32), torch.full((2,), 0.5)
    with torch.no_grad():
        assert torch.isfinite(teacher.velocity(x, t, teacher.null_condition(torch.zeros(2, 1, 1)))).all()
    assert losses and np.isfinite(losses).all()


def test_a_pixel_space_text_bundle_searches_by_prompt(shapes_bundle):
    from export.bundle import read_bundle

    bundle = read_bundle(shapes_bundle / "bundle")
    assert bundle.decoder is None and bundle.text is not None and bundle.verifier is not None
    server = Server("--no-ui", bundle=shapes_bundle / "bundle").wait_ready()
    try:
        found = httpx.post(server.url + "/v1/search", timeout=60, json={
            "prompt": "a small red circle left of a blue square", "n": 6, "seed": 3, "teacher_steps": 2,
            "return_noise": True}).json()
        again = httpx.post(server.url + "/v1/search", timeout=60, json={
            "prompt": "a small red circle left of a blue square", "n": 6, "seed": 3}).json()
    finally:
        server.stop()
    scores = [c["score"] for c in found["candidates"]]
    assert found["chosen_seeds"] == [found["candidates"][int(np.argmax(scores))]["seed"]]
    assert again["candidates"] == found["candidates"]  # the chosen noise follows from its seed
