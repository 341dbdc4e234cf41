"""Fréchet Inception Distance with numbers comparable to EDM / ADM.

Features
--------
Pool features (2048-d) of torch-fidelity's TF-compatible Inception-v3
(``FeatureExtractorInceptionV3``, layer ``"2048"``).  The network takes **uint8** RGB NCHW images
of any size and resizes them itself to 299x299 with its TF1.x-compatible bilinear resize, then maps
``[0, 255] -> [-1, 1]``; generated samples and reference images therefore go through exactly the same
path (reference images are first center-cropped and resized to the model resolution by
``tools/fid_reference.py``, as the training data was).

Weights are never downloaded silently.  They are looked up, in order, at

1. ``weights=`` / ``--inception-weights PATH``,
2. the ``LATENTDIFF_INCEPTION_WEIGHTS`` environment variable,
3. torch-fidelity's standard location: ``$TORCH_HOME/hub/checkpoints/<file name of the URL>``
   (what ``torch.hub.load_state_dict_from_url`` would have written),

and a missing file raises :class:`~latentdiff.errors.FIDError` naming the URL and the cache path.
``download_inception_weights()`` / ``--download-weights`` fetch them on explicit request only.

Statistics
----------
Every rank extracts features for a disjoint part of the images; the float64 feature sum, the float64
sum of outer products and the count are all-reduced, then ``mu = S/n`` and
``sigma = (Q - n mu mu^T) / (n - 1)`` (unbiased, as ``np.cov``).

Distance
--------
``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` in float64 with ``scipy.linalg.sqrtm``.
The root is checked (finite, imaginary part of the diagonal below 1e-3, relative residual
``||R R - S1 S2||_F / ||S1 S2||_F``); when a check fails the standard fallback adds ``eps * I`` to both
covariances (with a warning) and a second failure raises.

Files
-----
Reference statistics: ``.npz`` with float64 ``mu`` (D,) and ``sigma`` (D, D) - the keys EDM's
``fid.py ref`` and ADM's ``VIRTUAL_*.npz`` use, so their files load here and ours load there - plus a
provenance JSON beside it (``ref.npz`` -> ``ref.provenance.json``: source, count, resolution,
preprocessing, feature extractor, weights hash, sha256 of the ``.npz``).

Samples: a directory of PNGs (searched recursively; files whose name starts with ``grid`` are
skipped; the seed is the trailing integer of the file name, e.g. ``000123.png``) or an ADM-format
``samples.npz`` (``arr_0``: uint8 NHWC; seeds from an ``npz`` key ``seeds`` or from ``sampling.json``).
A ``sampling.json`` beside the samples is passed through to ``fid.json``.

CLI::

    torchrun --nproc_per_node 8 -m latentdiff.fid --ref ref.npz SAMPLES [SAMPLES ...] \\
        [--seeds 0-49999 [--seeds 50000-99999 ...]] [--inception-weights PATH] [--out fid.json]

Each (samples, seed range) pair is one FID; ``fid.json`` lists them all with min and mean.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import struct
import sys
import warnings
import zipfile
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from latentdiff import dist as ldist
from latentdiff.errors import FIDError
from latentdiff.checksums import sha256_file

__all__ = [
    "FEATURE_DIM",
    "MIN_SAMPLES",
    "RECOMMENDED_SAMPLES",
    "WEIGHTS_ENV",
    "OFFICIAL_WEIGHTS_SHA256",
    "inception_weights_url",
    "default_weights_path",
    "resolve_weights_path",
    "download_inception_weights",
    "InceptionFeatures",
    "load_feature_extractor",
    "ImageSource",
    "ArrayImages",
    "PngFolder",
    "NpzImages",
    "SubsetImages",
    "open_samples",
    "read_npz_array",
    "FeatureAccumulator",
    "compute_statistics",
    "frechet_distance",
    "Reference",
    "provenance_path",
    "save_reference",
    "load_reference",
    "parse_seeds",
    "format_seeds",
    "sha256_file",
    "evaluate",
    "main",
]

FEATURE_DIM = 2048
MIN_SAMPLES = 2048
RECOMMENDED_SAMPLES = 50_000
WEIGHTS_ENV = "LATENTDIFF_INCEPTION_WEIGHTS"
# sha256 of torch-fidelity's converted TF Inception weights (its first 8 hex digits are the
# hash suffix in the published file name, the torch.hub convention).
OFFICIAL_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
EXTRACTOR_NAME = "torch-fidelity FeatureExtractorInceptionV3 ('inception-v3-compat', layer '2048')"
RESIZE_DESCRIPTION = (
    "torch-fidelity interpolate_bilinear_2d_like_tensorflow1x to 299x299 (align_corners=False), "
    "then (x - 128) / 128, inside the extractor"
)
SQRTM_IMAG_ATOL = 1e-3
SQRTM_RESIDUAL_RTOL = 1e-5
REPORT_FORMAT = "latentdiff-fid/1"
REFERENCE_FORMAT = "latentdiff-fid-reference/1"

_SAMPLING_FIELDS = {
    "export_hash": ("export_hash", "export_sha256", "model_hash"),
    "solver": ("solver", "method", "sampler"),
    "nfe": ("nfe_used", "nfe_actual", "evaluations", "nfe"),
    "nfe_requested": ("nfe_requested",),
    "cfg": ("cfg", "cfg_scale", "guidance_scale", "guidance"),
    "guidance_interval": ("guidance_interval", "cfg_interval"),
    "ema": ("ema_profile", "ema", "ema_std", "ema_halflife"),
    "vae_decode_precision": ("vae_decode_precision", "decode_precision", "decode_dtype"),
    "sigma_max": ("sigma_max",),
}


# --------------------------------------------------------------------------------------------
# small helpers


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """``"0-49999"``, ``"0-9,20,30-39"`` (inclusive ranges) or a list of ints -> sorted unique seeds."""
    if isinstance(spec, (int, np.integer)):
        return [int(spec)]
    if not isinstance(spec, str):
        seeds = [int(s) for s in spec]
    else:
        seeds = []
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if m is None:
                raise FIDError(
                    f"cannot parse seed range {part!r} in {spec!r}: use inclusive ranges and single seeds "
                    "separated by commas, e.g. --seeds 0-49999 or --seeds 0-9,20,30-39"
                )
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise FIDError(f"seed range {part!r} in {spec!r} is empty (end < start)")
            seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise FIDError(f"seed specification {spec!r} selects no seeds")
    if any(s < 0 for s in seeds):
        raise FIDError(f"seeds must be non-negative, got {spec!r}")
    return sorted(set(seeds))


def format_seeds(seeds: Iterable[int] | None) -> str | None:
    """Compact inclusive-range string: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    if seeds is None:
        return None
    s = sorted(set(int(x) for x in seeds))
    if not s:
        return ""
    parts = []
    lo = prev = s[0]
    for x in s[1:]:
        if x == prev + 1:
            prev = x
            continue
        parts.append(f"{lo}-{prev}" if prev > lo else f"{lo}")
        lo = prev = x
    parts.append(f"{lo}-{prev}" if prev > lo else f"{lo}")
    return ",".join(parts)


