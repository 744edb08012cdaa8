"""The embedded text-to-image path, tiny: the shapes CLIP, a SANA-layout teacher trained on shapes
captions by our trainer, a FreeFlow student of it, a pixel-space text bundle with the CLIP as its
verifier, and a search over HTTP by prompt."""

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch

from server.noise import noise_for

from serving import Server

pytest.importorskip("transformers")


def tiny_recipe():
    from distill.clip import ClipConfig
    from distill.freeflow import FreeFlowConfig
    from distill.oracle import OracleConfig
    from distill.text_teacher import ShapesTeacherConfig
    from distill.trainer import TrainConfig
    from flowmap.shapes_recipe import ShapesRecipe

    quick = TrainConfig(steps=4, batch_size=8, lr=1e-3, log_every=2, checkpoint_every=4)
    return ShapesRecipe(clip=ClipConfig(width=32, layers=1, heads=2, steps=20, batch_size=32),
                        oracle=OracleConfig(width=8, steps=5, batch_size=16),
                        teacher=ShapesTeacherConfig(width=32, heads=2, layers=1), teacher_train=quick,
                        method_config=FreeFlowConfig(guidance_max=3.0), distill_train=quick, train_prompts=32,
                        guidance_scale=2.0)


@pytest.fixture(scope="module")
def shapes_bundle(tmp_path_factory):
    """The shapes recipe of `make models` at toy sizes: runs/, docs/ and the bundle."""
    from flowmap.shapes_recipe import run_shapes_pipeline

    root = tmp_path_factory.mktemp("shapes")
    run_shapes_pipeline(tiny_recipe(), root, root / "docs", root / "bundle", progress=False)
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
    assert scores == sorted(scores, reverse=True) and len(scores) == 6  # best first
    assert found["chosen_seeds"] == [found["candidates"][0]["seed"]]
    assert again["candidates"] == found["candidates"]  # the chosen noise follows from its seed
    noise = np.load(io.BytesIO(base64.b64decode(found["noise"][0])))
    np.testing.assert_array_equal(noise, noise_for(found["chosen_seeds"], (3, 32, 32))[0])


def test_the_recipe_reports_its_stages_and_its_oracle(shapes_bundle):
    report = json.loads((shapes_bundle / "docs" / "shapes_pipeline.json").read_text())
    assert list(report["stage_seconds"]) == ["clip", "oracle", "teacher", "distill", "export"]
    assert set(report["oracle"]["test"]) == {"count", "colour", "shape", "spatial"}
    assert (shapes_bundle / "docs" / "shapes_pipeline.md").read_text().startswith("# The shapes pipeline")
    assert report["student"]["step"] == 4


def test_the_search_bench_counts_network_evaluations_honestly(shapes_bundle, tmp_path):
    from flowmap.bench_search import SearchBenchConfig, run_search_bench

    config = SearchBenchConfig(shapes_runs=str(shapes_bundle), tasks=("shapes",), prompts=3, seeds=2, teacher_steps=2,
                               budgets=(1, 2, 4), shapes_guidance_scale=2.0, fd_samples=24, bootstrap=20,
                               out=str(tmp_path / "search"))
    task = run_search_bench(config)["tasks"][0]
    rows = {(r["method"], r["budget"]): r for r in task["results"]}
    assert task["teacher_sample_nfe"] == 4  # 2 steps, each a conditional and an unconditional pass
    assert rows[("a", 1)]["nfe"] == 4 and rows[("b", 4)]["nfe"] == 16 and rows[("b", 4)]["verifier_calls"] == 4
    assert rows[("c", 4)]["nfe"] == 16 and rows[("c", 4)]["verifier_calls"] == 12  # 12 student jumps + 4
    assert rows[("d", 1 / 4)]["nfe"] == 1 and rows[("d", 4)]["verifier_calls"] == 16
    assert rows[("b", 2)]["overall_gain"]["mean"] == pytest.approx(
        rows[("b", 2)]["overall"]["mean"] - rows[("a", 1)]["overall"]["mean"])
    for row in task["results"]:
        assert 0 <= row["overall"]["lo"] <= row["overall"]["hi"] <= 1
    assert task["notes"]["fd"]["ratio"] > 0 and -1 <= task["noise_transfer"]["spearman"]["mean"] <= 1
    assert (tmp_path / "search.md").is_file() and (tmp_path / "search.png").is_file()
    # a task the run leaves out is kept from the earlier report, and said to be; one it runs is measured again
    import json

    earlier = json.loads((tmp_path / "search.json").read_text())
    earlier["tasks"].append({**task, "name": "digits", "units": -1})  # stands for a digits run from before
    (tmp_path / "search.json").write_text(json.dumps(earlier))
    both = run_search_bench(config)
    assert [t["name"] for t in both["tasks"]] == ["shapes", "digits"]
    assert both["tasks"][1]["units"] == -1 and both["tasks"][1]["kept_from_an_earlier_run"]
    assert "kept_from_an_earlier_run" not in both["tasks"][0]
    assert "Kept from an earlier run of this benchmark: this run measured shapes only." in (
        tmp_path / "search.md").read_text()
    with pytest.raises(ValueError, match="--tasks: no task cats"):
        run_search_bench(SearchBenchConfig(tasks=("cats",)))


def test_rank_correlation_and_intervals():
    from flowmap.bench_search import interval, spearman

    rng = np.random.default_rng(0)
    a = rng.normal(size=12)
    assert spearman(a, 3 * a + 1) == pytest.approx(1) and spearman(a, -a) == pytest.approx(-1)
    groups = np.repeat(np.arange(6), 2)
    draws = [rng.integers(0, 6, 6) for _ in range(200)]
    constant = interval(np.full(12, 0.25), groups, draws)
    assert constant == {"mean": 0.25, "lo": 0.25, "hi": 0.25}
    spread = interval(groups.astype(float), groups, draws)
    assert spread["lo"] < spread["mean"] == 2.5 < spread["hi"]


def test_the_shipped_shapes_bundle_searches_by_prompt():
    from pathlib import Path

    from export.bundle import read_bundle

    shipped = Path(__file__).resolve().parents[1] / "models" / "shapes"
    bundle = read_bundle(shipped)
    assert bundle.image_shape == (3, 32, 32) and bundle.text is not None and bundle.verifier is not None
    assert bundle.provenance["method"] == "freeflow"
    server = Server("--no-ui", bundle=shipped).wait_ready()
    try:
        found = httpx.post(server.url + "/v1/search", timeout=60, json={
            "prompt": "a small green circle above a large purple triangle", "n": 16, "seed": 0,
            "teacher_steps": 4}).json()
    finally:
        server.stop()
    scores = [c["score"] for c in found["candidates"]]
    assert scores == sorted(scores, reverse=True) and found["chosen_seeds"] == [found["candidates"][0]["seed"]]
    assert [s["stage"] for s in found["stages"]][-2:] == ["teacher", "verifier_final"]
