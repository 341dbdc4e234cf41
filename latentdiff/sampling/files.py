"""The sample stage's image files: lossless PNGs named by seed, with the seed and label in a text chunk."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from latentdiff.utils.io import atomic_open

__all__ = ["PNG_TEXT_KEY", "png_path", "valid_png", "save_png", "read_png"]

PNG_TEXT_KEY = "latentdiff"


def png_path(out: Path, seed: int) -> Path:
    """``OUT/images/<seed:06d>.png``."""
    return out / "images" / f"{seed:06d}.png"


def valid_png(p: Path, size: tuple[int, int] | None = None) -> bool:
    """A complete PNG (all chunk CRCs verified) of the expected (width, height)."""
    try:
        if p.stat().st_size == 0:
            return False
        with Image.open(p) as im:
            if im.format != "PNG" or (size is not None and im.size != size):
                return False
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - a missing or partial file is simply redone
        return False


def save_png(img_chw: torch.Tensor, path: Path, text: dict | None = None) -> None:
    """A uint8 (C, H, W) image as a lossless PNG, written atomically, with ``text`` as JSON in its tEXt chunk."""
    arr = img_chw.permute(1, 2, 0).numpy()
    info = None
    if text is not None:
        info = PngInfo()
        info.add_text(PNG_TEXT_KEY, json.dumps(text, sort_keys=True))
    with atomic_open(path) as f:
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(f, format="PNG", pnginfo=info)


def read_png(path: Path) -> tuple[np.ndarray, dict]:
    """(uint8 RGB HWC array, the tEXt record) of a PNG written by :func:`save_png`."""
    with Image.open(path) as im:
        text = json.loads(im.text.get(PNG_TEXT_KEY, "{}")) if hasattr(im, "text") else {}
        return np.asarray(im.convert("RGB")), text
