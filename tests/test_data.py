"""Data loading: the embedded digits, a user's .npz and image folders, and clear errors for bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import DataError, load_dataset, load_digits, load_image_folder, load_npz


def test_digits_are_embedded_and_scaled():
    data = load_digits()
    assert data.shape == (1, 8, 8) and len(data) == 1797 and data.num_classes == 10
    assert data.samples.min() == -1.0 and data.samples.max() == 1.0
    assert data.labels.dtype == torch.int64


def test_npz_round_trip_uint8_and_float(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (12, 3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", images=images, labels=np.arange(12) % 3, classes=np.array(["a", "b", "c"]))
    data = load_npz(tmp_path / "mine.npz")
    assert data.shape == (3, 4, 4) and data.classes == ["a", "b", "c"]
    assert torch.allclose(data.samples, torch.from_numpy(images / 127.5 - 1).float(), atol=1e-6)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((5, 8, 8), np.float32), np.zeros(5, np.int64), r"must be \[N, C, H, W\]"),
        (np.zeros((5, 8, 8, 8), np.float32), np.zeros(5, np.int64), "no channel axis of 1, 3 or 4"),
        (np.zeros((5, 1, 8, 8), np.float32), np.zeros(4, np.int64), "one label per sample"),
        (np.zeros((5, 1, 8, 8), np.float32), np.full(5, 0.5), "labels' must be integers"),
        (np.full((5, 1, 8, 8), 3.0, np.float32), np.zeros(5, np.int64), r"\[-1, 1\]"),
        (np.zeros((3, 1, 8, 8), np.float32), np.array([0, 1, 2]), r"labels must lie in \[0, 1\]"),
    ],
)
def test_bad_npz_is_refused_with_a_message(tmp_path, images, labels, message):
    extra = {"classes": np.array(["x", "y"])} if "lie in" in message else {}
    np.savez(tmp_path / "bad.npz", images=images, labels=labels, **extra)
    with pytest.raises(DataError, match=message):
        load_npz(tmp_path / "bad.npz")


def test_channels_last_images_are_transposed_with_a_warning(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (256, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", images=pixels, labels=np.zeros(256, np.int64))
    with pytest.warns(UserWarning, match=r"read as channels-last \[N, H, W, C\]"):
        data = load_npz(tmp_path / "nhwc.npz")
    assert data.shape == (1, 16, 16)
    assert np.allclose(data.samples[3, 0].numpy(), pixels[3, :, :, 0] / 127.5 - 1, atol=1e-6)


def test_npz_missing_arrays(tmp_path):
    np.savez(tmp_path / "x.npz", pictures=np.zeros((2, 1, 2, 2)))
    with pytest.raises(DataError, match="must hold arrays 'images' and 'labels'"):
        load_npz(tmp_path / "x.npz")


def test_image_folder(tmp_path):
    for name, value in (("cat", 0), ("dog", 255)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((6, 6), value, np.uint8)).save(tmp_path / name / f"{i}.png")
    data = load_image_folder(tmp_path)
    assert data.classes == ["cat", "dog"] and data.shape == (1, 6, 6) and len(data) == 6
    assert data.samples[data.labels == 0].max() == -1 and data.samples[data.labels == 1].min() == 1
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "dog" / "odd.png")
    with pytest.raises(DataError, match="one size"):
        load_image_folder(tmp_path)


def test_an_image_folder_with_colour_is_read_in_rgb_and_keeps_its_colours(tmp_path):
    for name in ("red", "blue"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name / "0grey.png")  # grey ones first
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 255
    Image.fromarray(colour).save(tmp_path / "red" / "1.png")
    data = load_dataset(str(tmp_path))
    assert data.shape == (3, 4, 4) and len(data) == 3
    red = data.samples[data.labels == data.classes.index("red")][1]
    assert red[0].min() == 1 and red[1].max() == -1 and red[2].max() == -1  # red, not a grey of it
    assert load_image_folder(tmp_path, channels=1).shape == (1, 4, 4)


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
