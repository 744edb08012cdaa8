"""The tiny shapes CLIP: trained contrastively it prefers an image's own caption, and it exports with
the scorer signature a text bundle's verifier follows (export/scorer.py)."""

import numpy as np
import pytest
import torch

from distill.clip import ClipConfig, ShapesClip, contrastive_loss, token_ids, train_clip
from distill.shapes import COLOURS, SHAPES, batch


@pytest.fixture(scope="module")
def clip():
    return train_clip(ClipConfig(steps=300), progress=False)


def swapped(caption: str, words) -> str:
    """The caption with its first word from `words` replaced by another of them."""
    first = next(word for word in caption.split() if word in words)
    return caption.replace(first, next(word for word in words if word != first), 1)


def test_clip_prefers_an_images_own_caption(clip):
    images, scenes = batch(range(10**6, 10**6 + 300))  # scenes it never trained on
    images, captions = torch.from_numpy(images), [scene.caption for scene in scenes]
    with torch.no_grad():
        own = clip(images, token_ids(captions))
        # after 300 steps colour is learnt first, shape at 32 px later (chance is 0.5 for both)
        for words, floor in ((list(COLOURS), 0.95), (list(SHAPES), 0.75)):
            other = clip(images, token_ids([swapped(c, words) for c in captions]))
            assert (own > other).float().mean() > floor, words


def test_the_loss_pulls_matching_pairs_together():
    torch.manual_seed(0)
    model = ShapesClip(ClipConfig(width=16, channels=8, layers=1))
    images, scenes = batch(range(8))
    images, ids = torch.from_numpy(images), token_ids([scene.caption for scene in scenes])
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = contrastive_loss(model, images, ids).item()
    for _ in range(30):
        optimiser.zero_grad()
        contrastive_loss(model, images, ids).backward()
        optimiser.step()
    with torch.no_grad():
        scores = model.logit_scale.exp() * model.embed_image(images) @ model.embed_text(ids).T
    assert contrastive_loss(model, images, ids).item() < 0.5 * first
    assert (scores.argmax(1) == torch.arange(8)).float().mean() >= 0.75  # each image finds its caption


def test_clip_exports_as_a_text_bundle_scorer(clip, tmp_path):
    from export.onnx_export import check_graph, export_onnx

    def make(rows, seed=0):
        images, scenes = batch(range(seed, seed + rows))
        return {"image": torch.from_numpy(images), "ids": token_ids([scene.caption for scene in scenes])}

    path = export_onnx(clip, make(2), tmp_path / "verifier.onnx")
    errors = check_graph(clip, path, make, "shapes clip", batches=(1, 3))
    assert max(errors.values()) < 1e-4 and np.isfinite(list(errors.values())).all()
