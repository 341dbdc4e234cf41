"""Fréchet Wavelet Distance (Veeramacheneni et al., "Fréchet Wavelet Distance: A Domain-Agnostic Metric
for Image Generation", ICLR 2025): no network, only a Haar wavelet packet transform.

For images ``x`` scaled to ``[0, 1]`` (``uint8 / 255``, as the reference implementation ``pytorchfwd``
feeds them through ``ToTensor``), the level-``L`` Haar packet transform
(:func:`latentdiff.metrics.wavelets.haar_packets`) gives ``P = 4**L`` packets; packet ``p`` of one
image is the vector of its ``d = C * (H / 2**L) * (W / 2**L)`` coefficients.  Per packet, the mean
``mu_p`` and the unbiased covariance ``Sigma_p`` over the images (float64, summed over ranks as in
:class:`latentdiff.metrics.frechet.FeatureAccumulator`), and

    FWD = (1 / P) sum_p  d_F(N(mu_p^g, Sigma_p^g), N(mu_p^r, Sigma_p^r))          (paper, Eq. 5)

with ``d_F`` the Fréchet distance ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Dowson &
Landau 1982).  Packet covariances are often singular (flat or quantized images have high-frequency
packets without variance), where ``scipy.linalg.sqrtm(S1 S2)`` is inaccurate, so the trace term is
computed from the symmetric form: ``S1 S2`` is similar to ``S1^(1/2) S2 S1^(1/2)`` (PSD), hence
``tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2)))`` with ``S1^(1/2)`` from the
eigendecomposition of ``S1`` (negative round-off eigenvalues clipped to 0), all float64
(:func:`frechet_distance_psd`; it equals :func:`latentdiff.metrics.frechet.frechet_distance` on
well-conditioned covariances, ``tests/test_quality_metrics.py``).  Defaults follow the paper: Haar, level 4
(at 256 px: 256 packets of 16x16x3 coefficients), no log scaling.

Sample count: a packet covariance is ``d x d``; with fewer than ``d + 1`` images it is singular and
the estimate is dominated by noise, so fewer than ``MIN_SAMPLES_PER_DIM * d`` images are refused
(:func:`fwd_min_samples`; 1536 at 256 px / level 4, 24 at 32 px / level 4).
"""
from __future__ import annotations

import numpy as np
import torch

from latentdiff.metrics.frechet import all_reduce_moments, several_ranks
from latentdiff.metrics.wavelets import haar_packets
from latentdiff.utils.errors import FIDError

__all__ = ["DEFAULT_LEVEL", "MIN_SAMPLES_PER_DIM", "packet_dim", "fwd_min_samples", "PacketAccumulator",
           "frechet_distance_psd", "fwd_from_statistics"]

DEFAULT_LEVEL = 4
MIN_SAMPLES_PER_DIM = 2


def packet_dim(resolution, level: int, channels: int = 3) -> int:
    """``d``: the coefficients of one packet of one image."""
    h, w = (int(resolution[0]), int(resolution[1]))
    return channels * (h >> level) * (w >> level)


def fwd_min_samples(resolution, level: int = DEFAULT_LEVEL, channels: int = 3) -> int:
    return MIN_SAMPLES_PER_DIM * packet_dim(resolution, level, channels)


class PacketAccumulator:
    """Per packet, float64 count, coefficient sum and sum of outer products; all-reduced over ranks."""

    def __init__(self, level: int = DEFAULT_LEVEL):
        self.level = int(level)
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update_packets(self, packets: torch.Tensor) -> None:
        """``packets`` (B, P, C, h, w) from :func:`haar_packets` of images in [0, 1]."""
        b, p = packets.shape[:2]
        f = packets.reshape(b, p, -1).to("cpu", torch.float64).transpose(0, 1)  # (P, B, d)
        if self.sum is None:
            self.sum = torch.zeros(p, f.shape[2], dtype=torch.float64)
            self.outer = torch.zeros(p, f.shape[2], f.shape[2], dtype=torch.float64)
        elif self.sum.shape != f.shape[::2]:
            raise FIDError(f"FWD: packets of shape {tuple(f.shape[::2])} after {tuple(self.sum.shape)}: all images "
                           "must have one resolution")
        self.n += b
        self.sum += f.sum(1)
        self.outer.baddbmm_(f.transpose(1, 2), f)

    def update(self, images_uint8: torch.Tensor) -> None:
        self.update_packets(haar_packets(images_uint8.to(torch.float64) / 255.0, self.level))

    def all_reduce(self) -> None:
        """Sum over ranks (every rank must call this, also one that saw no image: it then has no buffers)."""
        if not several_ranks():
            return
        shape = torch.tensor([0.0, 0.0] if self.sum is None else list(self.sum.shape), dtype=torch.float64)
        dims = _max_shape(shape)
        if self.sum is None:
            self.sum = torch.zeros(*dims, dtype=torch.float64)
            self.outer = torch.zeros(dims[0], dims[1], dims[1], dtype=torch.float64)
        self.n = all_reduce_moments(self.n, self.sum, self.outer)

    def statistics(self) -> tuple[np.ndarray, np.ndarray, int]:
        """``(mu (P, d), sigma (P, d, d), n)``: ``mu = S / n``, ``sigma = (Q - n mu mu^T) / (n - 1)``."""
        if self.n < 2 or self.sum is None:
            raise FIDError(f"FWD needs at least 2 images for a covariance, got {self.n}")
        n = self.n
        mu = self.sum / n
        sigma = (self.outer - n * mu[:, :, None] * mu[:, None, :]) / (n - 1)
        sigma = 0.5 * (sigma + sigma.transpose(1, 2))
        return mu.numpy().copy(), sigma.numpy().copy(), n


def _max_shape(shape: torch.Tensor) -> tuple[int, int]:
    """The packet buffer shape known to some rank (a rank with no image learns it from the others)."""
    from latentdiff.utils import dist as ldist

    shapes = ldist.all_gather_object(tuple(int(v) for v in shape.tolist()))
    known = [s for s in shapes if s[0] > 0]
    if not known:
        raise FIDError("FWD: no rank saw any image")
    return known[0]


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (s + s.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_psd(mu1, sigma1, mu2, sigma2) -> float:
    """``||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2)`` via the symmetric form (module docstring)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    for name, arr in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.all(np.isfinite(arr)):
            raise FIDError(f"FWD: {name} has non-finite entries")
    r1 = _psd_sqrt(s1)
    inner = r1 @ s2 @ r1
    lam = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(np.clip(lam, 0.0, None)).sum())


def fwd_from_statistics(mu_g, sigma_g, mu_r, sigma_r) -> tuple[float, list[float]]:
    """``(FWD, per-packet Fréchet distances)`` (module docstring, Eq. 5) from per-packet statistics."""
    mu_g, mu_r = np.asarray(mu_g, np.float64), np.asarray(mu_r, np.float64)
    if mu_g.shape != mu_r.shape:
        raise FIDError(f"FWD: packet statistics of shape {mu_g.shape} vs {mu_r.shape}; the two sets need the same "
                       "resolution and wavelet level")
    per = [frechet_distance_psd(mu_g[p], sigma_g[p], mu_r[p], sigma_r[p]) for p in range(mu_g.shape[0])]
    return float(np.mean(per)), per
