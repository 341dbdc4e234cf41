"""Power spectra and the weighted signal-to-noise ratio (wsnr.txt Sec. 4, Eq. 2-3).

Conventions
-----------
* The power spectrum is the *orthonormal* one: ``P(u, v) = |F(u, v)|**2`` with
  ``F = fft2(x, norm="ortho")``.  With this normalization Parseval reads
  ``sum_uv P(u, v) = sum_kl x(k, l)**2`` and white noise of standard deviation
  sigma has ``E[P(u, v)] = sigma**2`` in every bin (Eq. 3 / Appendix A.1).
* Spectra are accumulated in float64 and averaged over the dataset (the paper uses
  ``E_y[P_y]`` as the proxy, Sec. 4 last paragraph).

The DC bin
----------
Eq. 2 sums over *all* frequencies, the zero frequency included, and that is what
:func:`wsnr` computes by default.  For natural images the DC bin carries the
squared image mean times ``H*W`` and so holds most of the power: it dominates
both factors of Eq. 2 and therefore WSNR.  ``include_dc=False`` drops the
(0, 0) bin from both sums (a "DC-free" WSNR); it is offered as an option and is
never silently used.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = [
    "power_spectrum",
    "SpectrumAccumulator",
    "wsnr_constant",
    "wsnr",
    "wsnr_equivalent_sigma",
    "radial_profile",
    "affine_power_spectrum",
]


def _check_images(x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.ndim != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"expected a (B, C, H, W) tensor, got {shape}")


def _batch_power(x: torch.Tensor) -> torch.Tensor:
    """Per-image orthonormal power spectrum |fft2(x, norm='ortho')|**2 in float64, (B, C, H, W)."""
    _check_images(x)
    f = torch.fft.fft2(x.detach().to(torch.float64), norm="ortho")
    return f.real.square() + f.imag.square()


def power_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Batch-mean power spectrum of ``x`` (B, C, H, W) -> (C, H, W), float64 (Eq. 2's ``P_y``)."""
    return _batch_power(x).mean(dim=0)


class SpectrumAccumulator:
    """Streaming, exact, rank-mergeable mean power spectrum.

    Keeps the float64 *sum* of per-image spectra and the image count, so
    ``merge`` (or :meth:`all_reduce` across ranks) is a plain sum and the result
    does not depend on how the data was split, up to float64 rounding.
    """

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count: int = 0

    def update(self, x: torch.Tensor) -> "SpectrumAccumulator":
        p = _batch_power(x).sum(dim=0).cpu()
        if self.sum is None:
            self.sum = p
        else:
            if self.sum.shape != p.shape:
                raise ValueError(
                    f"spectrum shape changed from {tuple(self.sum.shape)} to {tuple(p.shape)}; "
                    "every image fed to one accumulator must have the same (C, H, W)"
                )
            self.sum += p
        self.count += x.shape[0]
        return self

    def merge(self, other: "SpectrumAccumulator") -> "SpectrumAccumulator":
        if other.sum is None:
            return self
        if self.sum is None:
            self.sum, self.count = other.sum.clone(), other.count
            return self
        if self.sum.shape != other.sum.shape:
            raise ValueError(f"cannot merge spectra of shapes {tuple(self.sum.shape)} and {tuple(other.sum.shape)}")
        self.sum += other.sum
        self.count += other.count
        return self

    def all_reduce(self, shape: Iterable[int]) -> "SpectrumAccumulator":
        """Sum over all ranks of the default process group (every rank must call it).

        ``shape`` is the (C, H, W) of the spectrum, needed by ranks that saw no data.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        shape = tuple(shape)
        buf = torch.zeros(math.prod(shape) + 1, dtype=torch.float64)
        if self.sum is not None:
            buf[:-1] = self.sum.flatten()
        buf[-1] = self.count
        dist.all_reduce(buf)
        self.sum = buf[:-1].reshape(shape).clone()
        self.count = int(round(buf[-1].item()))
        return self

    @property
    def power(self) -> torch.Tensor:
        """Mean power spectrum (C, H, W), float64."""
        if self.sum is None or self.count == 0:
            raise ValueError("SpectrumAccumulator is empty: call update() with at least one image first")
        return self.sum / self.count

    def state_dict(self) -> dict:
        return {"sum": None if self.sum is None else self.sum.clone(), "count": self.count}

    @classmethod
    def from_state_dict(cls, state: dict) -> "SpectrumAccumulator":
        acc = cls()
        acc.sum = None if state["sum"] is None else torch.as_tensor(state["sum"], dtype=torch.float64).clone()
        acc.count = int(state["count"])
        return acc


def _as_power(power) -> torch.Tensor:
    p = torch.as_tensor(power, dtype=torch.float64)
    if p.ndim == 2:
        p = p.unsqueeze(0)
    if p.ndim != 3:
        raise ValueError(f"a power spectrum must be (C, H, W) or (H, W), got shape {tuple(p.shape)}")
    if (p < 0).any():
        raise ValueError("a power spectrum cannot have negative entries")
    return p


def wsnr_constant(power, *, include_dc: bool = True) -> torch.Tensor:
    """``K(P) = sum_c sum_uv P_c(u,v)**2 / sum_uv P_c(u,v)`` so that ``WSNR(P, sigma) = K / sigma**2``.

    This is Eq. 2 with Eq. 3's noise power ``E[P_sigma_n] = sigma**2`` factored out.
    Channels are *summed*, exactly as Eq. 2 is written.
    """
    p = _as_power(power)
    if not include_dc:
        p = p.clone()
        p[:, 0, 0] = 0.0
    total = p.sum(dim=(-2, -1))
    if (total <= 0).any():
        raise ValueError("a channel of the power spectrum has zero total power; WSNR is undefined")
    return (p.square().sum(dim=(-2, -1)) / total).sum()


def wsnr(power, sigma, *, include_dc: bool = True) -> torch.Tensor:
    """Weighted SNR of data with mean power spectrum ``power`` under white noise ``sigma`` (Eq. 2-3).

    ``WSNR(P, sigma) = sum_c sum_uv [P_c(u,v) / sum_uv P_c(u,v)] * [P_c(u,v) / sigma**2]``.
    ``sigma`` may be a float or a tensor (the result broadcasts over it), float64.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if (s <= 0).any():
        raise ValueError("sigma must be positive")
    return wsnr_constant(power, include_dc=include_dc) / s.square()


