"""Runge-Kutta steps of wsnr.txt Algorithm 3 with the tableaux of Table 5, and edm.txt Algorithms 1-2.

Ambiguities of the papers and how they are resolved here
--------------------------------------------------------
1. Table 5, Ode3: the extracted table lost the entry A_21 of the row c_2 = 1.  Every explicit RK
   tableau satisfies the row-sum condition sum_v A_uv = c_u, which forces A_21 = 1; the result
   is the third-order Shu-Osher (SSPRK3) tableau c = (0, 1, 1/2), A_21 = 1, A_31 = A_32 = 1/4,
   b = (1/6, 1/6, 2/3).
2. Algorithm 3 computes stage u's noise level as exp(lambda_i + c_u (lambda_{i-1} - lambda_i)).
   For c_u = 0 and c_u = 1 we return sigma_i and sigma_{i-1} *exactly* (exp(log(s)) can differ
   from s by one ulp), so a log-placed Heun step is bitwise EDM's Heun step (Algorithm 1), which
   is therefore not written a second time.
3. Algorithm 3 divides A_uv by c_u; the first stage has c_1 = 0 and no A entries, so no division
   by zero occurs; tableaux with c_u = 0 for u > 1 are rejected.
4. Stepping to sigma = 0 is only defined for Euler (log 0 and the 1/sigma of the slope are
   undefined); ``ode_step`` refuses other methods there.  Every sampler's last step, sigma_min -> 0,
   is Euler and counts as one evaluation (Alg. 2 line 5; edm.txt Alg. 1 "revert to Euler").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latentdiff.solvers.base import Denoise, randn_like, slope

__all__ = ["Tableau", "TABLEAUX", "stage_sigma", "ode_step", "rk_sampler", "heun_sampler", "stochastic_sampler"]


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta Butcher tableau: nodes ``c``, strictly lower ``A`` rows, weights ``b``."""

    c: tuple[float, ...]
    A: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]

    def __post_init__(self):
        s = len(self.c)
        if len(self.A) != s or len(self.b) != s:
            raise ValueError("c, A and b must describe the same number of stages")
        if self.c[0] != 0:
            raise ValueError("an explicit tableau starts with c_1 = 0")
        for u, row in enumerate(self.A):
            if len(row) != u:
                raise ValueError(f"row {u + 1} of A must have {u} entries (explicit method)")
            if u > 0 and self.c[u] <= 0:
                raise ValueError("Algorithm 3 divides by c_u: every stage after the first needs c_u > 0")
            if abs(sum(row) - self.c[u]) > 1e-12:
                raise ValueError(f"row {u + 1} of A does not sum to c_{u + 1} (row-sum condition)")
        if abs(sum(self.b) - 1) > 1e-12:
            raise ValueError("the weights b must sum to 1 (consistency)")

    @property
    def stages(self) -> int:
        return len(self.c)


# wsnr.txt Table 5 (Ode3: see ambiguity 1).
TABLEAUX: dict[str, Tableau] = {
    "euler": Tableau(c=(0.0,), A=((),), b=(1.0,)),
    "midpoint": Tableau(c=(0.0, 0.5), A=((), (0.5,)), b=(0.0, 1.0)),
    "heun": Tableau(c=(0.0, 1.0), A=((), (1.0,)), b=(0.5, 0.5)),
    "ode3": Tableau(c=(0.0, 1.0, 0.5), A=((), (1.0,), (0.25, 0.25)), b=(1 / 6, 1 / 6, 2 / 3)),
}


def _tableau(method) -> Tableau:
    if isinstance(method, Tableau):
        return method
    if method not in TABLEAUX:
        raise ValueError(f"unknown ODE method {method!r}; expected one of {sorted(TABLEAUX)} or a Tableau")
    return TABLEAUX[method]


