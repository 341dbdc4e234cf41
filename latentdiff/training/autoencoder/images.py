"""The autoencoder's training images: the encode stage's inputs and ADM center crop, a column split.

Every image (from ``--input`` folders/tars/list files, read as ``latentdiff-encode`` reads them, or the
photos bundled with scikit-image when no input is given) is ADM-center-cropped to ``resolution``.  The
right-most ``val_fraction`` of every image's columns is the **held-out** area: training crops are drawn
from the left part only, held-out crops (a fixed grid) from the right strip only, so no held-out pixel
is ever trained on.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from PIL import Image

from latentdiff.data.images import ImageSkip, adm_center_crop, load_and_preprocess
from latentdiff.data.inputs import list_inputs, read_item_bytes
from latentdiff.data.photos import PHOTO_NAMES, load_photo
from latentdiff.utils.errors import ConfigError

__all__ = ["ImageSet", "load_images"]


class ImageSet:
    """uint8 (N, R, R, 3) images, their names, and the train / held-out column split."""

    def __init__(self, images: np.ndarray, names: list[str], crop: int, val_fraction: float):
        self.images, self.names, self.crop = images, names, crop
        r = images.shape[2]
        self.val_width = math.ceil(r * val_fraction)
        self.train_width = r - self.val_width
        if self.val_width < crop or self.train_width < crop:
            raise ConfigError(
                f"--crop {crop} does not fit the split of {r}-pixel-wide images at --val-fraction "
                f"{val_fraction}: the held-out strip is {self.val_width} and the training part "
                f"{self.train_width} columns wide; raise --resolution (e.g. {math.ceil(crop / min(val_fraction, 1 - val_fraction))}) "
                "or lower --crop")

    def sha256(self) -> str:
        """Hash of the exact pixels trained and evaluated on (after the ADM crop)."""
        h = hashlib.sha256(f"{self.images.shape}".encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()

    @staticmethod
    def _to_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 127.5 - 1

    def train_crops(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """``n`` random crops from the training columns, in [-1, 1] (n, 3, crop, crop)."""
        c, r = self.crop, self.images.shape[1]
        k = rng.integers(0, len(self.images), n)
        ys = rng.integers(0, r - c + 1, n)
        xs = rng.integers(0, self.train_width - c + 1, n)
        return self._to_tensor(np.stack([self.images[i, y:y + c, x:x + c] for i, y, x in zip(k, ys, xs)]))

    def heldout_crops(self) -> torch.Tensor:
        """The fixed grid of held-out crops: non-overlapping rows down the right strip of every image."""
        c, r = self.crop, self.images.shape[1]
        x = self.images.shape[2] - self.val_width
        out = [img[y:y + c, x:x + c] for img in self.images for y in range(0, r - c + 1, c)]
        return self._to_tensor(np.stack(out))


def _from_inputs(inputs: list[str], resolution: int, crop: int) -> tuple[list[np.ndarray], list[str]]:
    listing = list_inputs(inputs)
    arrays, names, small, bad = [], [], [], []
    for item in listing.items:
        try:
            arrays.append(load_and_preprocess(read_item_bytes(item), resolution, min_size=crop))
            names.append(item.display())
        except ImageSkip as skip:
            (small if skip.reason == "too_small" else bad).append(f"{item.display()} ({skip})")
    if small:
        raise ConfigError(
            f"{len(small)} image(s) are smaller than --crop {crop} (e.g. {small[0]}); remove them from the "
            "input or lower --crop")
    if bad:
        print(f"train-autoencoder: skipped {len(bad)} unreadable image(s), e.g. {bad[0]}")
    return arrays, names


def load_images(inputs: list[str], resolution: int, crop: int, val_fraction: float,
                min_images: int) -> ImageSet:
    """All usable images, ADM-cropped to ``resolution`` (raises :class:`ConfigError` on bad input)."""
    if inputs:
        arrays, names = _from_inputs(inputs, resolution, crop)
    else:
        names = list(PHOTO_NAMES)
        arrays = [adm_center_crop(Image.fromarray(load_photo(n)), resolution) for n in names]
    if len(arrays) < min_images:
        where = ", ".join(inputs) if inputs else "the bundled photos"
        raise ConfigError(
            f"{where}: {len(arrays)} usable image(s), fewer than --min-images {min_images} needed for a "
            "held-out split that says anything; add images or lower --min-images")
    return ImageSet(np.stack(arrays), names, crop, val_fraction)
