"""The tiny shapes CLIP (a transformers CLIPModel): trained contrastively it prefers an image's own
caption, and saved with save_pretrained it is a text bundle's scorer like any user's CLIP."""

import numpy as np
import pytest
import torch

from distill.clip import (
    ClipConfig,
    clip_model,
    contrastive_loss,
    embed,
    save_clip,
    shapes_tokenizer,
    token_ids,
    train_clip,
)
from distill.shapes import COLOURS, SHAPES, batch


@pytest.fixture(scope="module")
def clip():
    return train_clip(ClipConfig(steps=300, batch_size=64), progress=False)


def swapped(caption: str, words) -> str:
    """The caption with its first word from `words` replaced by another of them."""
    first = next(word for word in caption.split() if word in words)
    return caption.replace(first, next(word for word in words if word != first), 1)


def score(model, images, ids):
    image, text = embed(model, images, ids)
    return model.logit_scale.exp() * (image * text).sum(-1)


def test_clip_prefers_an_images_own_caption(clip):
    model, tokenizer = clip
    images, scenes = batch(range(10**6, 10**6 + 300))  # scenes it never trained on
    images, captions = torch.from_numpy(images), [scene.caption for scene in scenes]
    with torch.no_grad():
        own = score(model, images, token_ids(tokenizer, captions))
        # colour is learnt first, shape (8 px patches of a 32 px image) later: after 300 steps of 64 pairs about
        # 0.97 and 0.65 (from run to run a few points either way); chance is 0.5
        for words, floor in ((list(COLOURS), 0.9), (list(SHAPES), 0.55)):  # 300 scenes: chance is 0.5 +- 0.03
            other = score(model, images, token_ids(tokenizer, [swapped(c, words) for c in captions]))
            assert (own > other).float().mean() > floor, words


def test_the_loss_pulls_matching_pairs_together():
    torch.manual_seed(0)
    tokenizer = shapes_tokenizer()
    model = clip_model(ClipConfig(width=32, layers=1, heads=2), tokenizer, 32)
    images, scenes = batch(range(8))
    images, ids = torch.from_numpy(images), token_ids(tokenizer, [scene.caption for scene in scenes])
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = contrastive_loss(model, images, ids).item()
    for _ in range(60):
        optimiser.zero_grad()
        contrastive_loss(model, images, ids).backward()
        optimiser.step()
    with torch.no_grad():
        image, text = embed(model, images, ids)
    assert contrastive_loss(model, images, ids).item() < 0.5 * first
    assert ((image @ text.T).argmax(1) == torch.arange(8)).float().mean() >= 0.75  # each image finds its caption


def test_the_saved_clip_is_a_text_bundle_scorer(clip, tmp_path):
    """`--verifier clip:FOLDER` reads it as it reads any CLIP: its score graph gives the trained scores."""
    from export.onnx_export import check_graph, export_onnx
    from export.scorer import load_clip_scorer

    model, tokenizer = clip
    scorer, loaded_tokenizer = load_clip_scorer(save_clip(model, tokenizer, tmp_path / "clip"))
    images, scenes = batch(range(5))
    captions = [scene.caption for scene in scenes]
    assert torch.equal(token_ids(loaded_tokenizer, captions), token_ids(tokenizer, captions))
    images, ids = torch.from_numpy(images), token_ids(tokenizer, captions)
    with torch.no_grad():
        assert torch.allclose(scorer(images, ids), score(model, images, ids), atol=1e-4)

    def make(rows, seed=0):
        images, scenes = batch(range(seed, seed + rows))
        return {"image": torch.from_numpy(images), "ids": token_ids(tokenizer, [scene.caption for scene in scenes])}

    path = export_onnx(scorer, make(2), tmp_path / "verifier.onnx")
    errors = check_graph(scorer, path, make, "shapes clip", batches=(1, 3))
    assert max(errors.values()) < 1e-4 and np.isfinite(list(errors.values())).all()


def test_every_caption_fits_the_shapes_tokenizer_whole():
    """No caption is cut: at 16 tokens the second object (and often the relation) of every two-object caption
    was, so neither CLIP, the teacher nor the search's verifier ever read it."""
    tokenizer = shapes_tokenizer()
    captions = [scene.caption for scene in batch(range(10_000, 12_000))[1]]
    longest = max(len(tokenizer(caption).input_ids) for caption in captions)
    assert any(" above " in caption or " left of " in caption for caption in captions)
    assert longest <= tokenizer.model_max_length, longest
