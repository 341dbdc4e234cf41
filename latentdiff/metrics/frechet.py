"""FID statistics and distance: float64 feature moments across ranks, the Fréchet distance, reference files.

Statistics: every rank extracts features for a disjoint part of the images; the float64 feature sum,
the float64 sum of outer products and the count are all-reduced, then ``mu = S/n`` and
``sigma = (Q - n mu mu^T) / (n - 1)`` (unbiased, as ``np.cov``).

Distance: ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` in float64 with
``scipy.linalg.sqrtm``.  The root is checked (finite, imaginary part of the diagonal below 1e-3,
relative residual ``||R R - S1 S2||_F / ||S1 S2||_F``); when a check fails the standard fallback adds
``eps * I`` to both covariances (with a warning) and a second failure raises.

Reference files: ``.npz`` with float64 ``mu`` (D,) and ``sigma`` (D, D) - the keys EDM's ``fid.py ref``
and ADM's ``VIRTUAL_*.npz`` use, so their files load here and ours load there - plus a provenance JSON
beside it (``ref.npz`` -> ``ref.provenance.json``: source, count, resolution, preprocessing, feature
extractor, weights hash, sha256 of the ``.npz``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from latentdiff.utils import dist as ldist
from latentdiff.utils.io import atomic_write_bytes, atomic_write_json
from latentdiff.utils.io import sha256_file
from latentdiff.utils.errors import FIDError
from latentdiff.metrics.image_sources import ArrayImages, ImageSource, as_uint8_nchw, read_json
from latentdiff.metrics.inception import FEATURE_DIM

__all__ = [
    "MIN_SAMPLES",
    "RECOMMENDED_SAMPLES",
    "FeatureAccumulator",
    "check_count",
    "feature_dim",
    "is_distributed",
    "broadcast_floats",
    "compute_statistics",
    "frechet_distance",
    "Reference",
    "provenance_path",
    "save_reference",
    "load_reference",
]

MIN_SAMPLES = 2048
RECOMMENDED_SAMPLES = 50_000
SQRTM_IMAG_ATOL = 1e-3
SQRTM_RESIDUAL_RTOL = 1e-5
REFERENCE_FORMAT = "latentdiff-fid-reference/1"


# --------------------------------------------------------------------------------------------
# statistics


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cpu") if dist.get_backend() == "gloo" else ldist.device()


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a CPU tensor (moved to the backend's device when needed)."""
    import torch.distributed as dist

    if not is_distributed():
        return t
    dev = _collective_device()
    buf = t.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def broadcast_floats(values: list[float], src: int = 0) -> list[float]:
    import torch.distributed as dist

    if not is_distributed():
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
        if not is_distributed():
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


def check_count(n: int, allow_small: bool, min_samples: int, where: str) -> None:
    if n < 2:
        raise FIDError(f"{where}: {n} image(s); FID needs at least 2 (and {min_samples} without --allow-small)")
    if n < min_samples and not allow_small:
        raise FIDError(
            f"{where}: only {n} images; FID with fewer than {min_samples} samples is unreliable (the 2048-d "
            f"covariance is rank-deficient) and is refused. Generate more ({RECOMMENDED_SAMPLES} is standard) or "
            "pass --allow-small (Python: allow_small=True) for a smoke test"
        )


def feature_dim(extractor) -> int:
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
    rank, world = (ldist.get_rank(), ldist.get_world_size()) if is_distributed() else (0, 1)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = ArrayImages(images)
    acc = FeatureAccumulator(feature_dim(extractor))
    error: BaseException | None = None
    show = progress and rank == 0
    from tqdm.auto import tqdm

    if isinstance(images, ImageSource):
        shard = True if shard is None else shard
        if shard:
            check_count(len(images), allow_small, min_samples, images.description or "images")
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
                x = as_uint8_nchw(b, f"batch {i}")
                for start in range(0, x.shape[0], batch_size):
                    acc.update(extractor(x[start : start + batch_size]))
                bar.update(x.shape[0])
        except Exception as e:
            error = e
        finally:
            bar.close()
    if is_distributed():
        flag = torch.tensor([1.0 if error is not None else 0.0], dtype=torch.float64)
        _all_reduce_(flag)
        if flag.item() > 0 and error is None:
            raise FIDError(f"feature extraction failed on {int(flag.item())} other rank(s); see their error messages")
    if error is not None:
        if isinstance(error, FIDError):
            raise error
        raise FIDError(f"feature extraction failed on rank {rank}: {type(error).__name__}: {error}") from error
    acc.all_reduce()
    check_count(acc.n, allow_small, min_samples, getattr(images, "description", "") or "images")
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
        provenance = read_json(ppath)
        recorded = provenance.get("stats_sha256")
        if recorded is not None and recorded != digest:
            raise FIDError(
                f"{ppath} describes a different statistics file (stats_sha256 {recorded[:12]}... != sha256 of "
                f"{path.name} {digest[:12]}...): the .npz was replaced; rebuild the reference or remove the stale provenance"
            )
    return Reference(path=path, mu=mu, sigma=sigma, provenance=provenance, sha256=digest)
