"""Data-distance statistics and the data-driven sigma_max (wsnr.txt Eq. 6-8)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["DistanceStats", "data_driven_sigma_max", "p_upper_bound"]


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