# --------------------------------------------------------------------------------------------
# Inception weights and the feature extractor


def inception_weights_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def default_weights_path() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (torch-fidelity's loader) caches the weights."""
    url = inception_weights_url()
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _missing_weights_message(looked: list[str]) -> str:
    url = inception_weights_url()
    dest = default_weights_path()
    return (
        "Inception weights for FID not found (looked at: " + "; ".join(looked) + "). "
        "latentdiff never downloads them silently. Fix: pass --inception-weights PATH "
        f"(Python: load_feature_extractor(weights=PATH)) or set {WEIGHTS_ENV}=PATH, or pre-download "
        f"torch-fidelity's file once where there is network: `python -m latentdiff.fid --download-weights` "
        f"or `curl -L --create-dirs -o {dest} {url}` (the cache directory follows TORCH_HOME)."
    )


def resolve_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """The weights file to use (explicit path, then ``$LATENTDIFF_INCEPTION_WEIGHTS``, then the cache)."""
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise FIDError(
                f"--inception-weights {p} does not exist or is not a file. "
                + _missing_weights_message([f"{p} (--inception-weights)"])
            )
        return p
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FIDError(f"{WEIGHTS_ENV}={env} does not exist or is not a file. " + _missing_weights_message([f"{p} ({WEIGHTS_ENV})"]))
        return p
    p = default_weights_path()
    if p.is_file():
        return p
    raise FIDError(_missing_weights_message([f"{p} (torch-fidelity cache)"]))


def download_inception_weights(dest: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Explicitly download torch-fidelity's Inception weights (the only place latentdiff downloads)."""
    url = inception_weights_url()
    dest = Path(dest) if dest is not None else default_weights_path()
    if dest.is_file() and sha256_file(dest) == OFFICIAL_WEIGHTS_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=progress)
    except Exception as e:  # URLError, HTTPError, OSError ...
        tmp.unlink(missing_ok=True)
        raise FIDError(f"downloading the Inception weights from {url} to {dest} failed: {e}") from e
    digest = sha256_file(tmp)
    if digest != OFFICIAL_WEIGHTS_SHA256:
        tmp.unlink(missing_ok=True)
        raise FIDError(f"downloaded {url} but its sha256 is {digest}, expected {OFFICIAL_WEIGHTS_SHA256}")
    os.replace(tmp, dest)
    return dest


class InceptionFeatures:
    """Callable ``uint8 (B, 3, H, W) -> float32 (B, 2048)`` around torch-fidelity's Inception-v3."""

    feature_dim = FEATURE_DIM

    def __init__(self, net: torch.nn.Module, device: torch.device, weights_path: Path, weights_sha256: str):
        self.net = net
        self.device = device
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256

    @property
    def official(self) -> bool:
        return self.weights_sha256 == OFFICIAL_WEIGHTS_SHA256

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(images) or images.dtype != torch.uint8:
            raise FIDError(
                "the Inception extractor takes uint8 images in [0, 255]; got "
                f"{images.dtype if torch.is_tensor(images) else type(images).__name__} "
                "(convert with (x * 127.5 + 128).clamp(0, 255).to(torch.uint8) for x in [-1, 1])"
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise FIDError(f"the Inception extractor takes (B, 3, H, W) RGB images, got shape {tuple(images.shape)}")
        (feats,) = self.net(images.to(self.device))
        return feats

    def describe(self) -> dict:
        import torch_fidelity

        return {
            "name": EXTRACTOR_NAME,
            "torch_fidelity_version": getattr(torch_fidelity, "__version__", None),
            "feature_dim": FEATURE_DIM,
            "input": "uint8 RGB NCHW",
            "resize": RESIZE_DESCRIPTION,
            "weights_path": str(self.weights_path),
            "weights_sha256": self.weights_sha256,
            "official_weights": self.official,
        }


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(path)
    return _HASH_CACHE[key]


def load_feature_extractor(
    weights: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    *,
    download: bool = False,
) -> InceptionFeatures:
    """torch-fidelity's TF-compatible Inception-v3 (2048-d pool features) on ``device``.

    ``weights``: a state-dict file; ``None`` looks at ``$LATENTDIFF_INCEPTION_WEIGHTS`` and then at
    torch-fidelity's cache path.  Nothing is downloaded unless ``download=True``.  The file is first
    loaded with ``weights_only=True`` (refusing pickled code) and then handed to torch-fidelity through
    ``feature_extractor_weights_path``.
    """
    if download and weights is None and not os.environ.get(WEIGHTS_ENV):
        path = download_inception_weights()
    else:
        path = resolve_weights_path(weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FIDError(
            f"cannot read Inception weights {path} with torch.load(weights_only=True): {e}. "
            "Expected torch-fidelity's state dict (weights-inception-2015-12-05-6726825d.pth) or a state dict "
            "saved from FeatureExtractorInceptionV3; pass the right file with --inception-weights"
        ) from e
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise FIDError(f"Inception weights {path} do not hold a state dict of tensors; pass torch-fidelity's file with --inception-weights")
    del state
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except RuntimeError as e:  # state-dict key/shape mismatch
        raise FIDError(
            f"Inception weights {path} do not fit torch-fidelity's FeatureExtractorInceptionV3: {str(e)[:500]}. "
            "Use torch-fidelity's weights-inception-2015-12-05-6726825d.pth (not torchvision's or pytorch-fid's)"
        ) from e
    dev = torch.device(device) if device is not None else ldist.device()
    net = net.to(dev).eval()
    extractor = InceptionFeatures(net, dev, path, _cached_sha256(path))
    if not extractor.official:
        warnings.warn(
            f"Inception weights {path} (sha256 {extractor.weights_sha256[:12]}...) are not torch-fidelity's "
            f"published file (sha256 {OFFICIAL_WEIGHTS_SHA256[:12]}...): distances are not comparable with "
            "published FID numbers",
            RuntimeWarning,
            stacklevel=2,
        )
    return extractor


# --------------------------------------------------------------------------------------------
# image sources (random access, so that ranks can take disjoint parts)


class ImageSource(Sequence):
    """Random-access uint8 RGB images.  ``batch(indices)`` -> uint8 (B, 3, H, W) tensor."""

    seeds: np.ndarray | None = None
    description: str = ""

    @abstractmethod
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray:
        return self.batch([i])[0].permute(1, 2, 0).numpy()

    @abstractmethod
    def batch(self, indices: Sequence[int]) -> torch.Tensor: ...

    def name(self, i: int) -> str:
        return f"{self.description}[{i}]"

    @property
    def resolution(self) -> tuple[int, int]:
        img = self.batch([0])
        return int(img.shape[2]), int(img.shape[3])


def _as_uint8_nchw(x, where: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if not torch.is_tensor(t):
        raise FIDError(f"{where}: expected a uint8 array or tensor of images, got {type(x).__name__}")
    if t.dtype != torch.uint8:
        raise FIDError(
            f"{where}: images must be uint8 in [0, 255], got {t.dtype} (FID is defined on quantized images; "
            "convert with (x * 127.5 + 128).clip(0, 255).astype(uint8) for x in [-1, 1])"
        )
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise FIDError(f"{where}: expected (N, H, W, 3) or (N, 3, H, W) images, got shape {tuple(t.shape)}")
    if t.shape[1] == 3:
        return t.contiguous()
    if t.shape[-1] == 3:
        return t.permute(0, 3, 1, 2).contiguous()
    raise FIDError(f"{where}: expected 3 RGB channels in (N, H, W, 3) or (N, 3, H, W), got shape {tuple(t.shape)}")


class ArrayImages(ImageSource):
    """An in-memory (or memory-mapped) uint8 array: NHWC (ADM) or NCHW."""

    def __init__(self, array, description: str = "array", seeds: Sequence[int] | None = None):
        if torch.is_tensor(array):
            array = array.detach().cpu()
        shape = tuple(array.shape)
        if len(shape) != 4 or (shape[1] != 3 and shape[-1] != 3):
            raise FIDError(f"{description}: expected (N, H, W, 3) or (N, 3, H, W) images, got shape {shape}")
        dtype = array.dtype
        if dtype not in (np.uint8, torch.uint8):
            raise FIDError(
                f"{description}: images must be uint8 in [0, 255], got {dtype} (convert with "
                "(x * 127.5 + 128).clip(0, 255) to uint8 for x in [-1, 1])"
            )
        self.array = array
        self.nchw = shape[1] == 3
        self.description = description
        self.seeds = None if seeds is None else np.asarray(seeds, dtype=np.int64)
        if self.seeds is not None and len(self.seeds) != shape[0]:
            raise FIDError(f"{description}: {len(self.seeds)} seeds for {shape[0]} images")

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def resolution(self) -> tuple[int, int]:
        s = self.array.shape
        return (int(s[2]), int(s[3])) if self.nchw else (int(s[1]), int(s[2]))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64)
        if torch.is_tensor(self.array):
            part = self.array[torch.from_numpy(idx)]
        else:
            part = self.array[idx]
        return _as_uint8_nchw(part, self.description)


def read_npz_array(path: str | os.PathLike, key: str = "arr_0") -> np.ndarray:
    """Array ``key`` of an ``.npz``; memory-mapped when stored uncompressed (``np.savez``, ADM's format)."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise FIDError(f"{path} is not a readable .npz file: {e}") from e
    with zf:
        names = zf.namelist()
        member = f"{key}.npy"
        if member not in names:
            keys = sorted(n[:-4] for n in names if n.endswith(".npy"))
            raise FIDError(
                f"{path} has no array {key!r} (arrays: {', '.join(keys) or 'none'}); ADM-format samples.npz "
                "stores the uint8 NHWC images under arr_0"
            )
        info = zf.getinfo(member)
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] == b"PK\x03\x04":
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if reader is not None:
                    shape, fortran, dtype = reader(f)
                    if not dtype.hasobject:
                        return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=f.tell(), order="F" if fortran else "C")
    with np.load(path, allow_pickle=False) as data:
        return data[key]


class NpzImages(ArrayImages):
    """ADM-format ``samples.npz``: ``arr_0`` uint8 (N, H, W, 3)."""

    def __init__(self, path: str | os.PathLike, seeds: Sequence[int] | None = None):
        path = Path(path)
        arr = read_npz_array(path, "arr_0")
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise FIDError(
                f"{path}: arr_0 has shape {arr.shape} and dtype {arr.dtype}; the ADM sample format is uint8 "
                "(N, H, W, 3)"
            )
        if seeds is None:
            with zipfile.ZipFile(path) as zf:
                has_seeds = "seeds.npy" in zf.namelist()
            if has_seeds:
                seeds = read_npz_array(path, "seeds")
        super().__init__(arr, description=str(path), seeds=seeds)
        self.path = path


_SEED_RE = re.compile(r"(\d+)$")
_LOSSY = {".jpg", ".jpeg", ".webp"}


class PngFolder(ImageSource):
    """PNG files under a directory (recursive, sorted), skipping ``grid*.png``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() == ".png" and not p.name.lower().startswith("grid"))
        if not files:
            lossy = [p for p in self.root.rglob("*") if p.suffix.lower() in _LOSSY]
            hint = (
                f" (found {len(lossy)} lossy JPEG/WebP files: FID samples must be saved losslessly as PNG or npz)"
                if lossy
                else ""
            )
            raise FIDError(f"no PNG images under {self.root}{hint}")
        self.files = files
        self.description = str(self.root)
        stems = [_SEED_RE.search(p.stem) for p in files]
        seeds = [int(m.group(1)) for m in stems if m is not None]
        if len(seeds) == len(files) and len(set(seeds)) == len(seeds):
            self.seeds = np.asarray(seeds, dtype=np.int64)
        else:
            self.seeds = None
        self._size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return str(self.files[i])

    def _read(self, i: int) -> np.ndarray:
        from PIL import Image

        p = self.files[i]
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:
            raise FIDError(f"cannot decode {p}: {e}") from e
        return arr

    @property
    def resolution(self) -> tuple[int, int]:
        if self._size is None:
            from PIL import Image

            with Image.open(self.files[0]) as im:
                w, h = im.size
            self._size = (h, w)
        return self._size

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        h, w = self.resolution
        out = np.empty((len(indices), h, w, 3), dtype=np.uint8)
        for j, i in enumerate(indices):
            arr = self._read(i)
            if arr.shape[:2] != (h, w):
                raise FIDError(
                    f"{self.files[i]} is {arr.shape[1]}x{arr.shape[0]} but {self.files[0]} is {w}x{h}: all samples "
                    "must have one resolution (move grids and other images out of the samples directory)"
                )
            out[j] = arr
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class SubsetImages(ImageSource):
    def __init__(self, base: ImageSource, indices: Sequence[int], description: str | None = None):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.description = description or base.description
        self.seeds = None if base.seeds is None else base.seeds[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, i: int) -> str:
        return self.base.name(int(self.indices[i]))

    @property
    def resolution(self) -> tuple[int, int]:
        return self.base.resolution

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return self.base.batch(self.indices[np.asarray(indices, dtype=np.int64)].tolist())


def _seeds_from_sampling(sampling: Mapping | None) -> list[int] | None:
    if not sampling or "seeds" not in sampling:
        return None
    s = sampling["seeds"]
    try:
        if isinstance(s, str):
            return parse_seeds(s)
        if isinstance(s, Mapping) and "start" in s and ("stop" in s or "end" in s):
            stop = int(s["stop"]) if "stop" in s else int(s["end"]) + 1
            return list(range(int(s["start"]), stop))
        if isinstance(s, Sequence):
            return [int(x) for x in s]
    except (FIDError, TypeError, ValueError):
        return None
    return None


def open_samples(path: str | os.PathLike, input_format: str = "auto") -> tuple[ImageSource, dict | None, Path | None]:
    """(images, sampling.json content or None, its path) for a samples directory or ``.npz`` file.

    ``input_format``: ``auto`` (a directory holding ``samples.npz`` uses it, otherwise its PNGs),
    ``png`` or ``npz``.
    """
    path = Path(path)
    if input_format not in ("auto", "png", "npz"):
        raise FIDError(f"--input-format must be auto, png or npz, got {input_format!r}")
    if not path.exists():
        raise FIDError(f"samples {path} do not exist (give a directory of PNGs or an ADM samples.npz)")
    if path.is_file():
        if path.suffix != ".npz":
            raise FIDError(f"samples {path}: a file input must be an ADM-format .npz (arr_0 uint8 NHWC)")
        if input_format == "png":
            raise FIDError(f"--input-format png but {path} is an .npz file")
        npz, folder = path, None
        sampling_path = path.parent / "sampling.json"
    else:
        npz = path / "samples.npz" if (path / "samples.npz").is_file() and input_format in ("auto", "npz") else None
        if input_format == "npz" and npz is None:
            raise FIDError(f"--input-format npz but {path} holds no samples.npz")
        folder = path if npz is None else None
        sampling_path = path / "sampling.json"
    sampling = None
    if sampling_path.is_file():
        try:
            sampling = json.loads(sampling_path.read_text())
        except json.JSONDecodeError as e:
            raise FIDError(f"{sampling_path} is not valid JSON: {e}") from e
        if not isinstance(sampling, dict):
            raise FIDError(f"{sampling_path} must hold a JSON object")
    else:
        sampling_path = None
    if npz is not None:
        src: ImageSource = NpzImages(npz)
        if src.seeds is None:
            seeds = _seeds_from_sampling(sampling)
            if seeds is not None:
                if len(seeds) == len(src):
                    src.seeds = np.asarray(seeds, dtype=np.int64)
                else:
                    warnings.warn(
                        f"{sampling_path} lists {len(seeds)} seeds but {npz} holds {len(src)} images: seeds unknown",
                        RuntimeWarning,
                        stacklevel=2,
                    )
    else:
        src = PngFolder(folder)
    return src, sampling, sampling_path


def _select_seeds(src: ImageSource, seeds: list[int], where: str) -> SubsetImages:
    if src.seeds is None:
        raise FIDError(
            f"--seeds given but the seeds of the images in {where} are unknown: name PNGs by seed "
            "(e.g. 000123.png) or keep the sampler's sampling.json (with its 'seeds') next to samples.npz"
        )
    pos = {int(s): i for i, s in enumerate(src.seeds)}
    missing = [s for s in seeds if s not in pos]
    if missing:
        raise FIDError(
            f"{where} lacks {len(missing)} of the {len(seeds)} requested seeds (first missing: "
            f"{format_seeds(missing[:20])}); sample them first (latentdiff-sample resumes) or change --seeds"
        )
    return SubsetImages(src, [pos[s] for s in seeds], description=f"{where} seeds {format_seeds(seeds)}")


# --------------------------------------------------------------------------------------------
# statistics


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cpu") if dist.get_backend() == "gloo" else ldist.device()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a CPU tensor (moved to the backend's device when needed)."""
    import torch.distributed as dist

    if not _distributed():
        return t
    dev = _collective_device()
    buf = t.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def _broadcast_floats(values: list[float], src: int = 0) -> list[float]:
    import torch.distributed as dist

    if not _distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.broadcast(t, src=src)
    return t.cpu().tolist()


class FeatureAccumulator:
    """Float64 ``n``, feature sum and sum of outer products; mergeable across ranks (all-reduce)."""

    def __init__(self, dim: int = FEATURE_DIM):
        self.dim = int(dim)
        self.n = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        f = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise FIDError(f"features must have shape (B, {self.dim}), got {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise FIDError("the feature extractor returned non-finite values (NaN/Inf); check its weights and inputs")
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer.addmm_(f.T, f)

    def all_reduce(self) -> None:
        """Sum ``n``, the feature sum and the outer products over ranks (every rank must call this)."""
        if not _distributed():
            return
        n = torch.tensor([float(self.n)], dtype=torch.float64)
        _all_reduce_(n)
        _all_reduce_(self.sum)
        _all_reduce_(self.outer)
        self.n = int(round(n.item()))

    def statistics(self) -> tuple[np.ndarray, np.ndarray, int]:
        if self.n < 2:
            raise FIDError(f"need at least 2 images for a covariance, got {self.n}")
        n = self.n
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        sigma = 0.5 * (sigma + sigma.T)
        return mu.numpy().copy(), sigma.numpy().copy(), n


def _check_count(n: int, allow_small: bool, min_samples: int, where: str) -> None:
    if n < 2:
        raise FIDError(f"{where}: {n} image(s); FID needs at least 2 (and {min_samples} without --allow-small)")
    if n < min_samples and not allow_small:
        raise FIDError(
            f"{where}: only {n} images; FID with fewer than {min_samples} samples is unreliable (the 2048-d "
            f"covariance is rank-deficient) and is refused. Generate more ({RECOMMENDED_SAMPLES} is standard) or "
            "pass --allow-small (Python: allow_small=True) for a smoke test"
        )


def _feature_dim(extractor) -> int:
    return int(getattr(extractor, "feature_dim", FEATURE_DIM))


def compute_statistics(
    images,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
    *,
    allow_small: bool = False,
    min_samples: int = MIN_SAMPLES,
    shard: bool | None = None,
    progress: bool = True,
    desc: str = "FID features",
) -> tuple[np.ndarray, np.ndarray, int]:
    """Feature mean and covariance (float64) over all ranks -> ``(mu, sigma, n)``.

    ``images``: an :class:`ImageSource`, a uint8 array/tensor (N, H, W, 3) or (N, 3, H, W), or an
    iterable of such batches.  Sources and arrays are the *global* set and, under a process group,
    each rank takes the disjoint part ``rank::world_size`` (``shard=False``: the input already is this
    rank's part).  A plain iterable is this rank's part (``shard=True``: every rank iterates the same
    batches and keeps batch ``i`` when ``i % world_size == rank``).  Every rank must call this
    function (it all-reduces); every rank gets the same result.
    """
    if batch_size < 1:
        raise FIDError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = (ldist.get_rank(), ldist.get_world_size()) if _distributed() else (0, 1)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = ArrayImages(images)
    acc = FeatureAccumulator(_feature_dim(extractor))
    error: BaseException | None = None
    show = progress and rank == 0
    from tqdm.auto import tqdm

    if isinstance(images, ImageSource):
        shard = True if shard is None else shard
        if shard:
            _check_count(len(images), allow_small, min_samples, images.description or "images")
        local = list(range(rank, len(images), world)) if shard else list(range(len(images)))
        bar = tqdm(total=len(local), unit="img", desc=desc, disable=not show, dynamic_ncols=True)
        try:
            for start in range(0, len(local), batch_size):
                idx = local[start : start + batch_size]
                x = images.batch(idx)
                if x.shape[0]:  # a source may drop undecodable images
                    acc.update(extractor(x))
                bar.update(len(idx))
        except Exception as e:  # re-raised after the other ranks were told (no hang in all_reduce)
            error = e
        finally:
            bar.close()
    else:
        bar = tqdm(unit="img", desc=desc, disable=not show, dynamic_ncols=True)
        try:
            for i, b in enumerate(images):
                if shard and i % world != rank:
                    continue
                x = _as_uint8_nchw(b, f"batch {i}")
                for start in range(0, x.shape[0], batch_size):
                    acc.update(extractor(x[start : start + batch_size]))
                bar.update(x.shape[0])
        except Exception as e:
            error = e
        finally:
            bar.close()
    if _distributed():
        flag = torch.tensor([1.0 if error is not None else 0.0], dtype=torch.float64)
        _all_reduce_(flag)
        if flag.item() > 0 and error is None:
            raise FIDError(f"feature extraction failed on {int(flag.item())} other rank(s); see their error messages")
    if error is not None:
        if isinstance(error, FIDError):
            raise error
        raise FIDError(f"feature extraction failed on rank {rank}: {type(error).__name__}: {error}") from error
    acc.all_reduce()
    _check_count(acc.n, allow_small, min_samples, getattr(images, "description", "") or "images")
    return acc.statistics()


# --------------------------------------------------------------------------------------------
# Fréchet distance


def _checked_sqrtm(a: np.ndarray, imag_atol: float, residual_rtol: float) -> tuple[np.ndarray | None, dict]:
    import scipy.linalg

    info: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            root = scipy.linalg.sqrtm(a)
        except (np.linalg.LinAlgError, ValueError) as e:
            info["problem"] = f"scipy.linalg.sqrtm failed: {e}"
            return None, info
    info["scipy_warnings"] = sorted({str(w.message) for w in caught})
    if isinstance(root, tuple):  # very old scipy with disp=False semantics
        root = root[0]
    if not np.all(np.isfinite(root)):
        info["problem"] = "the matrix square root has non-finite entries"
        return None, info
    imag = 0.0
    if np.iscomplexobj(root):
        imag = float(np.max(np.abs(np.diagonal(root).imag)))
        root = root.real
    info["max_imag_diag"] = imag
    if imag > imag_atol:
        info["problem"] = f"the matrix square root has an imaginary component {imag:.3g} > {imag_atol:g} on its diagonal"
        return None, info
    denom = float(np.linalg.norm(a))
    resid = float(np.linalg.norm(root @ root - a)) / (denom if denom > 0 else 1.0)
    info["residual"] = resid
    if not resid <= residual_rtol:
        info["problem"] = f"the matrix square root is inaccurate: ||R R - A||_F / ||A||_F = {resid:.3g} > {residual_rtol:g}"
        return None, info
    return root, info


def frechet_distance(
    mu1,
    sigma1,
    mu2,
    sigma2,
    *,
    eps: float = 1e-6,
    imag_atol: float = SQRTM_IMAG_ATOL,
    residual_rtol: float = SQRTM_RESIDUAL_RTOL,
    return_info: bool = False,
):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64.

    ``d = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))``.  The square root is
    checked (finite, diagonal imaginary part <= ``imag_atol``, relative residual <= ``residual_rtol``);
    on failure ``eps * I`` is added to both covariances inside the root (with a warning), and a second
    failure raises :class:`FIDError`.  ``return_info=True`` returns ``(d, info)`` with the diagnostics.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise FIDError(f"mean vectors must be 1-D of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise FIDError(f"covariances must be ({d}, {d}) to match the means, got {s1.shape} and {s2.shape}")
    for name, arr in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.all(np.isfinite(arr)):
            raise FIDError(f"{name} has non-finite entries")
    diff = mu1 - mu2
    root, info = _checked_sqrtm(s1 @ s2, imag_atol, residual_rtol)
    info["eps"] = 0.0
    if root is None:
        first = info["problem"]
        warnings.warn(
            f"FID: {first}; retrying with {eps:g} * I added to both covariances (standard fallback)",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(d) * eps
        root, info = _checked_sqrtm((s1 + offset) @ (s2 + offset), imag_atol, residual_rtol)
        info["eps"] = eps
        info["first_attempt"] = first
        if root is None:
            raise FIDError(
                f"FID: the matrix square root failed ({first}) and again with eps={eps:g} ({info['problem']}); "
                "the covariances are not valid (symmetric positive semi-definite) - recompute the statistics"
            )
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(root))
    return (value, info) if return_info else value


# --------------------------------------------------------------------------------------------
# reference statistics


@dataclasses.dataclass
class Reference:
    path: Path
    mu: np.ndarray
    sigma: np.ndarray
    provenance: dict | None
    sha256: str

    @property
    def resolution(self):
        return None if self.provenance is None else self.provenance.get("resolution")


def provenance_path(path: str | os.PathLike) -> Path:
    """``ref.npz`` -> ``ref.provenance.json`` (same directory)."""
    path = Path(path)
    stem = path.name[:-4] if path.name.endswith(".npz") else path.name
    return path.with_name(stem + ".provenance.json")


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f"{where}: 'mu' must be (D,) and 'sigma' (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise FIDError(f"{where}: 'mu'/'sigma' contain NaN or Inf")
    scale = max(float(np.max(np.abs(sigma))), 1e-300)
    if float(np.max(np.abs(sigma - sigma.T))) > 1e-6 * scale:
        raise FIDError(f"{where}: 'sigma' is not symmetric; not a covariance matrix")
    return mu, sigma


def save_reference(path: str | os.PathLike, mu, sigma, provenance: Mapping | None = None) -> tuple[Path, Path]:
    """Write ``path`` (``.npz`` with float64 ``mu``, ``sigma``) and its provenance JSON beside it."""
    path = Path(path)
    if path.suffix != ".npz":
        raise FIDError(f"reference statistics file must end in .npz, got {path}")
    mu, sigma = _check_stats(mu, sigma, str(path))
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma)
    data = buf.getvalue()
    _atomic_write_bytes(path, data)
    prov = dict(provenance or {})
    prov.setdefault("format", REFERENCE_FORMAT)
    prov["feature_dim"] = int(mu.shape[0])
    prov["stats_file"] = path.name
    prov["stats_sha256"] = hashlib.sha256(data).hexdigest()
    ppath = provenance_path(path)
    _atomic_write_json(ppath, prov)
    return path, ppath


def load_reference(path: str | os.PathLike) -> Reference:
    """Reference ``mu``/``sigma`` from an ``.npz`` (ours, EDM's or ADM's) + provenance if present."""
    path = Path(path)
    if not path.is_file():
        raise FIDError(
            f"reference statistics {path} not found; build them with `python tools/fid_reference.py IMAGES "
            "--out REF.npz --resolution R` or download EDM/ADM reference .npz files"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            if "mu" not in keys or "sigma" not in keys:
                hint = (
                    " (it holds images under arr_0: compute statistics with tools/fid_reference.py on it)"
                    if "arr_0" in keys
                    else ""
                )
                raise FIDError(f"reference {path} lacks 'mu' and/or 'sigma' (keys: {', '.join(keys) or 'none'}){hint}")
            mu, sigma = data["mu"], data["sigma"]
    except FIDError:
        raise
    except Exception as e:
        raise FIDError(f"cannot read reference statistics {path}: {e}") from e
    mu, sigma = _check_stats(mu, sigma, str(path))
    digest = sha256_file(path)
    ppath = provenance_path(path)
    provenance = None
    if ppath.is_file():
        try:
            provenance = json.loads(ppath.read_text())
        except json.JSONDecodeError as e:
            raise FIDError(f"provenance file {ppath} is not valid JSON: {e}") from e
        recorded = provenance.get("stats_sha256")
        if recorded is not None and recorded != digest:
            raise FIDError(
                f"{ppath} describes a different statistics file (stats_sha256 {recorded[:12]}... != sha256 of "
                f"{path.name} {digest[:12]}...): the .npz was replaced; rebuild the reference or remove the stale provenance"
            )
    return Reference(path=path, mu=mu, sigma=sigma, provenance=provenance, sha256=digest)


# --------------------------------------------------------------------------------------------
# evaluation (the CLI's engine; also usable from Python)


def _sampling_summary(sampling: Mapping | None) -> tuple[dict, list[str]]:
    found: dict[str, Any] = {}
    if sampling:
        scopes = [sampling] + [v for v in sampling.values() if isinstance(v, Mapping)]
        for field, names in _SAMPLING_FIELDS.items():
            for scope in scopes:
                hit = next((n for n in names if n in scope), None)
                if hit is not None:
                    found[field] = scope[hit]
                    break
    missing = [f for f in ("export_hash", "solver", "nfe", "cfg", "guidance_interval", "ema", "vae_decode_precision") if f not in found]
    for f in missing:
        found[f] = None
    return found, missing


def _sampling_passthrough(sampling: Mapping | None) -> dict | None:
    if sampling is None:
        return None
    out = dict(sampling)
    if isinstance(out.get("seeds"), list) and len(out["seeds"]) > 16:
        out["seeds"] = format_seeds(out["seeds"])
    return out


def _check_reference_compat(ref: Reference, extractor, resolution: tuple[int, int], where: str) -> None:
    prov = ref.provenance
    if prov is None:
        return
    fe = prov.get("feature_extractor") or {}
    want = fe.get("weights_sha256")
    have = getattr(extractor, "weights_sha256", None)
    if want and have and want != have:
        raise FIDError(
            f"reference {ref.path} was built with Inception weights sha256 {want[:12]}... but this run uses "
            f"{have[:12]}... ({getattr(extractor, 'weights_path', '?')}): features are not comparable. Pass the "
            "same --inception-weights as the reference, or rebuild the reference with these weights"
        )
    res = prov.get("resolution")
    if res is not None:
        rh, rw = (int(res), int(res)) if isinstance(res, (int, float)) else (int(res[0]), int(res[1]))
        if (rh, rw) != tuple(resolution):
            raise FIDError(
                f"reference {ref.path} was built at {rh}x{rw} but the samples in {where} are "
                f"{resolution[0]}x{resolution[1]}: reference and samples must share preprocessing. Rebuild the "
                f"reference with tools/fid_reference.py --resolution {resolution[0]}"
            )


def _source_kind(src: ImageSource) -> str:
    base = getattr(src, "base", src)
    return "npz" if isinstance(base, NpzImages) else "png" if isinstance(base, PngFolder) else "array"


def evaluate(
    samples: Sequence[str | os.PathLike | ImageSource],
    reference: str | os.PathLike | Reference,
    extractor,
    *,
    seeds: Sequence[str | Sequence[int] | None] = (None,),
    batch_size: int = 64,
    allow_small: bool = False,
    input_format: str = "auto",
    progress: bool = True,
    save_stats: str | os.PathLike | None = None,
) -> dict:
    """FID of every (samples, seed range) pair against ``reference`` -> the ``fid.json`` content.

    All ranks must call it; each run's features are split over ranks.  All inputs are validated
    (paths, seeds, counts, resolution vs the reference's provenance) before any feature is computed.
    """
    ref = reference if isinstance(reference, Reference) else load_reference(reference)
    dim = _feature_dim(extractor)
    if ref.mu.shape[0] != dim:
        raise FIDError(f"reference {ref.path} has {ref.mu.shape[0]}-d statistics but the extractor gives {dim}-d features")
    if ref.provenance is None:
        warnings.warn(
            f"reference {ref.path} has no provenance file ({provenance_path(ref.path).name}); assuming it was built "
            "with torch-fidelity's official weights and the samples' preprocessing (EDM/ADM files)",
            RuntimeWarning,
            stacklevel=2,
        )
        if hasattr(extractor, "official") and not extractor.official:
            warnings.warn(
                "non-official Inception weights against a reference of unknown provenance: the distance is meaningless",
                RuntimeWarning,
                stacklevel=2,
            )
    seed_specs = list(seeds) if seeds else [None]
    plans = []
    for s in samples:
        if isinstance(s, ImageSource):
            src, sampling, spath, where = s, None, None, s.description
        else:
            src, sampling, spath = open_samples(s, input_format)
            where = str(s)
        for spec in seed_specs:
            chosen = src
            seed_list = None
            if spec is not None:
                seed_list = parse_seeds(spec)
                chosen = _select_seeds(src, seed_list, where)
            elif src.seeds is not None:
                seed_list = [int(x) for x in src.seeds]
            _check_count(len(chosen), allow_small, MIN_SAMPLES, f"{where}" + (f" seeds {format_seeds(seed_list)}" if spec is not None else ""))
            res = chosen.resolution
            _check_reference_compat(ref, extractor, res, where)
            plans.append((where, chosen, seed_list, sampling, spath, res))
    if save_stats is not None and len(plans) != 1:
        raise FIDError(f"--save-stats writes one statistics file but {len(plans)} runs were requested")
    runs = []
    for k, (where, src, seed_list, sampling, spath, res) in enumerate(plans):
        if len(src) < RECOMMENDED_SAMPLES and ldist.get_rank() == 0:
            warnings.warn(
                f"{where}: FID from {len(src)} samples; published numbers use {RECOMMENDED_SAMPLES} (FID is biased "
                "upward at small n, so the values are not comparable)",
                RuntimeWarning,
                stacklevel=2,
            )
        mu, sigma, n = compute_statistics(
            src, extractor, batch_size, allow_small=allow_small, progress=progress, desc=f"FID {k + 1}/{len(plans)}"
        )
        value, info = float("nan"), {}
        if ldist.get_rank() == 0 or not _distributed():
            value, info = frechet_distance(mu, sigma, ref.mu, ref.sigma, return_info=True)
        (value,) = _broadcast_floats([value])
        settings, missing = _sampling_summary(sampling)
        if save_stats is not None and ldist.get_rank() == 0:
            describe = getattr(extractor, "describe", None)
            save_reference(
                save_stats,
                mu,
                sigma,
                {
                    "source": where,
                    "source_type": "samples",
                    "count": n,
                    "resolution": list(res),
                    "seeds": format_seeds(seed_list),
                    "preprocessing": "none (generated samples fed as uint8)",
                    "feature_extractor": describe() if describe else {"name": repr(extractor)},
                    "created": _now(),
                },
            )
        runs.append(
            {
                "samples": where,
                "source": _source_kind(src),
                "fid": value,
                "num_samples": n,
                "seeds": format_seeds(seed_list),
                "resolution": list(res),
                **settings,
                "missing_sampling_fields": missing,
                "sampling_json": None if spath is None else str(spath),
                "sampling": _sampling_passthrough(sampling),
                "sqrtm": {k2: v for k2, v in info.items() if k2 != "scipy_warnings" or v},
            }
        )
        if missing and ldist.get_rank() == 0:
            warnings.warn(
                f"{where}: sampling.json does not state {', '.join(missing)}; the FID report will list them as null",
                RuntimeWarning,
                stacklevel=2,
            )
    values = [r["fid"] for r in runs]
    describe = getattr(extractor, "describe", None)
    return {
        "format": REPORT_FORMAT,
        "metric": "fid" if getattr(extractor, "official", False) else "frechet-distance (non-official Inception weights)",
        "fid": values[0] if len(values) == 1 else min(values),
        "fid_aggregate": "single" if len(values) == 1 else f"min over {len(values)} runs",
        "fid_min": min(values),
        "fid_mean": float(np.mean(values)),
        "fid_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "num_runs": len(runs),
        "num_samples": [r["num_samples"] for r in runs] if len(runs) > 1 else runs[0]["num_samples"],
        "seeds": [r["seeds"] for r in runs] if len(runs) > 1 else runs[0]["seeds"],
        "runs": runs,
        "reference": {
            "path": str(ref.path),
            "sha256": ref.sha256,
            "provenance": ref.provenance,
        },
        "feature_extractor": describe() if describe else {"name": repr(extractor)},
        "world_size": ldist.get_world_size() if _distributed() else 1,
        "created": _now(),
    }


# --------------------------------------------------------------------------------------------
# CLI


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff-fid",
        description="FID of generated samples against reference statistics (torch-fidelity's TF-compatible "
        "Inception-v3). Run under torchrun/srun to split the images over ranks.",
    )
    p.add_argument("samples", nargs="*", help="samples directories (PNGs or samples.npz) or ADM samples.npz files")
    p.add_argument("--ref", help="reference statistics .npz (mu, sigma), e.g. from tools/fid_reference.py, EDM or ADM")
    p.add_argument(
        "--seeds",
        action="append",
        help="seed range(s) to evaluate, e.g. 0-49999; repeat for several FIDs (min/mean reported)",
    )
    p.add_argument("--inception-weights", help=f"torch-fidelity Inception state dict (default: ${WEIGHTS_ENV} or the torch hub cache)")
    p.add_argument("--download-weights", action="store_true", help="explicitly download the official weights to the torch hub cache")
    p.add_argument("--allow-small", action="store_true", help=f"allow fewer than {MIN_SAMPLES} samples (smoke tests only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass per rank (default 64)")
    p.add_argument("--input-format", choices=("auto", "png", "npz"), default="auto")
    p.add_argument("--out", help="fid.json path (default: SAMPLES/fid.json for one samples directory, else ./fid.json)")
    p.add_argument("--save-stats", help="also write the samples' statistics (.npz + provenance) for a single run")
    p.add_argument("--device", help="torch device (default: this rank's accelerator device)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _default_out(samples: list[str]) -> Path:
    if len(samples) == 1:
        p = Path(samples[0])
        return (p if p.is_dir() else p.parent) / "fid.json"
    return Path("fid.json")


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    prefix = "latentdiff-fid"
    initialized_here = False
    try:
        if args.download_weights and not args.samples:
            path = download_inception_weights(args.inception_weights)
            print(f"Inception weights at {path}")
            return 0
        if not args.samples or not args.ref:
            raise FIDError("give --ref REF.npz and at least one samples directory or samples.npz")
        if args.batch_size < 1:
            raise FIDError(f"--batch-size must be >= 1, got {args.batch_size}")
        seeds = args.seeds or [None]
        for s in seeds:
            if s is not None:
                parse_seeds(s)
        ref = load_reference(args.ref)
        # cheap validation before loading the network / starting the group
        for s in args.samples:
            src, _, _ = open_samples(s, args.input_format)
            for spec in seeds:
                chosen = _select_seeds(src, parse_seeds(spec), s) if spec is not None else src
                _check_count(len(chosen), args.allow_small, MIN_SAMPLES, s + (f" seeds {spec}" if spec else ""))
        initialized_here = ldist.init_distributed()
        if ldist.get_world_size() > 1:
            prefix = f"latentdiff-fid[rank {ldist.get_rank()}]"
        extractor = load_feature_extractor(args.inception_weights, device=args.device, download=args.download_weights)
        report = evaluate(
            args.samples,
            ref,
            extractor,
            seeds=seeds,
            batch_size=args.batch_size,
            allow_small=args.allow_small,
            input_format=args.input_format,
            progress=not args.no_progress,
            save_stats=args.save_stats,
        )
        report["command"] = [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        out = Path(args.out) if args.out else _default_out(args.samples)
        if ldist.get_rank() == 0:
            _atomic_write_json(out, report)
            for r in report["runs"]:
                print(f"FID {r['fid']:.4f}  n={r['num_samples']}  seeds={r['seeds']}  {r['samples']}")
            if report["num_runs"] > 1:
                print(f"FID min {report['fid_min']:.4f}  mean {report['fid_mean']:.4f}  over {report['num_runs']} runs")
            print(f"wrote {out}")
        return 0
    except FIDError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if initialized_here:
            ldist.destroy()


def cli() -> None:
    """Console-script entry point: ``main`` then a hard exit (see ``latentdiff.dist.hard_exit``)."""
    from .dist import hard_exit

    hard_exit(main())


if __name__ == "__main__":
    cli()
