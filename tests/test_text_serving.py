"""Text bundles served end to end: a diffusers pipeline folder -> FreeFlow steps -> export -> a prompt
over HTTP -> an image, for SD3, FLUX and SANA; the served images against torch; the prompt cache; a text bundle on
the torch backend and through the GPU bench's served part."""

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from serving import Server, decoded, in_process, serve_raw

pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["sd3", "flux", "sana"])
def test_a_text_bundle_serves_a_prompt(tiny_text_bundles, family):
    bundle, _ = tiny_text_bundles[family]
    server = Server("--no-ui", bundle=bundle).wait_ready()
    try:
        card = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]
        assert card["conditioning"] == "text" and card["search"] is (family == "sd3")
        reply = httpx.post(server.url + "/v1/images/generations", timeout=60, json={
            "prompt": "a red circle left of a blue square", "n": 2, "seed": 3, "output_format": "jpeg"})
        assert reply.status_code == 200, reply.text
        images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in reply.json()["data"]]
        assert [(im.format, im.size) for im in images] == [("JPEG", (32, 32))] * 2
        assert reply.json()["data"][0]["revised_prompt"] == "a red circle left of a blue square"
    finally:
        server.stop()


def torch_images(bundle_run, pipeline, prompts, seeds, guidance_scale):
    """What the bundle should serve, computed in torch: the student's one jump from the server's noise
    recipe, on the conditions of the pipeline's own tokenizers and text encoders, decoded by its VAE."""
    from distill.models import load_student
    from distill.text import encode_prompts, load_conditioner
    from export.decoder import DecoderGraph, load_vae
    from server.noise import noise_for

    student, _ = load_student(bundle_run)
    conditions = encode_prompts(*load_conditioner(pipeline), prompts)
    x = torch.from_numpy(noise_for(seeds, student.config.shape))
    rows = len(seeds)
    with torch.no_grad():
        latents = student.jump(x, torch.ones(rows), torch.zeros(rows), conditions, torch.full((rows,), guidance_scale))
        return DecoderGraph(load_vae(pipeline / "vae"))(latents).numpy()


def test_served_images_match_torch_and_batches_and_the_cache(tiny_text_bundles, tiny_text_pipelines):
    bundle, run = tiny_text_bundles["sd3"]
    prompts = ["a small green triangle above a yellow star", "a photo of a cat", "a small green triangle above a "
               "yellow star"]
    server = Server("--no-ui", bundle=bundle).wait_ready()
    try:
        body = {"prompts": prompts, "seeds": [5, 6, 5], "guidance": 2.0, "format": "raw"}
        together = httpx.post(server.url + "/v1/generate", json=body, timeout=60)
        assert together.status_code == 200, together.text
        arrays = np.array(together.json()["arrays"], np.float32)
        expected = torch_images(run, tiny_text_pipelines["sd3"], prompts, [5, 6, 5], 2.0).clip(-1, 1)
        assert np.abs(arrays - expected).max() < 1e-3  # tokenization, text encoder, student, decoder
        alone = [httpx.post(server.url + "/v1/generate", timeout=60, json={
            "prompts": [prompt], "seeds": [seed], "guidance": 2.0}).json()["images"][0]
            for prompt, seed in zip(prompts, [5, 6, 5], strict=True)]
        pngs = httpx.post(server.url + "/v1/generate", json={**body, "format": "png"}, timeout=60).json()["images"]
        assert pngs == alone and pngs[0] == pngs[2]  # identical bytes whatever the batch
        metrics = httpx.get(server.url + "/metrics", timeout=30).text.splitlines()
        count = lambda prefix: float(next(line for line in metrics if line.startswith(prefix)).split()[-1])
        # two prompts through the encoder once each; every later lookup (3 alone, 2 in the png batch) a hit
        assert count('flowmap_prompt_cache_lookups_total{result="miss"}') == 2
        assert count('flowmap_prompt_cache_lookups_total{result="hit"}') == 5
    finally:
        server.stop()


