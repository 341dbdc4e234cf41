"""Noise-level grids: the VP and iDDPM schedules of edm.txt Table 1, the sampling grid of Eq. 5 and the
log-uniform grid (uniform in lambda = -log sigma, i.e. in log-SNR; Eq. 5's limit rho -> infinity).

Every function returns float64 sigmas (not log-sigmas).
"""
from __future__ import annotations

import math

import torch

__all__ = ["EDM_SIGMA_MIN", "EDM_SIGMA_MAX", "VP_SIGMA_MAX", "vp_sigma", "vp_sigma_inv", "iddpm_sigmas", "karras_sigmas",
           "loguniform_sigmas"]

EDM_SIGMA_MIN = 0.002  # edm.txt Table 1, "Ours"
EDM_SIGMA_MAX = 80.0  # edm.txt Table 1, "Ours"

def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1):
    """VP schedule ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` (edm.txt Table 1)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.sqrt(torch.expm1(0.5 * beta_d * t.square() + beta_min * t))


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1):
    """Inverse of :func:`vp_sigma`: ``t = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d``."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return (torch.sqrt(beta_min**2 + 2 * beta_d * torch.log1p(s.square())) - beta_min) / beta_d


VP_SIGMA_MAX = float(vp_sigma(1.0))  # sigma(t=1) ~= 152, the VP sampler's starting noise level

def iddpm_sigmas(M: int = 1000, C1: float = 0.001, C2: float = 0.008) -> torch.Tensor:
    """The iDDPM noise levels ``u_0 > ... > u_M = 0`` (edm.txt Table 1), float64, length M + 1.

    ``u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C1) - 1)``,
    ``abar_j = sin^2(pi/2 * j / (M (C2 + 1)))``.
    """
    j = torch.arange(M + 1, dtype=torch.float64)
    abar = torch.sin(0.5 * math.pi * j / (M * (C2 + 1))).square()
    u = torch.zeros(M + 1, dtype=torch.float64)
    for k in range(M, 0, -1):
        ratio = max(float(abar[k - 1] / abar[k]), C1)
        u[k - 1] = math.sqrt((float(u[k]) ** 2 + 1) / ratio - 1)
    return u

def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Eq. 5 of edm.txt: ``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.

    Returns ``steps + 1`` float64 values: ``steps`` strictly decreasing noise levels from
    ``sigma_max`` to ``sigma_min`` (both hit exactly) followed by an appended 0.
    ``steps == 1`` gives ``[sigma_max, 0]`` (Eq. 5 needs N >= 2; one point has only sigma_max).
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    steps = int(steps)
    if steps == 1:
        return torch.tensor([float(sigma_max), 0.0], dtype=torch.float64)
    i = torch.arange(steps, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    s = (a + i / (steps - 1) * (b - a)) ** rho
    s[0], s[-1] = sigma_max, sigma_min
    return torch.cat([s, s.new_zeros(1)])


def loguniform_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """``sigma_i = exp(log sigma_max + i/(N-1) (log sigma_min - log sigma_max))``: uniform in log sigma (the
    limit of edm.txt Eq. 5 as rho -> infinity; DPM-Solver's "logSNR" grid), ``steps`` levels from sigma_max
    to sigma_min (both exact) and an appended 0, float64.  ``steps == 1`` gives ``[sigma_max, 0]``."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    steps = int(steps)
    if steps == 1:
        return torch.tensor([float(sigma_max), 0.0], dtype=torch.float64)
    i = torch.arange(steps, dtype=torch.float64)
    s = torch.exp(math.log(sigma_max) + i / (steps - 1) * (math.log(sigma_min) - math.log(sigma_max)))
    s[0], s[-1] = sigma_max, sigma_min
    return torch.cat([s, s.new_zeros(1)])
