"""Training noise-level distributions in the EDM parametrization (interface: :mod:`.noise_base`).

* :class:`LogNormalSigma`   EDM (edm.txt Table 1, "Ours"): ``ln sigma ~ N(P_mean, P_std^2)``.
* :class:`LogitNormalSigma` SD3 (Esser et al. 2024, Sec. 3.1): rectified-flow time ``t = sigmoid(u)``,
  ``u ~ N(m, s^2)``; with ``sigma = t / (1 - t)`` this is exactly ``ln sigma = u ~ N(m, s^2)``.
* :class:`CosineSigma`      simple diffusion (Hoogeboom et al. 2023, Sec. 3): ``t ~ U(0, 1)``,
  ``logSNR = -2 ln tan(theta)``, ``theta = theta_min + t (theta_max - theta_min)`` clipped so that
  logSNR stays in [logsnr_min, logsnr_max]; ``sigma = exp(-logSNR / 2) = tan(theta)``.
* :class:`VESigma`, :class:`VPSigma`, :class:`IDDPMSigma`: edm.txt Table 1 training distributions.
* :func:`wsnr_aligned`: the WSNR-Equivalent distribution (wsnr.txt Sec. 4), the ``wsnr`` rule of
  :mod:`.shift` applied to any base.

Shifting (``.shift(c)``): log-normal, logit-normal and VE stay in their family (location ``+ c``,
resp. bounds ``x e^c``); cosine, VP and iDDPM become :class:`~.noise_base.Shifted`.  Every sampler
draws float64 through an optional ``torch.Generator`` so a run is reproducible.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from latentdiff.diffusion.grids import iddpm_sigmas, vp_sigma, vp_sigma_inv
from latentdiff.diffusion.noise_base import (Shifted, SigmaDistribution, as64, check_int, check_levels, check_real,
                                             draw, draw_device, register, sigma_distribution_from_dict)
from latentdiff.diffusion.shift import wsnr_log_factor

__all__ = [
    "LogNormalSigma", "LogitNormalSigma", "CosineSigma", "VESigma", "VPSigma", "IDDPMSigma", "Shifted",
    "SigmaDistribution", "sigma_distribution_from_dict", "wsnr_aligned", "rectified_flow_sigma",
    "rectified_flow_time",
]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class _GaussianLogSigma(SigmaDistribution):
    """``ln sigma ~ N(loc, scale^2)``; subclasses name their two fields in ``_loc`` and ``_scale``."""

    _loc: ClassVar[str]
    _scale: ClassVar[str]

    def __post_init__(self):
        name = type(self).__name__
        check_real(name, self._loc, getattr(self, self._loc))
        check_real(name, self._scale, getattr(self, self._scale), lo=0)

    def _loc_scale(self) -> tuple[float, float]:
        return getattr(self, self._loc), getattr(self, self._scale)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        loc, scale = self._loc_scale()
        return torch.exp(loc + scale * draw("randn", n, generator, device))

    def _cdf_log(self, lam):
        loc, scale = self._loc_scale()
        return torch.special.ndtr((lam - loc) / scale)

    def _quantile_log(self, q):
        loc, scale = self._loc_scale()
        return loc + scale * torch.special.ndtri(q)

    def _log_pdf_log(self, lam):
        loc, scale = self._loc_scale()
        return -0.5 * ((lam - loc) / scale).square() - math.log(scale) - _LOG_SQRT_2PI

    @property
    def median_log_sigma(self) -> float:
        return float(getattr(self, self._loc))

    def shift(self, log_factor: float):
        """Same family, location ``+ log_factor``."""
        check_real("shift", "log_factor", log_factor)
        return dataclasses.replace(self, **{self._loc: getattr(self, self._loc) + log_factor})


@register("lognormal")
@dataclass(frozen=True)
class LogNormalSigma(_GaussianLogSigma):
    """``ln sigma ~ N(p_mean, p_std^2)`` (edm.txt Table 1, "Ours": P_mean = -1.2, P_std = 1.2)."""

    p_mean: float = -1.2
    p_std: float = 1.2
    label: ClassVar[str] = "EDM log-normal"
    _loc: ClassVar[str] = "p_mean"
    _scale: ClassVar[str] = "p_std"

    def _params_text(self):
        return f"ln sigma ~ N({self.p_mean:+.4f}, {self.p_std:.4f}^2)"


def rectified_flow_sigma(t):
    """EDM sigma of rectified-flow time t (SD3 Sec. 3.1): ``x_t = (1-t) x0 + t eps`` gives
    ``x_t / (1-t) = x0 + t/(1-t) eps``, so ``sigma = t / (1 - t)``."""
    t = as64(t)
    return t / (1 - t)


def rectified_flow_time(sigma):
    """Inverse of :func:`rectified_flow_sigma`: ``t = sigma / (1 + sigma)``."""
    s = as64(sigma)
    return s / (1 + s)


@register("logit_normal")
@dataclass(frozen=True)
class LogitNormalSigma(_GaussianLogSigma):
    """SD3 logit-normal time sampling (Esser et al. 2024, Sec. 3.1, defaults m = 0, s = 1) in EDM sigma.

    ``pi_ln(t; m, s) = 1/(s sqrt(2 pi)) 1/(t (1-t)) exp(-(logit(t) - m)^2 / (2 s^2))`` is the density of
    ``t = sigmoid(u)``, ``u ~ N(m, s^2)``.  Since ``sigma = t/(1-t)`` (:func:`rectified_flow_sigma`),
    ``ln sigma = logit(t) = u``: the law of ``ln sigma`` is exactly N(m, s^2), the EDM family.  ``m`` is
    measured at SD3's data scale (latents normalized to unit variance); at data scale sigma_data the same
    noise-to-signal ratios need ``m + ln(sigma_data)``, a :meth:`shift`.  SD3's resolution time shift
    (Sec. 5.3.2) ``t' = a t / (1 + (a - 1) t)`` is ``sigma' = a sigma``, i.e. ``m + ln a``.
    Sampling draws ``u`` and returns ``exp(u)`` (= ``t/(1-t)`` without the cancellation near t = 1).
    """

    m: float = 0.0
    s: float = 1.0
    label: ClassVar[str] = "SD3 logit-normal"
    _loc: ClassVar[str] = "m"
    _scale: ClassVar[str] = "s"

    def _params_text(self):
        return f"t = sigmoid(u), u ~ N({self.m:+.4f}, {self.s:.4f}^2) <=> ln sigma ~ N({self.m:+.4f}, {self.s:.4f}^2)"


@register("simple_diffusion_cosine")
@dataclass(frozen=True)
class CosineSigma(SigmaDistribution):
    """The (unshifted) cosine schedule of simple diffusion (Hoogeboom et al. 2023, Sec. 3), t ~ U(0, 1).

    ``alpha_t = cos(pi t / 2)``, ``sigma_t = sin(pi t / 2)`` give ``logSNR(t) = -2 ln tan(pi t / 2)`` and EDM
    ``sigma = tan(pi t / 2)``.  As in their pseudocode the angle is clipped to
    ``[theta_min, theta_max] = [atan(e^(-logsnr_max/2)), atan(e^(-logsnr_min/2))]`` (angle
    ``theta_min + t (theta_max - theta_min)``), so ``ln sigma`` lies in
    ``[-logsnr_max/2, -logsnr_min/2]`` (default +-7.5).  In ``lambda = ln sigma`` the law is a truncated
    hyperbolic secant: ``p(lambda) = 1 / (2 cosh(lambda) (theta_max - theta_min))``,
    ``F(lambda) = (atan(e^lambda) - theta_min) / (theta_max - theta_min)``.
    The resolution-shifted schedule ``logSNR + 2 ln(d_ref/d)`` is ``.shift(ln(d/d_ref))`` (the clip stays
    on the unshifted schedule, as in their code).  The kind is ``simple_diffusion_cosine``, not
    ``cosine``: iDDPM's alpha-bar (:class:`IDDPMSigma`) is a cosine schedule too.
    """

    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    label: ClassVar[str] = "cosine (simple diffusion)"

    def __post_init__(self):
        check_real("CosineSigma", "logsnr_min", self.logsnr_min)
        check_real("CosineSigma", "logsnr_max", self.logsnr_max, lo=self.logsnr_min)

    @property
    def theta_range(self) -> tuple[float, float]:
        """``(theta_min, theta_max)``, the clipped angle range."""
        return math.atan(math.exp(-0.5 * self.logsnr_max)), math.atan(math.exp(-0.5 * self.logsnr_min))

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        lo, hi = self.theta_range
        return torch.tan(lo + (hi - lo) * draw("rand", n, generator, device))

    def _cdf_log(self, lam):
        lo, hi = self.theta_range
        return ((torch.atan(torch.exp(lam)) - lo) / (hi - lo)).clamp(0.0, 1.0)

    def _quantile_log(self, q):
        lo, hi = self.theta_range
        return torch.log(torch.tan(lo + (hi - lo) * q))

    def _log_pdf_log(self, lam):
        lo, hi = self.theta_range
        a = lam.abs()
        log_2cosh = a + torch.log1p(torch.exp(-2 * a))
        inside = (lam >= -0.5 * self.logsnr_max) & (lam <= -0.5 * self.logsnr_min)
        return torch.where(inside, -log_2cosh - math.log(hi - lo), -torch.inf)

    def _params_text(self):
        return f"sigma = tan(theta), theta ~ U(angles of logSNR {self.logsnr_max:+g} .. {self.logsnr_min:+g})"


@register("ve")
@dataclass(frozen=True)
class VESigma(SigmaDistribution):
    """``ln sigma ~ U(ln sigma_min, ln sigma_max)`` (edm.txt Table 1, VE: 0.02 .. 100)."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0
    label: ClassVar[str] = "VE log-uniform"

    def __post_init__(self):
        check_real("VESigma", "sigma_min", self.sigma_min, lo=0)
        check_real("VESigma", "sigma_max", self.sigma_max, lo=self.sigma_min)

    @property
    def _bounds(self):
        return math.log(self.sigma_min), math.log(self.sigma_max)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        lo, hi = self._bounds
        return torch.exp(lo + (hi - lo) * draw("rand", n, generator, device))

    def _cdf_log(self, lam):
        lo, hi = self._bounds
        return ((lam - lo) / (hi - lo)).clamp(0.0, 1.0)

    def _quantile_log(self, q):
        lo, hi = self._bounds
        return lo + (hi - lo) * q

    def _log_pdf_log(self, lam):
        lo, hi = self._bounds
        return torch.where((lam >= lo) & (lam <= hi), as64(-math.log(hi - lo)), -torch.inf)

    def shift(self, log_factor: float) -> "VESigma":
        """Same family, both bounds ``x exp(log_factor)``."""
        check_real("shift", "log_factor", log_factor)
        f = math.exp(log_factor)
        return VESigma(self.sigma_min * f, self.sigma_max * f)

    def _params_text(self):
        return f"ln sigma ~ U(ln {self.sigma_min:.4g}, ln {self.sigma_max:.4g})"