def test_text_bundle_errors_and_truncation(tiny_text_bundles):
    bundle, _ = tiny_text_bundles["flux"]
    server = Server("--no-ui", bundle=bundle).wait_ready()
    try:
        post = lambda path, body: httpx.post(server.url + path, json=body, timeout=60)
        wrong = post("/v1/generate", {"labels": [1]})
        assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "prompts"
        both = post("/v1/generate", {"prompts": ["a cat"], "labels": [1]})  # labels are not silently dropped
        assert both.status_code == 422 and "not labels" in both.json()["error"]["message"]
        empty = post("/v1/generate", {"prompts": ["a cat", ""]})  # as /v1/images/generations refuses ""
        assert empty.status_code == 422 and empty.json()["error"]["param"] == "prompts[1]"
        negative = post("/v1/images/generations", {"prompt": "a cat", "negative_prompt": "blurry"})
        assert negative.status_code == 422 and negative.json()["error"]["param"] == "negative_prompt"
        assert "only the teacher" in negative.json()["error"]["message"]  # the student cannot take one
        no_cfg = post("/v1/images/generations", {"prompt": "a cat", "negative_prompt": "blurry",
                                                 "model": "flux-teacher"})
        assert no_cfg.status_code == 422 and "without classifier-free guidance" in no_cfg.json()["error"]["message"]
        no_verifier = post("/v1/search", {"prompt": "a cat"})
        assert no_verifier.status_code == 422 and "no verifier" in no_verifier.json()["error"]["message"]
        assert post("/v1/images/generations", {"prompt": "x" * 4001}).status_code == 422
        long = post("/v1/images/generations", {"prompt": "a red circle " * 40, "seed": 1})
        short = post("/v1/images/generations", {"prompt": "a red circle", "seed": 1})
        assert long.headers.get("x-flowmap-prompt-truncated") == "true"
        assert "x-flowmap-prompt-truncated" not in short.headers
    finally:
        server.stop()


def test_the_text_encoder_holds_a_row_per_distinct_prompt_a_negative_one_included(tiny_text_bundles):
    """The teacher's negatives come from one negative prompt (or the bundle's empty prompt), so a request of as many
    prompts as the queue holds is served; with a negative prompt it needs one row more, and a prompt repeated (an
    OpenAI-style request for n images of one prompt) one row in all."""
    bundle, _ = tiny_text_bundles["sd3"]

    async def scenario():
        async with in_process(bundle=bundle, max_queue_size=4, max_batch_size=4) as (client, _):
            body = {"prompts": ["a red circle", "a blue square", "a cat", "a dog"], "model": "sd3-teacher",
                    "steps": 2}
            full = await client.post("/v1/generate", json=body)
            assert full.status_code == 200 and len(full.json()["images"]) == 4, full.text
            negative = await client.post("/v1/generate", json={**body, "negative_prompt": "blurry"})
            assert negative.status_code == 413, negative.text
            assert "5 rows exceed the whole text_encoder queue of 4" in negative.json()["error"]["message"]
            fewer = await client.post("/v1/generate", json={**body, "prompts": body["prompts"][:3],
                                                            "negative_prompt": "blurry"})
            assert fewer.status_code == 200, fewer.text
            same = await client.post("/v1/images/generations", json={"prompt": "a cat", "n": 4, "steps": 2,
                                                                     "model": "sd3-teacher", "negative_prompt": "x"})
            assert same.status_code == 200 and len(same.json()["data"]) == 4, same.text

    asyncio.run(scenario())


def test_the_demo_shows_a_prompt_box_for_a_text_bundle(tiny_text_bundles):
    from gradio_client import Client

    bundle, _ = tiny_text_bundles["sana"]
    server = Server(bundle=bundle).wait_ready()
    try:
        client = Client(server.url + "/ui/", verbose=False)
        gallery, info = client.predict("a blue triangle right of a red square", 2, 4, "1", 1, api_name="/generate")
        assert len(gallery) == 2 and "prompt `a blue triangle right of a red square`" in info
        assert np.asarray(Image.open(gallery[0]["image"])).shape[:2] == (128, 128)  # 32 px shown 4x
    finally:
        server.stop()


