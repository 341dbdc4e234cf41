"""FID statistics and distance: float64 feature moments across ranks and the Fréchet distance.

Statistics: every rank extracts features for a disjoint part of the images; the float64 feature sum,
the float64 sum of outer products and the count are all-reduced, then ``mu = S/n`` and
``sigma = (Q - n mu mu^T) / (n - 1)`` (unbiased, as ``np.cov``).

Distance: ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` in float64 with
``scipy.linalg.sqrtm``.  The root is checked (finite, imaginary part of the diagonal below 1e-3,
relative residual ``||R R - S1 S2||_F / ||S1 S2||_F``); when a check fails the standard fallback adds
``eps * I`` to both covariances (with a warning) and a second failure raises.

Reference files are :mod:`latentdiff.metrics.reference`.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from latentdiff.metrics.image_sources import ArrayImages, ImageSource, as_uint8_nchw
from latentdiff.metrics.inception import FEATURE_DIM
from latentdiff.utils import dist as ldist
from latentdiff.utils.errors import FIDError

__all__ = [
    "MIN_SAMPLES",
    "RECOMMENDED_SAMPLES",
    "FeatureAccumulator",
    "check_count",
    "feature_dim",
    "several_ranks",
    "compute_statistics",
    "frechet_distance",
]

MIN_SAMPLES = 2048
RECOMMENDED_SAMPLES = 50_000
SQRTM_IMAG_ATOL = 1e-3
SQRTM_RESIDUAL_RTOL = 1e-5


# --------------------------------------------------------------------------------------------
# statistics


def several_ranks() -> bool:
    """Is a process group of more than one rank active (the statistics are then all-reduced)?"""
    return ldist.is_distributed() and dist.get_world_size() > 1


def all_reduce_moments(n: int, total: torch.Tensor, outer: torch.Tensor) -> int:
    """Sum a count and the float64 feature sum and outer-product sum over ranks (in place); the total count."""
    count = torch.tensor([float(n)], dtype=torch.float64)
    for t in (count, total, outer):
        _all_reduce_(t)
    return int(round(count.item()))


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of a CPU tensor (moved to the backend's device when it is not gloo)."""
    if not several_ranks():
        return t
    buf = t.to(torch.device("cpu") if dist.get_backend() == "gloo" else ldist.device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


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
        if not several_ranks():
            return
        self.n = all_reduce_moments(self.n, self.sum, self.outer)

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


def _features_of_source(images: ImageSource, extractor, acc: FeatureAccumulator, batch_size: int, local: list,
                        bar) -> None:
    for start in range(0, len(local), batch_size):
        idx = local[start : start + batch_size]
        x = images.batch(idx)
        if x.shape[0]:  # a source may drop undecodable images
            acc.update(extractor(x))
        bar.update(len(idx))


def _features_of_batches(images, extractor, acc: FeatureAccumulator, batch_size: int, shard: bool, bar) -> None:
    rank, world = (ldist.get_rank(), ldist.get_world_size()) if several_ranks() else (0, 1)
    for i, b in enumerate(images):
        if shard and i % world != rank:
            continue
        x = as_uint8_nchw(b, f"batch {i}")
        for start in range(0, x.shape[0], batch_size):
            acc.update(extractor(x[start : start + batch_size]))
        bar.update(x.shape[0])


def _agree_on_failure(error: BaseException | None, rank: int) -> None:
    """Every rank learns whether any rank failed (no rank is left waiting in the all-reduce), then raises."""
    if several_ranks():
        flag = _all_reduce_(torch.tensor([1.0 if error is not None else 0.0], dtype=torch.float64))
        if flag.item() > 0 and error is None:
            raise FIDError(f"feature extraction failed on {int(flag.item())} other rank(s); see their error messages")
    if error is not None:
        if isinstance(error, FIDError):
            raise error
        raise FIDError(f"feature extraction failed on rank {rank}: {type(error).__name__}: {error}") from error


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
    rank, world = (ldist.get_rank(), ldist.get_world_size()) if several_ranks() else (0, 1)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = ArrayImages(images)
    acc = FeatureAccumulator(feature_dim(extractor))
    error: BaseException | None = None
    is_source = isinstance(images, ImageSource)
    if is_source:
        shard = True if shard is None else shard
        if shard:
            check_count(len(images), allow_small, min_samples, images.description or "images")
        local = list(range(rank, len(images), world)) if shard else list(range(len(images)))
    bar = tqdm(total=len(local) if is_source else None, unit="img", desc=desc, disable=not (progress and rank == 0),
               dynamic_ncols=True)
    try:
        if is_source:
            _features_of_source(images, extractor, acc, batch_size, local, bar)
        else:
            _features_of_batches(images, extractor, acc, batch_size, shard, bar)
    except Exception as e:  # re-raised after the other ranks were told (no hang in all_reduce)
        error = e
    finally:
        bar.close()
    _agree_on_failure(error, rank)
    acc.all_reduce()
    check_count(acc.n, allow_small, min_samples, getattr(images, "description", "") or "images")
    return acc.statistics()


# --------------------------------------------------------------------------------------------
# Fréchet distance


def _checked_sqrtm(a: np.ndarray, imag_atol: float, residual_rtol: float) -> tuple[np.ndarray | None, dict]:
    """The matrix square root of ``a`` and its diagnostics, or (None, diagnostics naming the problem)."""
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
