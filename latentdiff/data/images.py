"""Image decoding, RGB conversion and the ADM center crop.

Every failure on a single file becomes :class:`ImageSkip` with a short machine-readable ``reason``
(see :data:`SKIP_REASONS`) and a human-readable detail, so the encoder can skip the file, record it in
``skipped.jsonl`` and keep going (bad input never stops a run).

Preprocessing (:func:`adm_center_crop`) follows ADM (guided-diffusion ``center_crop_arr``), the
convention of the ImageNet FID references: while the short side is at least twice the target, halve
the image with a BOX filter; then resize with BICUBIC so the short side equals the target (this also
*upscales* images smaller than the target); then take the center square (offsets rounded down).
Images whose short side is below ``min_size`` are skipped instead (``too_small``).

RGB conversion (:func:`to_rgb`): images with transparency (RGBA, LA, PA, P/L/RGB with a transparency
key) are composited onto white; CMYK/YCbCr/1/L/P convert through PIL; 16-bit and 32-bit integer
grayscale (I;16*, I) are scaled by 1/257 (65535 -> 255) and float (F) images are taken as [0, 1] if
their maximum is <= 1, else as [0, 255].  No EXIF rotation is applied (as ADM/EDM2).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_FILE_BYTES",
    "ImageSkip",
    "decode_image",
    "to_rgb",
    "adm_center_crop",
    "load_and_preprocess",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)

SKIP_REASONS = {
    "empty_file": "the file has 0 bytes",
    "unreadable": "the file could not be read (permissions, missing, a directory, I/O error)",
    "not_a_regular_file": "not a regular file (a device such as a link to /dev/zero, a FIFO, a socket): never read",
    "too_large": "the file (or tar member) is larger than --max-file-bytes: never read",
    "not_an_image": "PIL cannot identify the file as an image",
    "corrupt": "the image data is corrupt or ends early (PIL cannot decode it)",
    "truncated": "a tar member is shorter than its header says",
    "decompression_bomb": "the image has more pixels than --max-pixels (PIL decompression-bomb guard)",
    "unsupported_mode": "the pixel mode cannot be converted to RGB",
    "too_small": "the short side is below --min-size",
    "nonfinite_latent": "the VAE produced NaN/Inf for this image",
    "corrupt_container": "a tar input is truncated or corrupt; its later members are lost",
    "error": "an unexpected error while decoding",
}

# larger inputs are skipped unread: 256 MiB is ~10x the largest ImageNet / LAION JPEG and bounds each
# decode worker's memory
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024

# PIL's own default (about 89.5 Mpx, a 0.25 GB RGB image); above it PIL warns, above 2x it raises.
DEFAULT_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)


class ImageSkip(Exception):
    """One input cannot be used; ``reason`` is a key of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _has_image_magic(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> fully loaded PIL image, or :class:`ImageSkip`."""
    if len(data) == 0:
        raise ImageSkip("empty_file", "0 bytes")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that: both are skips here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
                raise ImageSkip("decompression_bomb", str(exn)[:200]) from None
            except Image.UnidentifiedImageError:
                if _has_image_magic(data):
                    raise ImageSkip("corrupt", "image signature present but the header cannot be parsed") from None
                raise ImageSkip("not_an_image", "PIL cannot identify the image format") from None
            except Exception as exn:  # noqa: BLE001 - recognized format, broken header (e.g. truncated JPEG)
                raise ImageSkip("corrupt", f"{type(exn).__name__}: {exn}"[:200]) from None
            w, h = img.size
            if w * h > max_pixels:
                raise ImageSkip("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
            if w <= 0 or h <= 0:
                raise ImageSkip("corrupt", f"image size {w}x{h}")
            try:
                img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
                raise ImageSkip("decompression_bomb", str(exn)[:200]) from None
            except MemoryError:
                raise ImageSkip("decompression_bomb", f"out of memory decoding a {w}x{h} image") from None
            except Exception as exn:  # noqa: BLE001 - OSError "image file is truncated", SyntaxError, ...
                raise ImageSkip("corrupt", f"{type(exn).__name__}: {exn}"[:200]) from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    return img


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see the module docstring for the rules)."""
    mode = img.mode
    try:
        if mode == "RGB" and "transparency" not in img.info:
            return img
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info):
            return _composite_on_white(img)
        if mode.startswith("I;16") or mode == "I":
            a = np.asarray(img, dtype=np.float64)
            a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
            return Image.fromarray(a).convert("RGB")
        if mode == "F":
            a = np.asarray(img, dtype=np.float64)
            if not np.isfinite(a).all():
                raise ImageSkip("unsupported_mode", "float image with NaN/Inf")
            a = a * 255.0 if a.max(initial=0.0) <= 1.0 else a
            return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")
        return img.convert("RGB")
    except ImageSkip:
        raise
    except Exception as exn:  # noqa: BLE001
        raise ImageSkip("unsupported_mode", f"mode {mode}: {type(exn).__name__}: {exn}"[:200]) from None


def adm_center_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM center crop of an RGB PIL image -> (resolution, resolution, 3) uint8."""
    # 1) repeated 2x BOX downsampling while the short side stays >= 2x the target
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    # 2) one BICUBIC resize bringing the short side to the target (up- or down-scaling)
    factor = resolution / min(img.size)
    new_size = (round(img.size[0] * factor), round(img.size[1] * factor))
    img = img.resize(new_size, resample=Image.BICUBIC)
    # 3) center square, offsets rounded down
    arr = np.asarray(img)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    out = arr[top : top + resolution, left : left + resolution]
    if out.shape != (resolution, resolution, 3):
        raise ImageSkip("error", f"crop produced shape {out.shape}")
    return np.array(out, dtype=np.uint8, copy=True)  # writable, contiguous


def load_and_preprocess(
    data: bytes, resolution: int, *, min_size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Bytes -> ADM-cropped (R, R, 3) uint8 RGB, or :class:`ImageSkip`."""
    img = decode_image(data, max_pixels=max_pixels)
    w, h = img.size
    if min(w, h) < min_size:
        raise ImageSkip("too_small", f"{w}x{h}, short side {min(w, h)} < --min-size {min_size}")
    rgb = to_rgb(img)
    try:
        return adm_center_crop(rgb, resolution)
    except ImageSkip:
        raise
    except Exception as exn:  # noqa: BLE001
        raise ImageSkip("error", f"resize/crop failed: {type(exn).__name__}: {exn}"[:200]) from None
