"""Real photographs that ship with scikit-image (no download), for tests, benchmarks and the quickstart.

Only images bundled inside the scikit-image wheel are used; the ones ``skimage.data`` would fetch
from the network are excluded.  Grayscale photos are replicated to RGB.
"""
from __future__ import annotations

import functools

import numpy as np
import skimage.data
import torch

__all__ = ["PHOTO_NAMES", "load_photo", "random_crops"]

# Natural photographs / scans bundled with scikit-image (all load offline).
PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "stereo_motorcycle",
    "camera",
    "moon",
    "grass",
    "gravel",
    "brick",
    "coins",
)


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One bundled photo as an (H, W, 3) uint8 RGB array."""
    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; choose from {', '.join(PHOTO_NAMES)}")
    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle returns (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    if img.dtype != np.uint8:
        raise TypeError(f"photo {name!r} is {img.dtype}, expected uint8")
    return np.ascontiguousarray(img)


def random_crops(
    n: int,
    size: int,
    seed: int = 0,
    names: tuple[str, ...] = PHOTO_NAMES,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random ``size`` x ``size`` RGB crops in [-1, 1] (N, 3, size, size) and their photo index.

    Photos are visited round-robin (balanced classes), crop positions are uniform; fully
    deterministic given ``seed``.
    """
    rng = np.random.default_rng(seed)
    photos = [load_photo(nm) for nm in names]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        k = i % len(photos)
        img = photos[k]
        h, w = img.shape[:2]
        if h < size or w < size:
            raise ValueError(f"photo {names[k]!r} ({h}x{w}) is smaller than the crop size {size}")
        y = int(rng.integers(0, h - size + 1))
        x = int(rng.integers(0, w - size + 1))
        out[i] = img[y : y + size, x : x + size]
        labels[i] = k
    crops = torch.from_numpy(out).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1
    return crops, torch.from_numpy(labels)