def test_tensorrt_profiles_have_inputs_for_every_graph_of_a_text_bundle(tiny_text_bundles):
    """The CPU half of `flowmap export --tensorrt`: every graph it builds an engine for (text encoder and
    decoder included) runs on the random inputs its parity check feeds, in onnxruntime."""
    import onnxruntime as ort

    from export.bundle import read_bundle
    from export.tensorrt import engine_sources, random_feeds

    bundle = read_bundle(tiny_text_bundles["sd3"][0])
    graphs = engine_sources(bundle)
    assert {graph.path.name for graph in graphs} >= {"text_encoder.onnx", "decoder.onnx", "teacher_w2.onnx"}
    for graph in graphs:
        session = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
        out = session.run(None, random_feeds(session.get_inputs(), 2, bundle.num_classes))[0]
        assert out.shape[0] == 2 and np.isfinite(out).all(), graph.path.name


def test_search_ranks_candidates_by_the_clip_score(tiny_text_bundles):
    """Best-of-N on a text bundle: the CLIP scorer's graph scores each candidate against the prompt, as
    CLIP does in torch on the same images, and the search keeps the best."""
    from transformers import AutoTokenizer

    from export.scorer import load_clip_scorer

    bundle, _ = tiny_text_bundles["sd3"]
    prompt = "a red circle left of a blue square"
    server = Server("--no-ui", bundle=bundle).wait_ready()
    try:
        found = httpx.post(server.url + "/v1/search", timeout=60, json={
            "prompt": prompt, "n": 6, "seed": 10, "top_k": 2, "teacher_steps": 2}).json()
        seeds = [c["seed"] for c in found["candidates"]]
        raw = httpx.post(server.url + "/v1/generate", timeout=60, json={
            "prompts": [prompt] * 6, "seeds": seeds, "format": "raw"}).json()
    finally:
        server.stop()
    assert found["prompt"] == prompt and len(found["images"]) == 2
    scores = [c["score"] for c in found["candidates"]]
    assert found["chosen_seeds"] == [seeds[i] for i in np.argsort(scores)[::-1][:2]]
    scorer, _ = load_clip_scorer(bundle.parent / "clip")
    ids = AutoTokenizer.from_pretrained(bundle.parent / "clip")([prompt] * 6, padding="max_length", truncation=True,
                                                                 max_length=12, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = scorer(torch.tensor(np.array(raw["arrays"], np.float32)), ids).numpy()
    assert np.abs(np.array(scores) - expected).max() < 1e-3


def test_the_teacher_takes_a_negative_prompt(tiny_text_bundles, tiny_text_pipelines):
    """The teacher's guidance against a negative prompt, as torch computes it; no negative prompt is the
    empty prompt's condition, computed at export."""
    from distill.flow import guided_velocity
    from distill.models import load_teacher
    from distill.text import encode_prompts, load_conditioner
    from export.decoder import DecoderGraph, load_vae
    from server.noise import noise_for

    bundle, _ = tiny_text_bundles["sd3"]
    body = {"prompts": ["a photo of a cat"], "seeds": [7], "model": "sd3-teacher", "steps": 1}
    server = Server("--no-ui", bundle=bundle).wait_ready()
    try:
        post = lambda extra: httpx.post(server.url + "/v1/generate", json={**body, **extra}, timeout=60).json()
        plain, empty = post({}), post({"negative_prompt": ""})
        negative = post({"negative_prompt": "two dogs running on the grass", "format": "raw"})
    finally:
        server.stop()
    assert plain["images"] == empty["images"]  # the default negative is the empty prompt
    pipeline = tiny_text_pipelines["sd3"]
    teacher = load_teacher(f"diffusers:{pipeline}")
    condition, against = encode_prompts(*load_conditioner(pipeline), ["a photo of a cat",
                                                                        "two dogs running on the grass"]).split(1)
    noise = torch.from_numpy(noise_for([7], teacher.config.shape))
    with torch.no_grad():
        latent = noise - guided_velocity(teacher.velocity, noise, torch.ones(1), condition, 2.0, against)
        expected = DecoderGraph(load_vae(pipeline / "vae"))(latent).numpy().clip(-1, 1)
    assert np.abs(np.array(negative["arrays"], np.float32) - expected).max() < 1e-3


def test_the_prompt_cache_is_bounded_by_bytes_as_well_as_by_prompts():
    """Real text encoders make 5-8 MB conditions, so the cache evicts the least recently used prompts once the
    conditions it holds pass --prompt-cache-mb, and never keeps one larger than the whole budget."""
    from export.bundle import TextConditioning
    from server.prompts import PromptEncoder

    condition = np.zeros((4, 8), np.float32)  # 128 bytes
    cache = PromptEncoder(TextConditioning(tokenizers=(), encoder=None, shape=(4, 8)), cache_size=100,
                          cache_bytes=3 * condition.nbytes)
    for prompt in ("a", "b", "c"):
        cache.remember(prompt, condition)
    assert cache.lookup("a") is not None  # "a" is now the most recent: "b" goes first
    cache.remember("d", condition)
    cache.remember("d", condition)  # the same prompt again is counted once
    assert [p for p in "abcd" if cache.lookup(p) is not None] == ["a", "c", "d"]
    assert cache.held_bytes == 3 * condition.nbytes
    cache.remember("huge", np.zeros((40, 8), np.float32))
    assert cache.lookup("huge") is None and cache.held_bytes == 3 * condition.nbytes


def test_rows_of_one_prompt_share_one_condition_and_mixed_prompts_keep_theirs():
    """A search's N candidates (or n images of one prompt) hold one condition, not N copies of it."""
    from server.stages import rows_of

    conditions = {"a red circle": np.full((3, 4), 1.0, np.float32), "a blue square": np.full((3, 4), 2.0, np.float32)}
    same = rows_of(conditions, ["a red circle"] * 64)
    assert same.shape == (64, 3, 4) and np.shares_memory(same[0], same[63]) and (same == 1.0).all()
    assert same.nbytes // 64 == conditions["a red circle"].nbytes and np.concatenate([same[:2]]).flags.writeable
    mixed = rows_of(conditions, ["a blue square", "a red circle", "a blue square"])
    assert mixed[:, 0, 0].tolist() == [2.0, 1.0, 2.0]


def test_scoring_clips_the_candidates_in_place_and_encoding_lets_the_floats_go():
    """Memory at real size: the verifier's clip reuses the candidates' array where the request owns it (a copy only
    of a read-only one, left as it was), and once encoded the float images are not kept for the response."""
    import asyncio

    from server.encoding import Encoder, OutputFormat
    from server.stages import EncodeImages, Score, State

    async def call(engine, feeds, ticket):
        return np.zeros((len(feeds["image"]), 10), np.float32)

    for writeable in (True, False):
        images = np.linspace(-2, 2, 2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
        images.flags.writeable = writeable
        state = State(seeds=[1, 2], labels=np.array([0, 1]))
        state.x = images
        asyncio.run(Score(2, "n").run(state, call, None))
        assert (state.x is images) == writeable and state.x.min() == -1 and state.x.max() == 1
        assert images.min() == (-1 if writeable else -2)
    encoder = Encoder(1)
    try:
        asyncio.run(EncodeImages(encoder, OutputFormat("png"), (3, 4, 4), 2, "n").run(state, call, None))
    finally:
        encoder.close()
    assert len(state.encoded) == 2 and state.x is None


def test_a_requests_conditions_do_not_keep_the_text_encoders_batch_alive():
    """The text encoder answers with rows of its whole padded batch (64 FLUX rows are 537 MB): a request's
    conditions are copies, so the batch goes once the stage is done."""
    import asyncio

    from export.bundle import TextConditioning
    from server.prompts import PromptEncoder
    from server.stages import EncodePrompts, State

    batch = np.arange(8 * 3 * 4, dtype=np.float32).reshape(8, 3, 4)

    async def call(engine, feeds, ticket):
        return batch[:1]  # the one new prompt's row, a view of the batch

    encoder = PromptEncoder(TextConditioning(tokenizers=(), encoder=None, shape=(3, 4)), cache_size=0)
    state = State(seeds=[1, 2, 3], labels=None, prompts=["a red circle"] * 3)
    asyncio.run(EncodePrompts(1, "n", encoder).run(state, call, None))
    assert np.array_equal(state.labels[2], batch[0]) and not np.shares_memory(state.labels, batch)


def test_a_search_merges_its_best_row_by_row_and_picks_its_prompts_conditions_as_views():
    """Between chunks a search keeps its top_k, best first with ties to the lower index, each row copied once from
    the kept set or the new chunk; its prompt's condition is picked for the kept candidates as a view of one row."""
    from server.stages import Best, take_rows

    kept = Best(np.array([3, 1]), np.array([5.0, 4.0]), np.array([[30.0], [10.0]]), np.array([[-3.0], [-1.0]]))
    chunk = Best(np.arange(4, 8), np.array([5.0, 1.0, 6.0, 4.0]), np.array([[40.0], [50.0], [60.0], [70.0]]),
                 np.array([[-4.0], [-5.0], [-6.0], [-7.0]]))
    best = kept.merged(chunk, 4)
    assert best.index.tolist() == [6, 3, 4, 1] and best.scores.tolist() == [6.0, 5.0, 5.0, 4.0]
    assert best.x[:, 0].tolist() == [60.0, 30.0, 40.0, 10.0] and best.noise[:, 0].tolist() == [-6.0, -3.0, -4.0, -1.0]
    condition = np.arange(12, dtype=np.float32).reshape(3, 4)
    picked = take_rows(np.broadcast_to(condition, (150, 3, 4)), np.array([6, 3]))
    assert picked.shape == (2, 3, 4) and np.shares_memory(picked, condition) and (picked[1] == condition).all()
    labels = np.array([7, 8, 9, 10])
    assert take_rows(labels, np.array([2, 0])).tolist() == [9, 7]


def test_the_prompt_cache_keeps_its_own_copy_of_each_condition():
    """A condition comes as one row of the text encoder's padded batch: a cached view would keep it all alive."""
    from export.bundle import TextConditioning
    from server.prompts import PromptEncoder

    cache = PromptEncoder(TextConditioning(tokenizers=(), encoder=None, shape=(2, 3)), cache_size=4)
    batch = np.arange(48, dtype=np.float32).reshape(8, 2, 3)
    cache.remember("a red circle", batch[1])
    kept = cache.lookup("a red circle")
    assert np.array_equal(kept, batch[1]) and not np.shares_memory(kept, batch)


# the text bundles take a minute to build: the tests that serve them live in this file, so one worker builds them and
# none waits on its lock while another does (tests/conftest.py's built_once)
def test_a_text_bundle_with_a_decoder_on_the_torch_backend(sana_program_bundle):
    """The torch backend serves a text bundle's text encoder, negative-prompt teacher and VAE decoder programs too
    (SANA: its mask and DC-AE), as onnxruntime does."""
    from export.bundle import read_bundle
    from server.engines import _graphs

    out = sana_program_bundle
    assert set(_graphs(read_bundle(out))) == {"student@1", "student@2", "teacher", "text_encoder", "decoder"}
    body = {"prompts": ["a red circle"], "seeds": [3], "steps": 2, "model": "sana-teacher",
            "negative_prompt": "a blue square"}
    np.testing.assert_allclose(decoded(serve_raw(out, body, "--backend", "torch")), decoded(serve_raw(out, body)),
                               atol=1e-3)


def test_the_gpu_bench_serves_a_text_bundle(tmp_path, sana_program_bundle):
    """`flowmap bench gpu --parts served --served-bundle` on a text bundle: prompts go through its text encoder."""
    from flowmap.bench_gpu import GpuBenchConfig, run_gpu_bench

    config = GpuBenchConfig(device="cpu", scale="tiny", batches=(1, 2), repeats=1, parts=("served",),
                            served_clients=2, served_seconds=1.0, served_bundle=str(sana_program_bundle),
                            out=str(tmp_path / "gpu"))
    served = run_gpu_bench(config)["served"]
    assert set(map(str, served["statuses"])) == {"200"} and served["images_per_s"] > 0
    assert {"text_encoder", "student", "decoder"} <= set(served["stage_ms_per_request"])  # prompts went through it
    assert served["bundle"].startswith("sana") and served["limit_images_per_s"] > 0
