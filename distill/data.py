"""Datasets: scikit-learn's digits (embedded, no download), a 2-D toy, and a user's own images.

Everything becomes a `Dataset` of float32 samples in [-1, 1] with int64 labels in [0, num_classes).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class DataError(ValueError):
    """A user's data does not have the expected shape, range or labels."""


@dataclass
class Dataset:
    name: str
    samples: torch.Tensor  # [N, C, H, W] or [N, D], float32 in [-1, 1]
    labels: torch.Tensor  # [N] int64
    classes: list[str]
    source: str | None = None  # what `load_dataset` reads it from again: "digits", "toy", or a file's full path

    def __post_init__(self) -> None:
        validate(self.samples, self.labels, len(self.classes))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.samples.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.samples.shape[0]

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch (with replacement), drawn from `generator` so runs are reproducible."""
        index = torch.randint(0, len(self), (size,), generator=generator)
        return self.samples[index], self.labels[index]


def data_meta(data: Dataset) -> dict:
    """What checkpoints record of their data: its name, where it was read from, per-sample shape and class names."""
    return {"name": data.name, "source": data.source, "shape": list(data.shape), "classes": data.classes}


def validate(samples: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Raise DataError naming what is wrong with a dataset."""
    if samples.dim() not in (2, 4):
        raise DataError(f"samples must be NCHW images [N, C, H, W] or vectors [N, D], got shape "
                        f"{tuple(samples.shape)}")
    if labels.dim() != 1 or labels.shape[0] != samples.shape[0]:
        raise DataError(f"labels must be a vector with one label per sample ({samples.shape[0]}), got shape "
                        f"{tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise DataError(f"labels must be integers, got {labels.dtype}")
    if num_classes < 1:
        raise DataError("a dataset needs at least one class")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes - 1}], found {int(labels.min())}..{int(labels.max())}")
    if samples.numel():
        lo, hi = float(samples.min()), float(samples.max())
        if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
            raise DataError(f"samples must lie in [-1, 1], found {lo:.3g}..{hi:.3g} (scale images as x/127.5 - 1)")
    if not torch.isfinite(samples).all():
        raise DataError("samples contain NaN or infinite values")


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16), scaled to [-1, 1], shape [N, 1, 8, 8]."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return Dataset("digits", images, labels, [str(c) for c in range(10)])


def toy_gaussians(n: int = 4096, modes: int = 8, radius: float = 0.8, std: float = 0.05,
                  seed: int = 0) -> Dataset:
    """A 2-D mixture of `modes` Gaussians on a circle; the label is the mode (a conditional toy)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, modes, n)
    angles = 2 * math.pi * labels / modes
    centres = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    points = np.clip(centres + std * rng.standard_normal((n, 2)), -1, 1).astype(np.float32)
    return Dataset("toy", torch.from_numpy(points), torch.from_numpy(labels.astype(np.int64)),
                   [f"mode{i}" for i in range(modes)])


CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def channels_first(images: np.ndarray, where: str) -> np.ndarray:
    """[N, C, H, W] from NCHW or NHWC (the layout PIL and most image libraries give), or a DataError.

    NHWC is recognised only where it is unambiguous: a last axis of 1, 3 or 4 and a second axis that
    is not a channel count."""
    if images.ndim != 4:
        raise DataError(f"{where}: 'images' must be [N, C, H, W] (or [N, H, W, C]), got shape {images.shape}")
    if images.shape[1] in CHANNELS:
        return images
    if images.shape[-1] in CHANNELS:
        warnings.warn(f"{where}: 'images' has shape {images.shape}, read as channels-last [N, H, W, C] and "
                      f"transposed to {images.transpose(0, 3, 1, 2).shape}", stacklevel=3)
        return images.transpose(0, 3, 1, 2)
    raise DataError(f"{where}: 'images' of shape {images.shape} has no channel axis of 1, 3 or 4 (expected "
                    "[N, C, H, W] or [N, H, W, C])")


def load_npz(path: str | Path) -> Dataset:
    """An .npz with `images` [N, C, H, W] (or channels-last [N, H, W, C]; uint8 0..255 or float in [-1, 1])
    and `labels` [N] of integers.

    Optional `classes` (an array of names); otherwise classes are "0".."K-1" for K = max label + 1.
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as archive:
        keys = set(archive.files)
        if "images" not in keys or "labels" not in keys:
            raise DataError(f"{path} must hold arrays 'images' and 'labels', found {sorted(keys)}")
        images, labels = archive["images"], archive["labels"]
        classes = [str(c) for c in archive["classes"]] if "classes" in keys else None
    images = channels_first(images, str(path))
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be integers, got {labels.dtype}")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 127.5 - 1.0
    if classes is None:
        classes = [str(c) for c in range(int(labels.max()) + 1 if labels.size else 1)]
    return Dataset(path.stem, torch.from_numpy(images.astype(np.float32)),
                   torch.from_numpy(labels.astype(np.int64)), classes)


# PIL modes of one channel (a palette image, "P", may hold colour)
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def load_image_folder(path: str | Path, channels: int | None = None) -> Dataset:
    """A folder with one sub-folder of images per class (`root/<class>/*.png`); all images one size. `channels`
    1 (grey) or 3 (RGB); None reads RGB if any image has colour, else grey."""
    from PIL import Image

    root = Path(path)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<image>.png)")
    files = [(index, file) for index, class_dir in enumerate(class_dirs) for file in sorted(class_dir.iterdir())
             if file.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if channels is None:  # a header read each: PIL decodes the pixels only when asked for them
        colour = False
        for _, file in files:
            with Image.open(file) as image:
                colour = image.mode not in GREY_MODES
            if colour:
                break
        channels = 3 if colour else 1
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"channels must be 1 or 3, got {channels}")
    arrays, labels = [], []
    for index, file in files:
        with Image.open(file) as image:
            pixels = np.asarray(image.convert(mode), dtype=np.float32)
        arrays.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
        labels.append(index)
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise DataError(f"all images must have one size, found {sorted(sizes)}")
    images = np.stack(arrays) / 127.5 - 1.0
    return Dataset(root.name, torch.from_numpy(images.astype(np.float32)),
                   torch.tensor(labels, dtype=torch.int64), [d.name for d in class_dirs])


def load_dataset(spec: str) -> Dataset:
    """'digits', 'toy', a path to an .npz, or a folder of class folders."""
    if spec in ("digits", "toy"):
        return replace(load_digits() if spec == "digits" else toy_gaussians(), source=spec)
    path = Path(spec)
    if path.suffix == ".npz" and path.is_file():
        return replace(load_npz(path), source=str(path.resolve()))
    if path.is_dir():
        return replace(load_image_folder(path), source=str(path.resolve()))
    raise DataError(f"unknown dataset {spec!r}: use 'digits', 'toy', an .npz file or a folder of class folders")