def stage_sigma(sigma: float, sigma_next: float, c: float, placement: str = "log") -> float:
    """Noise level of a stage with node ``c`` on the step sigma -> sigma_next.

    ``log``: exp(lambda_i + c (lambda_{i-1} - lambda_i)) (wsnr.txt Alg. 3 line 5);
    ``classical``: sigma + c (sigma_next - sigma) (textbook RK in sigma).
    """
    if c == 0:
        return float(sigma)
    if c == 1:
        return float(sigma_next)
    if placement == "log":
        return math.exp(math.log(sigma) + c * (math.log(sigma_next) - math.log(sigma)))
    if placement == "classical":
        return float(sigma) + c * (float(sigma_next) - float(sigma))
    raise ValueError(f"placement must be 'log' or 'classical', got {placement!r}")


def ode_step(
    denoise: Denoise,
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    method="heun",
    *,
    placement: str = "log",
) -> torch.Tensor:
    """One step x_i -> x_{i-1} from ``sigma`` to ``sigma_next`` (wsnr.txt Algorithm 3).

    Stage u is evaluated at sigma_u = ``stage_sigma(sigma, sigma_next, c_u, placement)`` and
    x_u = x_i + (sigma_u - sigma_i) * sum_v (A_uv / c_u) k_v; the step returns
    x_i + (sigma_{i-1} - sigma_i) * sum_u b_u k_u with k_u = (x_u - D(x_u; sigma_u)) / sigma_u.
    With ``placement="classical"`` this is exactly the textbook RK method of the tableau.
    """
    tab = _tableau(method)
    sigma, sigma_next = float(sigma), float(sigma_next)
    if sigma <= 0:
        raise ValueError(f"ode_step starts from sigma > 0, got {sigma}")
    if sigma_next == 0 and tab.stages > 1:
        raise ValueError("a step to sigma = 0 must be Euler: the stage slopes divide by sigma (Alg. 2 line 5)")
    ks: list[torch.Tensor] = []
    for u in range(tab.stages):
        s_u = stage_sigma(sigma, sigma_next, tab.c[u], placement)
        if u == 0:
            x_u = x
        else:
            k = sum(ks[v] * (tab.A[u][v] / tab.c[u]) for v in range(u) if tab.A[u][v] != 0)
            x_u = x + k * (s_u - sigma)
        ks.append(slope(denoise, x_u, s_u))
    return x + (sigma_next - sigma) * sum(ks[u] * tab.b[u] for u in range(tab.stages) if tab.b[u] != 0)


def rk_sampler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, method="heun", *, placement="log") -> torch.Tensor:
    """Integrate from ``sigmas[0]`` down the grid with one method; the final step to 0 is Euler.

    ``x`` must already be at noise level ``sigmas[0]`` (i.e. noise * sigma_max).
    """
    sig = [float(s) for s in sigmas]
    for i in range(len(sig) - 1):
        m = "euler" if sig[i + 1] == 0 else method
        x = ode_step(denoise, x, sig[i], sig[i + 1], m, placement=placement)
    return x


def heun_sampler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """edm.txt Algorithm 1 with sigma(t) = t, s(t) = 1: Heun steps, the last step to 0 Euler
    (the log-placed Heun tableau is this algorithm bit for bit, see ambiguity 2)."""
    return rk_sampler(denoise, x, sigmas, "heun")


def stochastic_sampler(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator=None,
) -> torch.Tensor:
    """edm.txt Algorithm 2: Heun with Langevin-like "churn".

    gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in [S_tmin, S_tmax] else 0, with N the number
    of steps; t_hat = t_i + gamma_i t_i; x_hat = x_i + sqrt(t_hat^2 - t_i^2) eps,
    eps ~ N(0, S_noise^2 I), then one Heun step t_hat -> t_{i+1} (Euler to 0).  With S_churn = 0 it is
    exactly ``heun_sampler``.
    ``generator`` may be a list with one generator per image (batch-size independent results).
    """
    sig = [float(s) for s in sigmas]
    n = len(sig) - 1
    for i in range(n):
        t_cur, t_next = sig[i], sig[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * randn_like(x, generator)
        else:
            x_hat = x
        x = ode_step(denoise, x_hat, t_hat, t_next, "euler" if t_next == 0 else "heun")
    return x
