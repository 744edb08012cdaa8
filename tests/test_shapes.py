"""The shapes data set: deterministic scenes, captions that say what is drawn, the compositional split,
the word tokenizer, and an oracle that reads the scenes back."""

import numpy as np
import pytest

from distill.shapes import (
    COLOURS,
    HELD_OUT,
    Scene,
    ShapesConfig,
    batch,
    held_out,
    sample,
    vocabulary,
    word_tokenizer,
)


def test_scenes_follow_from_their_seed():
    image, scene = sample(5)
    again, scene_again = sample(5)
    assert np.array_equal(image, again) and scene == scene_again
    assert image.shape == (3, 32, 32) and image.dtype == np.float32 and -1 <= image.min() < image.max() <= 1
    other, _ = sample(6)
    assert not np.array_equal(image, other)
    assert not np.array_equal(sample(5, split="test")[0], image)  # the splits draw from their own streams


def test_held_out_pairs_appear_only_in_test_scenes():
    config = ShapesConfig()
    _, train = batch(range(400))
    _, test = batch(range(400), split="test")
    assert not any(held_out(scene, config) for scene in train)
    assert all(held_out(scene, config) for scene in test)
    pairs = {(thing.colour, thing.shape) for scene in test for thing in scene.things}
    assert set(HELD_OUT) <= pairs


def centre_of(image: np.ndarray, colour: str) -> np.ndarray:
    """(x, y) centroid of the pixels closest to `colour` (independent of how scenes are laid out)."""
    pixels = (image.transpose(1, 2, 0) + 1) * 127.5
    near = np.linalg.norm(pixels - np.array(COLOURS[colour]), axis=-1) < 40
    ys, xs = np.nonzero(near)
    return np.array([xs.mean(), ys.mean()])


def test_the_caption_says_where_each_object_is():
    images, scenes = batch(range(300))
    checked = 0
    for image, scene in zip(images, scenes, strict=True):
        if scene.relation is None or scene.things[0].colour == scene.things[1].colour:
            continue
        first, second = (centre_of(image, thing.colour) for thing in scene.things)
        axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[scene.relation]
        assert sign * (first[axis] - second[axis]) > 4, scene.caption  # pixels, at 32 px
        checked += 1
    assert checked > 100


def test_the_word_tokenizer_knows_every_caption_word():
    tokenizer = word_tokenizer()
    _, scenes = batch(range(200))
    for scene in scenes:
        ids = tokenizer.encode(scene.caption).ids
        assert len(ids) == 16 and 2 not in ids and ids[len(scene.caption.split())] == 1  # no <unk>; <eos> after
    assert set(vocabulary()) >= {"left", "of", "above", "purple", "triangle"}


@pytest.fixture(scope="module")
def oracle():
    from distill.oracle import OracleConfig, train_oracle

    return train_oracle(OracleConfig(steps=300), progress=False)


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_oracle_reads_real_renders(oracle, split):
    from distill.oracle import accuracies, judge

    images, scenes = batch(range(10**6, 10**6 + 400), split=split)  # seeds it never trained on
    scores = accuracies(judge(oracle, images, scenes))
    assert min(scores.values()) >= 0.95, scores
    # and it is not fooled: an image judged against another scene's caption mostly fails
    wrong = accuracies(judge(oracle, images, scenes[1:] + scenes[:1]))
    assert wrong["colour"] < 0.5 and wrong["spatial"] < 0.5, wrong
    # the same objects in the same reading order, but side by side instead of stacked (or back): wrong
    turned = {"left of": "above", "above": "left of", "right of": "below", "below": "right of"}
    flipped = [Scene(scene.things, turned[scene.relation]) if scene.relation else scene for scene in scenes]
    assert accuracies(judge(oracle, images, flipped))["spatial"] < 0.1
