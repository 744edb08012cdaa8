"""Noise from seeds, exactly as the README's API section states it, so that a seed gives the same image whatever the
batch it is served in and whatever the backend. To regenerate a seed's noise anywhere:

    numpy.random.default_rng(seed).standard_normal((C, H, W), dtype=numpy.float32)
"""

from __future__ import annotations

import secrets

import numpy as np

MAX_SEED = 2**63 - 1


def noise_for(seeds: list[int], shape: tuple[int, ...]) -> np.ndarray:
    """[len(seeds), *shape] float32 standard normal noise, one generator per seed.

    `Generator(PCG64(seed))` is exactly what `default_rng(seed)` builds, without its argument checks
    (a third of the cost on the serving path); a test pins the two to the same numbers.
    """
    out = np.empty((len(seeds), *shape), np.float32)
    for row, seed in enumerate(seeds):
        np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32, out=out[row])
    return out


def random_seeds(count: int) -> list[int]:
    """Fresh seeds for requests that bring none (they are returned, so the images can be reproduced)."""
    return [secrets.randbelow(MAX_SEED + 1) for _ in range(count)]
