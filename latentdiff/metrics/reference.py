"""FID reference statistics files: ``mu``/``sigma`` ``.npz`` plus a provenance JSON.

``.npz`` with float64 ``mu`` (D,) and ``sigma`` (D, D) - the keys EDM's ``fid.py ref`` and ADM's
``VIRTUAL_*.npz`` use, so their files load here and ours load there - plus a provenance JSON beside it
(``ref.npz`` -> ``ref.provenance.json``: source, count, resolution, preprocessing, feature extractor,
weights hash, sha256 of the ``.npz``).  A provenance whose recorded sha256 is not the file's is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from latentdiff.metrics.image_sources import read_json
from latentdiff.utils.errors import FIDError
from latentdiff.utils.io import atomic_write_bytes, atomic_write_json, sha256_file
from latentdiff.utils.safe_load import UnsafeFileError, load_npz

__all__ = ["REFERENCE_FORMAT", "Reference", "provenance_path", "save_reference", "load_reference"]

REFERENCE_FORMAT = "latentdiff-fid-reference/1"


@dataclasses.dataclass
class Reference:
    """Reference statistics as loaded: the file, mu, sigma, its provenance (None for EDM/ADM files), sha256."""

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
    atomic_write_bytes(path, data)
    prov = dict(provenance or {})
    prov.setdefault("format", REFERENCE_FORMAT)
    prov["feature_dim"] = int(mu.shape[0])
    prov["stats_file"] = path.name
    prov["stats_sha256"] = hashlib.sha256(data).hexdigest()
    ppath = provenance_path(path)
    atomic_write_json(ppath, prov)
    return path, ppath


def load_reference(path: str | os.PathLike) -> Reference:
    """Reference ``mu``/``sigma`` from an ``.npz`` (ours, EDM's or ADM's) + provenance if present."""
    path = Path(path)
    if not path.is_file():
        raise FIDError(
            f"reference statistics {path} not found; build them with `python tools/fid_reference.py IMAGES "
            "--out REF.npz --resolution R` or download EDM/ADM reference .npz files"
        )
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith(b"PK"):  # every .npz is a zip archive
        what = "a .npy array (use an .npz with mu and sigma)" if head.startswith(b"\x93NUMPY") else (
            "a Python pickle, never unpickled: it could run code" if head.startswith(b"\x80") else
            "text" if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head) else f"bytes {head!r}")
        raise FIDError(f"reference {path} is not an .npz file (it starts with {what}); build reference "
                       "statistics with `python tools/fid_reference.py IMAGES --out REF.npz --resolution R` "
                       "or pass an EDM/ADM reference .npz")
    try:
        data = load_npz(path)  # allow_pickle=False; pickled arrays are refused naming the file
    except UnsafeFileError:
        raise
    except Exception as e:
        raise FIDError(f"cannot read reference statistics {path}: {e}") from e
    try:
        keys = list(data)
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
        provenance = read_json(ppath)
        recorded = provenance.get("stats_sha256")
        if recorded is not None and recorded != digest:
            raise FIDError(
                f"{ppath} describes a different statistics file (stats_sha256 {recorded[:12]}... != sha256 of "
                f"{path.name} {digest[:12]}...): the .npz was replaced; rebuild the reference or remove the stale provenance"
            )
    return Reference(path=path, mu=mu, sigma=sigma, provenance=provenance, sha256=digest)
