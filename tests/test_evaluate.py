"""Evaluation metrics against references and their limiting cases."""

import numpy as np
import torch
from scipy import linalg

from distill.evaluate import frechet_distance, precision_recall


def test_frechet_distance_matches_the_scipy_reference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 12)), rng.normal(size=(500, 12)) * 1.5 + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b) \
        - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b).real)
    assert abs(frechet_distance(a, b) - reference) < 1e-8 * reference
    assert abs(frechet_distance(a, a)) < 1e-9


def test_frechet_distance_with_constant_dimensions():
    # digits have always-black corner pixels: singular covariances must not produce NaN or warnings
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(300, 6))
    a[:, 0] = b[:, 0] = -1.0
    value = frechet_distance(a, b)
    assert np.isfinite(value) and 0 <= value < 0.5


def test_precision_recall_limits():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(400, 4)).astype(np.float32)
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    # a collapsed generator: precise but with no recall
    collapsed = np.repeat(real[:1], 400, axis=0) + 1e-3 * rng.normal(size=(400, 4)).astype(np.float32)
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.05
    far = real + 10.0
    assert precision_recall(real, far) == (0.0, 0.0)
    assert torch.is_tensor(torch.as_tensor(precision))