def wsnr_equivalent_sigma(sigma, power_ref, power_target, *, include_dc: bool = True) -> torch.Tensor:
    """The sigma' with ``wsnr(power_target, sigma') == wsnr(power_ref, sigma)`` (Sec. 4, "WSNR-Equivalent").

    Since WSNR is ``K / sigma**2`` (Eq. 2-3), ``sigma' = sigma * sqrt(K_target / K_ref)``.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    k_ref = wsnr_constant(power_ref, include_dc=include_dc)
    k_tgt = wsnr_constant(power_target, include_dc=include_dc)
    return s * torch.sqrt(k_tgt / k_ref)


def radial_profile(power) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-mean radially averaged spectrum (for plots): returns (frequency radius, mean power)."""
    p = _as_power(power).mean(dim=0)
    h, w = p.shape
    fy = torch.fft.fftfreq(h, dtype=torch.float64) * h
    fx = torch.fft.fftfreq(w, dtype=torch.float64) * w
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long()
    nbins = int(r.max()) + 1
    sums = torch.zeros(nbins, dtype=torch.float64).index_add_(0, r.flatten(), p.flatten())
    counts = torch.zeros(nbins, dtype=torch.float64).index_add_(0, r.flatten(), torch.ones_like(p.flatten()))
    keep = counts > 0
    return torch.arange(nbins, dtype=torch.float64)[keep], sums[keep] / counts[keep]


def affine_power_spectrum(power, channel_mean, shift, scale) -> torch.Tensor:
    """Exact mean spectrum of ``y' = (y - shift_c) * scale_c`` from the mean spectrum of ``y``.

    With the orthonormal DFT a constant ``a`` contributes only to the DC bin, ``F(a)(0, 0) = a sqrt(HW)``,
    and ``E[F(y)(0, 0)] = sqrt(HW) * mean_c``.  Hence ``P'_c = scale_c^2 P_c`` off DC and
    ``P'_c(0, 0) = scale_c^2 (P_c(0, 0) - 2 shift_c HW mean_c + shift_c^2 HW)``.
    ``channel_mean`` is the dataset mean of channel c (over images and pixels).
    """
    p = _as_power(power).clone()
    c, h, w = p.shape
    m = torch.as_tensor(channel_mean, dtype=torch.float64).reshape(-1)
    a = torch.as_tensor(shift, dtype=torch.float64).reshape(-1)
    k = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
    if not (m.numel() == a.numel() == k.numel() == c):
        raise ValueError(f"channel_mean/shift/scale need {c} entries each, got {m.numel()}, {a.numel()}, {k.numel()}")
    hw = h * w
    p[:, 0, 0] = p[:, 0, 0] - 2 * a * hw * m + a.square() * hw
    return p * k.square().view(-1, 1, 1)
