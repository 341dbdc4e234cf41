"""Noise levels: training sigma distributions, sampling sigma grids, data-driven sigma_max.

* Training distributions (edm.txt Table 1, "Noise distribution"): EDM log-normal,
  VP (``sigma^-1(sigma) ~ U(eps_t, 1)``), VE (log-uniform), iDDPM (discrete ``u_j``),
  and the WSNR-aligned log-normal (wsnr.txt Sec. 4).
* Sampling grids: Karras et al. Eq. 5 (``karras_sigmas``) and the iDDPM ``u_j`` table.
* Data-driven sigma_max (wsnr.txt Eq. 6-8) from exact, O(N) distance statistics.

Every distribution returns sigmas (not log-sigmas) and draws through an optional
``torch.Generator`` so a run is reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .spectral import wsnr_constant

__all__ = [
    "LogNormalSigma",
    "VPSigma",
    "VESigma",
    "IDDPMSigma",
    "sigma_distribution_from_dict",
    "wsnr_aligned",
    "vp_sigma",
    "vp_sigma_inv",
    "iddpm_sigmas",
    "karras_sigmas",
    "DistanceStats",
    "data_driven_sigma_max",
    "p_upper_bound",
    "EDM_SIGMA_MIN",
    "EDM_SIGMA_MAX",
    "VP_SIGMA_MAX",
]

EDM_SIGMA_MIN = 0.002  # edm.txt Table 1, "Ours"
EDM_SIGMA_MAX = 80.0  # edm.txt Table 1, "Ours"


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


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1):
    """VP schedule ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` (edm.txt Table 1)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.sqrt(torch.expm1(0.5 * beta_d * t.square() + beta_min * t))


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1):
    """Inverse of :func:`vp_sigma`: ``t = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d``."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return (torch.sqrt(beta_min**2 + 2 * beta_d * torch.log1p(s.square())) - beta_min) / beta_d


VP_SIGMA_MAX = float(vp_sigma(1.0))  # sigma(t=1) ~= 152, the VP sampler's starting noise level


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


# ----------------------------------------------------------------------------------------------
# Sampling grids


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


# ----------------------------------------------------------------------------------------------
# Distance statistics and the data-driven sigma_max (wsnr.txt Eq. 6-8)


class DistanceStats:
    """Exact mean/std over data points of each point's mean squared distance to all others (Eq. 6).

    For point i, ``d_i^2 = 1/(N-1) sum_{j != i} ||y_i - y_j||^2``.  With
    ``a_i = ||y_i - ybar||^2`` and ``S = sum_j a_j`` one has
    ``sum_j ||y_i - y_j||^2 = N a_i + S``, hence
    ``mean_i d_i^2 = 2 N mean(a) / (N-1)`` and ``std_i d_i^2 = N std(a) / (N-1)``.
    Two streaming passes, O(N) time and memory independent of N:

    1. ``update_mean(y)`` over all data (the float64 sum of points), then ``finish_mean()``;
    2. ``update_distances(y)`` over all data again: per-channel ``a_ic = ||y_ic - ybar_c||^2``
       summed as ``sum_i a_ic`` (C) and ``sum_i a_ic a_id`` (C x C).

    Keeping the per-channel moments makes the result exact for *any* per-channel affine
    normalization ``y'_c = s_c (y_c - m_c)``: shifts cancel in distances and
    ``a'_i = sum_c s_c^2 a_ic``.  ``moments(scale)`` returns (mu_d, sigma_d) for that scale.
    Everything is float64; both passes merge across ranks by summation.
    """

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None  # pass 1: sum of points, float64, sample shape
        self.mean: torch.Tensor | None = None
        self.n2 = 0
        self.sum_a: torch.Tensor | None = None  # pass 2: (C,)
        self.sum_aa: torch.Tensor | None = None  # pass 2: (C, C)

    @staticmethod
    def _flat(y: torch.Tensor) -> torch.Tensor:
        if y.ndim < 2:
            raise ValueError(f"expected a batch (B, C, ...) of points, got shape {tuple(y.shape)}")
        y = y.detach().to("cpu", torch.float64)
        return y.reshape(y.shape[0], y.shape[1], -1)

    # pass 1 ----------------------------------------------------------------------------------
    def update_mean(self, y: torch.Tensor) -> "DistanceStats":
        if self.mean is not None:
            raise RuntimeError("finish_mean() was already called; start pass 2 with update_distances()")
        f = self._flat(y)
        s = f.sum(dim=0)
        if self.sum is None:
            self.sum = s
        elif self.sum.shape != s.shape:
            raise ValueError(f"point shape changed from {tuple(self.sum.shape)} to {tuple(s.shape)}")
        else:
            self.sum += s
        self.n += f.shape[0]
        return self

    def finish_mean(self) -> "DistanceStats":
        if self.n < 2:
            raise ValueError(f"distance statistics need at least 2 points, got {self.n}")
        self.mean = self.sum / self.n
        return self

    # pass 2 ----------------------------------------------------------------------------------
    def update_distances(self, y: torch.Tensor) -> "DistanceStats":
        if self.mean is None:
            raise RuntimeError("call finish_mean() after pass 1 before update_distances()")
        f = self._flat(y)
        if f.shape[1:] != self.mean.shape:
            raise ValueError(f"point shape {tuple(f.shape[1:])} does not match pass 1's {tuple(self.mean.shape)}")
        a = (f - self.mean).square().sum(dim=-1)  # (B, C)
        if self.sum_a is None:
            self.sum_a = a.sum(dim=0)
            self.sum_aa = a.T @ a
        else:
            self.sum_a += a.sum(dim=0)
            self.sum_aa += a.T @ a
        self.n2 += f.shape[0]
        return self

    def merge(self, other: "DistanceStats") -> "DistanceStats":
        """Add another accumulator's sums (same pass)."""
        if other.sum is not None and self.mean is None:
            self.sum = other.sum.clone() if self.sum is None else self.sum + other.sum
            self.n += other.n
        if other.sum_a is not None:
            self.sum_a = other.sum_a.clone() if self.sum_a is None else self.sum_a + other.sum_a
            self.sum_aa = other.sum_aa.clone() if self.sum_aa is None else self.sum_aa + other.sum_aa
            self.n2 += other.n2
        return self

    def all_reduce_mean(self, shape: Sequence[int]) -> "DistanceStats":
        """Sum pass-1 state over all ranks (every rank calls); ``shape`` = (C, H*W...) of one point flattened per channel or (C, H, W)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        c = shape[0]
        numel = math.prod(shape[1:])
        buf = torch.zeros(c * numel + 1, dtype=torch.float64)
        if self.sum is not None:
            buf[:-1] = self.sum.flatten()
        buf[-1] = self.n
        dist.all_reduce(buf)
        self.sum = buf[:-1].reshape(c, numel).clone()
        self.n = int(round(buf[-1].item()))
        return self

    def all_reduce_distances(self, channels: int) -> "DistanceStats":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        buf = torch.zeros(channels + channels * channels + 1, dtype=torch.float64)
        if self.sum_a is not None:
            buf[:channels] = self.sum_a
            buf[channels:-1] = self.sum_aa.flatten()
        buf[-1] = self.n2
        dist.all_reduce(buf)
        self.sum_a = buf[:channels].clone()
        self.sum_aa = buf[channels:-1].reshape(channels, channels).clone()
        self.n2 = int(round(buf[-1].item()))
        return self

    # results ---------------------------------------------------------------------------------
    def _check_complete(self):
        if self.sum_a is None:
            raise RuntimeError("pass 2 (update_distances) has not seen any data")
        if self.n2 != self.n:
            raise RuntimeError(f"pass 1 saw {self.n} points but pass 2 saw {self.n2}; both passes must cover the same data")

    def _scale2(self, scale) -> torch.Tensor:
        c = self.sum_a.shape[0]
        if scale is None:
            return torch.ones(c, dtype=torch.float64)
        s = torch.as_tensor(scale, dtype=torch.float64).flatten()
        if s.numel() == 1:
            s = s.expand(c)
        if s.numel() != c:
            raise ValueError(f"scale has {s.numel()} entries, the data has {c} channels")
        return s.square()

    def moments(self, scale=None) -> tuple[float, float]:
        """(mu_d, sigma_d) of ``d_i^2`` over the dataset after scaling channel c by ``scale[c]``."""
        self._check_complete()
        w = self._scale2(scale)
        n = self.n
        mean_a = float(w @ self.sum_a) / n
        mean_aa = float(w @ self.sum_aa @ w) / n
        var_a = max(mean_aa - mean_a**2, 0.0)
        return 2 * n * mean_a / (n - 1), n * math.sqrt(var_a) / (n - 1)

    @property
    def mu_d(self) -> float:
        return self.moments()[0]

    @property
    def sigma_d(self) -> float:
        return self.moments()[1]

    def per_point(self, y: torch.Tensor, scale=None) -> torch.Tensor:
        """``d_i^2`` for the points ``y`` (which must belong to the dataset), float64 (B,)."""
        self._check_complete()
        w = self._scale2(scale)
        a = (self._flat(y) - self.mean).square().sum(dim=-1) @ w
        s_total = float(w @ self.sum_a)
        return (self.n * a + s_total) / (self.n - 1)

    def state_dict(self) -> dict:
        return {
            "n": self.n,
            "mean": self.mean,
            "sum_a": self.sum_a,
            "sum_aa": self.sum_aa,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "DistanceStats":
        st = cls()
        st.n = st.n2 = int(state["n"])
        st.mean = None if state.get("mean") is None else torch.as_tensor(state["mean"], dtype=torch.float64)
        st.sum = None if st.mean is None else st.mean * st.n
        st.sum_a = torch.as_tensor(state["sum_a"], dtype=torch.float64)
        st.sum_aa = torch.as_tensor(state["sum_aa"], dtype=torch.float64)
        return st

    @classmethod
    def from_tensor(cls, data: torch.Tensor, batch_size: int = 4096) -> "DistanceStats":
        """Both passes over an in-memory dataset (B, C, ...)."""
        st = cls()
        for i in range(0, data.shape[0], batch_size):
            st.update_mean(data[i : i + batch_size])
        st.finish_mean()
        for i in range(0, data.shape[0], batch_size):
            st.update_distances(data[i : i + batch_size])
        return st


def data_driven_sigma_max(stats, alpha: float = 2.0, scale=None) -> float:
    """Data-driven sigma_max = ||d|| with ``||d||^2 = mu_d + alpha * sigma_d`` (wsnr.txt Eq. 7-8).

    ``stats`` is a :class:`DistanceStats` (optionally with a per-channel ``scale``) or a
    ``(mu_d, sigma_d)`` pair.  The paper does not state alpha; by Chebyshev (Eq. 7) at most
    ``1/alpha^2`` of the points lie above the proxy.  Default 2 (one-sided Gaussian coverage
    ~98%, the coverage Fig. 6 reports).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if isinstance(stats, DistanceStats):
        mu_d, sd_d = stats.moments(scale)
    else:
        mu_d, sd_d = (float(v) for v in stats)
    return math.sqrt(mu_d + alpha * sd_d)


def p_upper_bound(sigma, d2: float, n: int) -> torch.Tensor:
    """Eq. 8: ``p_ub(sigma) ~= 1 / (1 + (N-1) exp(-||d||^2 / (2 sigma^2)))``, float64.

    The largest softmax weight one data point can keep at noise level sigma (Jensen bound of
    Eq. 6 without the zero-mean dot-product term); it tends to 1/N as sigma grows.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    # 1 / (1 + exp(log(N-1) - d2/(2 s^2))) evaluated stably with a sigmoid
    return torch.sigmoid(-(math.log(n - 1) - d2 / (2 * s.square())))
