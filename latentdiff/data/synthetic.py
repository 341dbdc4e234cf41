"""Small offline fixtures for tests, benchmarks and the quickstart: a tiny VAE and image folders.

Nothing here downloads anything: the VAE is built from a config (random weights) and the images are
crops of the photographs bundled with scikit-image (:mod:`latentdiff.data.photos`).
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.data.photos import PHOTO_NAMES, load_photo

__all__ = ["TINY_VAE_CONFIG", "make_tiny_vae", "write_image_folder", "write_image_tar"]

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
)


def make_tiny_vae(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialized ``AutoencoderKL`` (0.66M params, downsampling 2) to ``path``."""
    from diffusers import AutoencoderKL  # heavy (seconds to import); only the VAE fixture needs it

    cfg = {**TINY_VAE_CONFIG, **overrides}
    g = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vae = AutoencoderKL(**cfg)
    finally:
        torch.random.set_rng_state(g)
    path = Path(path)
    vae.save_pretrained(str(path), safe_serialization=True)
    return path


def _crop(rng: np.random.Generator, photo: np.ndarray, h: int, w: int) -> np.ndarray:
    ph, pw = photo.shape[:2]
    h, w = min(h, ph), min(w, pw)
    y = int(rng.integers(0, ph - h + 1))
    x = int(rng.integers(0, pw - w + 1))
    return photo[y : y + h, x : x + w]


def write_image_folder(
    root: str | Path,
    classes: int = 3,
    per_class: int = 6,
    size_range: tuple[int, int] = (40, 96),
    seed: int = 0,
    formats: tuple[str, ...] = ("png", "jpg"),
) -> list[Path]:
    """ImageNet-style ``root/<photo name>/<i>.<fmt>`` crops of random size; returns the written paths."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    paths = []
    for c in range(classes):
        name = PHOTO_NAMES[c % len(PHOTO_NAMES)]
        photo = load_photo(name)
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
            fmt = formats[i % len(formats)]
            p = root / name / f"{i:04d}.{fmt}"
            img = Image.fromarray(_crop(rng, photo, h, w))
            if fmt == "jpg":
                img.save(p, quality=95)
            else:
                img.save(p)
            paths.append(p)
    return paths


def write_image_tar(path: str | Path, n: int = 6, size: int = 64, seed: int = 0, with_cls: bool = True) -> Path:
    """A webdataset-style tar of ``n`` PNG crops (``%06d.png`` + ``%06d.cls`` = i % 3)."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            photo = load_photo(PHOTO_NAMES[i % len(PHOTO_NAMES)])
            buf = io.BytesIO()
            Image.fromarray(_crop(rng, photo, size, size)).save(buf, format="PNG")
            members = [(f"{i:06d}.png", buf.getvalue())]
            if with_cls:
                members.append((f"{i:06d}.cls", str(i % 3).encode()))
            for name, data in members:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path