@register("vp")
@dataclass(frozen=True)
class VPSigma(SigmaDistribution):
    """``t ~ U(eps_t, 1)``, ``sigma = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)`` (edm.txt Table 1, VP).

    ``F(sigma) = (t(sigma) - eps_t) / (1 - eps_t)`` with ``t(sigma)`` the closed-form inverse; the density
    of ``ln sigma`` is ``dt/dln(sigma) / (1 - eps_t)``,
    ``dt/dln(sigma) = 2 sigma^2 / ((1 + sigma^2) sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)))``.
    """

    beta_d: float = 19.9
    beta_min: float = 0.1
    eps_t: float = 1e-5
    label: ClassVar[str] = "VP"

    def __post_init__(self):
        check_real("VPSigma", "beta_d", self.beta_d, lo=0)
        check_real("VPSigma", "beta_min", self.beta_min, lo=0, lo_open=False)
        check_real("VPSigma", "eps_t", self.eps_t, lo=0, hi=1)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        t = self.eps_t + (1 - self.eps_t) * draw("rand", n, generator, device)
        return vp_sigma(t, self.beta_d, self.beta_min)

    def _cdf_log(self, lam):
        t = vp_sigma_inv(torch.exp(lam), self.beta_d, self.beta_min)
        return ((t - self.eps_t) / (1 - self.eps_t)).clamp(0.0, 1.0)

    def _quantile_log(self, q):
        return torch.log(vp_sigma(self.eps_t + (1 - self.eps_t) * q, self.beta_d, self.beta_min))

    def _log_pdf_log(self, lam):
        l1p = torch.log1p(torch.exp(2 * lam))  # ln(1 + sigma^2)
        val = (math.log(2) + 2 * lam - l1p - 0.5 * torch.log(self.beta_min**2 + 2 * self.beta_d * l1p)
               - math.log(1 - self.eps_t))
        lo, hi = (float(v) for v in self._quantile_log(as64([0.0, 1.0])))
        return torch.where((lam >= lo) & (lam <= hi), val, -torch.inf)

    def _params_text(self):
        return f"t ~ U({self.eps_t:g}, 1), beta_d = {self.beta_d:g}, beta_min = {self.beta_min:g}"


