"""Training noise-level distributions (edm.txt Table 1, "Noise distribution").

EDM log-normal, VP (``sigma^-1(sigma) ~ U(eps_t, 1)``), VE (log-uniform), iDDPM (discrete ``u_j``),
and the WSNR-aligned log-normal (wsnr.txt Sec. 4).

Every distribution returns sigmas (not log-sigmas) and draws through an optional
``torch.Generator`` so a run is reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import torch

from latentdiff.diffusion.grids import iddpm_sigmas, vp_sigma
from latentdiff.diffusion.spectral import wsnr_constant

__all__ = [
    "LogNormalSigma",
    "VPSigma",
    "VESigma",
    "IDDPMSigma",
    "sigma_distribution_from_dict",
    "wsnr_aligned",
]


def _randn(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    dev = generator.device if generator is not None else (device or "cpu")
    return torch.randn(n, generator=generator, device=dev, dtype=torch.float64)


def _rand(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    dev = generator.device if generator is not None else (device or "cpu")
    return torch.rand(n, generator=generator, device=dev, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Training sigma distributions (edm.txt Table 1)


@dataclass(frozen=True)
class LogNormalSigma:
    """``ln(sigma) ~ N(p_mean, p_std**2)`` (edm.txt Table 1, "Ours": P_mean = -1.2, P_std = 1.2)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self):
        if not (math.isfinite(self.p_mean) and math.isfinite(self.p_std)) or self.p_std <= 0:
            raise ValueError(f"LogNormalSigma needs a finite p_mean and p_std > 0, got {self.p_mean}, {self.p_std}")

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.exp(self.p_mean + self.p_std * _randn(n, generator, device))

    def log_pdf(self, sigma) -> torch.Tensor:
        """Log density of ``ln(sigma)`` (the density drawn in wsnr.txt Fig. 1, left)."""
        z = (torch.log(torch.as_tensor(sigma, dtype=torch.float64)) - self.p_mean) / self.p_std
        return -0.5 * z.square() - math.log(self.p_std * math.sqrt(2 * math.pi))

    def quantile(self, q) -> torch.Tensor:
        q = torch.as_tensor(q, dtype=torch.float64)
        return torch.exp(self.p_mean + self.p_std * math.sqrt(2.0) * torch.erfinv(2 * q - 1))

    def to_dict(self) -> dict:
        return {"kind": "lognormal", "p_mean": self.p_mean, "p_std": self.p_std}

@dataclass(frozen=True)
class VPSigma:
    """``sigma^-1(sigma) ~ U(eps_t, 1)`` with the VP schedule (edm.txt Table 1: beta_d 19.9, beta_min 0.1, eps_t 1e-5)."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    eps_t: float = 1e-5

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        t = self.eps_t + (1 - self.eps_t) * _rand(n, generator, device)
        return vp_sigma(t, self.beta_d, self.beta_min)

    def to_dict(self) -> dict:
        return {"kind": "vp", "beta_d": self.beta_d, "beta_min": self.beta_min, "eps_t": self.eps_t}


@dataclass(frozen=True)
class VESigma:
    """``ln(sigma) ~ U(ln sigma_min, ln sigma_max)`` (edm.txt Table 1, VE: 0.02 .. 100)."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"VESigma needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(lo + (hi - lo) * _rand(n, generator, device))

    def to_dict(self) -> dict:
        return {"kind": "ve", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

@dataclass(frozen=True)
class IDDPMSigma:
    """``sigma = u_j, j ~ U{0, ..., M-1}`` (edm.txt Table 1, iDDPM)."""

    M: int = 1000
    C1: float = 0.001
    C2: float = 0.008

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        u = iddpm_sigmas(self.M, self.C1, self.C2)
        dev = generator.device if generator is not None else (device or "cpu")
        j = torch.randint(0, self.M, (n,), generator=generator, device=dev)
        return u.to(dev)[j]

    def to_dict(self) -> dict:
        return {"kind": "iddpm", "M": self.M, "C1": self.C1, "C2": self.C2}


def sigma_distribution_from_dict(d: dict):
    """Inverse of ``.to_dict()`` for every training distribution (used by checkpoints and exports)."""
    d = dict(d)
    kind = d.pop("kind", None)
    classes = {"lognormal": LogNormalSigma, "vp": VPSigma, "ve": VESigma, "iddpm": IDDPMSigma}
    if kind not in classes:
        raise ValueError(f"unknown sigma distribution kind {kind!r}; expected one of {sorted(classes)}")
    return classes[kind](**d)


def wsnr_aligned(base: LogNormalSigma, power_ref, power_target, *, include_dc: bool = True) -> LogNormalSigma:
    """WSNR-Equivalent training distribution (wsnr.txt Sec. 4).

    Returns the distribution of sigma' on the *target* data whose WSNR distribution equals
    that of ``base`` on the *reference* data.  WSNR(P, sigma) = K(P)/sigma^2 (Eq. 2-3), so
    ``sigma' = sigma * sqrt(K_target / K_ref)``: a log-normal stays log-normal with
    ``p_mean' = p_mean + 0.5 * ln(K_target / K_ref)`` and the same ``p_std``.
    """
    if not isinstance(base, LogNormalSigma):
        raise TypeError("wsnr_aligned shifts a LogNormalSigma; got " + type(base).__name__)
    k_ref = float(wsnr_constant(power_ref, include_dc=include_dc))
    k_tgt = float(wsnr_constant(power_target, include_dc=include_dc))
    return LogNormalSigma(base.p_mean + 0.5 * math.log(k_tgt / k_ref), base.p_std)
