"""The ``auto`` sampler's noise levels: a per-sample grid placed from a data-scale estimate, and the step orders.

The data scale.  For sigma much larger than the data, Tweedie's formula gives
D(x; sigma) ~ mu + Cov x / sigma^2, so the first two evaluations (at sigma_max and sigma_1) measure the
data variance along v = x_0 / sigma_0^2 - x_1 / sigma_1^2: var = <v, D_0 - D_1> / <v, v>, an estimate of
tr(Cov) / d (:func:`data_scale`).  S = sqrt(2 d var) estimates the RMS distance between two data points,
the quantity behind the data-driven sigma_max of wsnr.txt Eq. 7-8; which training image a sample
commits to is decided at sigma of order 0.1 S.

The grid (:func:`auto_plan`).  sigma_1 is the first level after sigma_max of edm.txt Eq. 5 with
N = NFE levels (:func:`first_sigma`: a short first step, taken before S is known).  The remaining
levels are uniform in log sigma over [sigma_lo, sigma_1] with sigma_lo = kappa(NFE) S,
kappa(NFE) = KAPPA0 (7 / NFE)^KAPPA_POWER (few evaluations go where the decision is made, more extend
the resolved range down), followed by a tail of r levels uniform in log sigma down to sigma_min, and
the final evaluation at sigma_min.  For NFE >= TAIL_MIN_NFE, r is the larger of round(TAIL_FRACTION NFE)
and the smallest count whose tail log step is at most TAIL_BALANCE times the main log step (levels
move from the main range to the tail one at a time until that holds); below TAIL_MIN_NFE, r = 0.  The
tail grows with NFE, so the method converges.  sigma_lo is clipped to [1.5 sigma_min, sigma_1 e^-0.01];
an estimate var <= 0 (a denoiser that does not respond to x at sigma_max) gives S = 0 and hence
sigma_lo = 1.5 sigma_min.

The orders (:func:`order_for`): each step's predictor order follows its log step h, p = 4 if h <= 0.3,
3 if h <= 1.3, 2 if h <= 2.0, else 1 (``ORDER_MAX_H``), capped by the evaluations held: high-order
extrapolation over long steps amplifies the error of a denoiser that is not smooth on the scale of the
step.  The constants were fitted on ideal-denoiser data; ``tools/bench/README.md`` has the fit, the
validation data and the alternatives measured.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from latentdiff.diffusion.grids import karras_sigmas

__all__ = ["KAPPA0", "KAPPA_POWER", "TAIL_FRACTION", "TAIL_MIN_NFE", "TAIL_BALANCE", "ORDER_MAX_H", "kappa",
           "tail_levels", "sigma_lo", "first_sigma", "auto_plan", "order_for", "data_scale"]

KAPPA0 = 0.04  # sigma_lo = KAPPA0 * (7 / NFE) ** KAPPA_POWER * S
KAPPA_POWER = 1.2
TAIL_FRACTION = 0.08  # r(NFE) = round(TAIL_FRACTION * NFE) tail levels below sigma_lo ...
TAIL_MIN_NFE = 15  # ... for NFE >= TAIL_MIN_NFE (0 below)
TAIL_BALANCE = 3.0  # ... and at least enough that the tail's log step <= TAIL_BALANCE x the main log step
ORDER_MAX_H = {2: 2.0, 3: 1.3, 4: 0.3}  # order q is used when the log step h <= ORDER_MAX_H[q]


def kappa(nfe: int) -> float:
    """sigma_lo / S for a budget."""
    return KAPPA0 * (7.0 / nfe) ** KAPPA_POWER


def tail_levels(nfe: int) -> int:
    """The tail's minimum number of noise levels strictly between sigma_lo and sigma_min."""
    return int(round(TAIL_FRACTION * nfe)) if nfe >= TAIL_MIN_NFE else 0


def sigma_lo(nfe: int, sigma_1: float, sigma_min: float, scale: float) -> float:
    """kappa(nfe) * S clipped to [1.5 sigma_min, sigma_1 e^{-0.01}]."""
    return min(max(kappa(nfe) * scale, 1.5 * sigma_min), sigma_1 * math.exp(-0.01))


def first_sigma(nfe: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> float:
    """sigma_1: the first level after sigma_max of edm.txt Eq. 5 with N = nfe levels (``karras_sigmas``);
    sigma_min for nfe <= 2 (one exponential-Euler step, then the final evaluation)."""
    if nfe <= 2:
        return sigma_min
    return float(karras_sigmas(nfe, sigma_min, sigma_max, rho)[1])


def _balanced(m: int, r: int, s_lo: float, sigma_1: float, sigma_min: float) -> tuple[int, int]:
    """Move levels from the main range to the tail until the tail's log step <= TAIL_BALANCE x the main's."""
    lo_range, hi_range = math.log(s_lo / sigma_min), math.log(sigma_1 / s_lo)
    while m > 1 and lo_range / (r + 1) > TAIL_BALANCE * hi_range / m:
        r, m = r + 1, m - 1
    return m, r


def auto_plan(nfe: int, sigma_1: float, sigma_min: float, scale: float) -> np.ndarray:
    """The noise levels after sigma_1 for one sample of data scale S = ``scale`` (nfe - 2 values, the
    last sigma_min): m levels uniform in log sigma from sigma_1 to sigma_lo, then the tail."""
    left = nfe - 2
    if left < 1:
        return np.zeros(0)
    r = tail_levels(nfe)
    m = left - 1 - r
    s_lo = sigma_lo(nfe, sigma_1, sigma_min, scale)
    if m < 1:
        out = np.exp(np.linspace(math.log(sigma_1), math.log(sigma_min), left + 1))[1:]
        out[-1] = sigma_min
        return out
    if nfe >= TAIL_MIN_NFE:
        m, r = _balanced(m, r, s_lo, sigma_1, sigma_min)
    main = np.exp(np.linspace(math.log(sigma_1), math.log(s_lo), m + 1))[1:]
    tail = np.exp(np.linspace(math.log(s_lo), math.log(sigma_min), r + 2))[1:-1] if r > 0 else np.zeros(0)
    out = np.concatenate([main, tail, [sigma_min]])
    out[-1] = sigma_min
    return out


def order_for(h: np.ndarray, available: int) -> np.ndarray:
    """The predictor order of each row's log step ``h`` (``ORDER_MAX_H``), at most ``available``."""
    p = np.ones(h.shape, dtype=int)
    for q in sorted(ORDER_MAX_H):
        p = np.where(h <= ORDER_MAX_H[q], q, p)
    return np.minimum(p, max(available, 1))


def data_scale(x0: torch.Tensor, d0: torch.Tensor, sigma_0: float, x1: torch.Tensor, d1: torch.Tensor,
               sigma_1: float) -> np.ndarray:
    """Per-sample S = sqrt(2 d var) from D_0 = D(x0; sigma_0) and D_1 = D(x1; sigma_1) (Tweedie, module
    docstring); (B,) float64."""
    b = x0.shape[0]
    v = (x0 / sigma_0**2 - x1 / sigma_1**2).reshape(b, -1).double()
    dd = (d0 - d1).reshape(b, -1).double()
    var = ((v * dd).sum(1) / v.square().sum(1).clamp_min(1e-300)).clamp_min(0).cpu().numpy()
    return np.sqrt(2.0 * x0[0].numel() * var)