@functools.lru_cache(maxsize=8)
def _iddpm_levels(M: int, C1: float, C2: float) -> torch.Tensor:
    """``u_0 > ... > u_M = 0`` of edm.txt Table 1 (cached: the recursion is a Python loop over M)."""
    return iddpm_sigmas(M, C1, C2)


@register("iddpm")
@dataclass(frozen=True)
class IDDPMSigma(SigmaDistribution):
    """``sigma = u_j``, ``j ~ U{0, ..., M-1}`` (edm.txt Table 1, iDDPM): a discrete law with M atoms.

    ``cdf`` and ``quantile`` are the step function and its generalized inverse; there is no density,
    so :meth:`log_pdf` refuses and :meth:`log_pmf` gives ``-ln M`` on the atoms.
    """

    M: int = 1000
    C1: float = 0.001
    C2: float = 0.008
    label: ClassVar[str] = "iDDPM"

    def __post_init__(self):
        check_int("IDDPMSigma", "M", self.M, lo=1)
        check_real("IDDPMSigma", "C1", self.C1, lo=0, hi=1, hi_open=False)
        check_real("IDDPMSigma", "C2", self.C2, lo=0, lo_open=False)

    @property
    def atoms(self) -> torch.Tensor:
        """The M training levels ``u_{M-1} < ... < u_0`` (ascending; ``u_M = 0`` is never drawn)."""
        return _iddpm_levels(int(self.M), float(self.C1), float(self.C2))[: self.M].flip(0)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """An index ``j ~ U{0..M-1}`` into ``u_0 > u_1 > ...`` (edm.txt Table 1)."""
        dev = draw_device(n, generator, device)
        u = _iddpm_levels(int(self.M), float(self.C1), float(self.C2))
        j = torch.randint(0, self.M, (int(n),), generator=generator, device=dev)
        out = u.to(dev)[j]
        return out if device is None else out.to(device)

    def _cdf_log(self, lam):
        log_atoms = torch.log(self.atoms).to(lam.device)
        k = torch.searchsorted(log_atoms, lam.contiguous(), right=True)
        return k.to(torch.float64) / self.M

    def _atom_index(self, q):
        levels = torch.arange(1, self.M + 1, dtype=torch.float64, device=q.device) / self.M  # cdf at the atoms
        return torch.searchsorted(levels, q.contiguous(), right=False).clamp(max=self.M - 1)

    def _quantile_log(self, q):
        return torch.log(self.atoms.to(q.device)[self._atom_index(q)])

    def quantile(self, q) -> torch.Tensor:
        """The atom itself (no log/exp round trip): the smallest u_j with ``cdf(u_j) >= q``."""
        q = check_levels(q)
        return self.atoms.to(q.device)[self._atom_index(q)]

    def _log_pdf_log(self, lam):
        raise TypeError("IDDPMSigma is discrete (M atoms) and has no density; use log_pmf(sigma)")

    def log_pmf(self, sigma) -> torch.Tensor:
        """``-ln M`` where sigma is one of the atoms (exact match), ``-inf`` elsewhere."""
        s = as64(sigma)
        hit = torch.isin(s, self.atoms.to(s.device))
        return torch.where(hit, as64(-math.log(self.M)), -torch.inf)

    def _params_text(self):
        return f"sigma = u_j, j ~ U{{0..{self.M - 1}}}, C1 = {self.C1:g}, C2 = {self.C2:g}"


def wsnr_aligned(base: SigmaDistribution, power_ref, power_target, *, include_dc: bool = True) -> SigmaDistribution:
    """WSNR-Equivalent training distribution (wsnr.txt Sec. 4): ``base.shift(0.5 ln(K_target / K_ref))``.

    The law of sigma' on the *target* data whose WSNR law equals that of ``base`` on the *reference*
    data: WSNR(P, sigma) = K(P)/sigma^2 (Eq. 2-3), so ``sigma' = sigma sqrt(K_target / K_ref)``.  A
    log-normal stays log-normal with ``p_mean' = p_mean + 0.5 ln(K_target / K_ref)`` and the same ``p_std``.
    """
    return base.shift(wsnr_log_factor(power_ref, power_target, include_dc=include_dc))
