"""Generated or reference images for FID, with random access so that ranks can take disjoint parts.

A directory of PNGs (searched recursively; files whose name starts with ``grid`` are skipped; the seed
is the trailing integer of the file name, e.g. ``000123.png``) or an ADM-format ``samples.npz``
(``arr_0``: uint8 NHWC; seeds from an ``npz`` key ``seeds`` or from ``sampling.json``), or any uint8
array.  :func:`open_samples` also returns the sampling record
(:class:`~latentdiff.contracts.sampling.SamplingRecord`) found beside the samples.
"""
from __future__ import annotations

import json
import os
import re
import struct
import warnings
import zipfile
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.contracts.sampling import SAMPLING_JSON, SamplingRecord
from latentdiff.utils.errors import FIDError, SampleError
from latentdiff.utils.seeds import format_seeds, parse_seeds

__all__ = [
    "ImageSource",
    "ArrayImages",
    "PngFolder",
    "NpzImages",
    "SubsetImages",
    "open_samples",
    "read_npz_array",
    "select_seeds",
    "parse_seed_set",
    "as_uint8_nchw",
    "read_json",
]


def read_json(path: Path):
    """A JSON file beside samples or statistics; :class:`FIDError` naming the file when it does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise FIDError(f"{path} is not valid JSON: {e}; fix or delete it") from e


def parse_seed_set(spec) -> list[int]:
    """FID ``--seeds``: ``"0-49999"``, ``"0-9,20,30-39"`` (inclusive ranges) or a list of ints -> sorted
    unique seeds (:class:`FIDError` on a malformed spec)."""
    return parse_seeds(spec, as_set=True, error=FIDError)


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


def as_uint8_nchw(x, where: str) -> torch.Tensor:
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
        return as_uint8_nchw(part, self.description)


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


def read_sampling_record(path: Path) -> SamplingRecord | None:
    """The ``sampling.json`` at ``path`` (None when there is none); :class:`FIDError` when it is not a
    record written by ``latentdiff-sample``."""
    if not path.is_file():
        return None
    try:
        return SamplingRecord.read(path)
    except SampleError as e:
        raise FIDError(f"{e}. The FID report copies the sampler's settings from {SAMPLING_JSON}: fix or remove "
                       "the file") from None


def open_samples(path: str | os.PathLike, input_format: str = "auto") -> tuple[ImageSource, SamplingRecord | None,
                                                                                Path | None]:
    """(images, the sampling record or None, its path) for a samples directory or ``.npz`` file.

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
        sampling_path = path.parent / SAMPLING_JSON
    else:
        npz = path / "samples.npz" if (path / "samples.npz").is_file() and input_format in ("auto", "npz") else None
        if input_format == "npz" and npz is None:
            raise FIDError(f"--input-format npz but {path} holds no samples.npz")
        folder = path if npz is None else None
        sampling_path = path / SAMPLING_JSON
    sampling = read_sampling_record(sampling_path)
    if sampling is None:
        sampling_path = None
    if npz is not None:
        src: ImageSource = NpzImages(npz)
        if src.seeds is None and sampling is not None:
            seeds = sampling.seed_list()
            if len(seeds) == len(src):
                src.seeds = np.asarray(seeds, dtype=np.int64)
            else:
                warnings.warn(f"{sampling_path} lists {len(seeds)} seeds but {npz} holds {len(src)} images: seeds unknown",
                              RuntimeWarning, stacklevel=2)
    else:
        src = PngFolder(folder)
    return src, sampling, sampling_path


def select_seeds(src: ImageSource, seeds: list[int], where: str) -> SubsetImages:
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
