"""Training-free multistep peers for dx/dsigma = (x - D(x; sigma)) / sigma (wsnr.txt Eq. 1; edm.txt Eq. 4
with sigma(t) = t, s(t) = 1): iPNDM, UniPC (bh2) and DEIS-tAB, each on any decreasing sigma grid.

Convention (the registry's): ``sigmas`` are N positive levels sigma_0 > ... > sigma_{N-1} = sigma_min
followed by an appended 0; ``x`` is at sigma_0.  One evaluation per level: N - 1 are spent on the
steps sigma_0 -> sigma_{N-1}, and the last is the Euler step sigma_{N-1} -> 0, whose result is
D(x(sigma_min); sigma_min).  So NFE = N, exactly, counted by the caller's ``CountingDenoiser``.
Coefficients are float64 numbers (numpy), applied in the dtype of ``x``; float64 runs are float64
throughout.  Reference algorithms (read to understand, not copied): zju-pi/diff-sampler
``diff-solvers-main/solvers.py`` (iPNDM, DEIS-tAB, UniPC), with their defaults: iPNDM max order 4,
UniPC bh2 order 3 with lower order at the end, DEIS-tAB with 3 nodes (their ``--max_order 3``), no
dynamic thresholding (it clips pixel-range data and would be wrong for latents).

* iPNDM (Zhang & Chen 2023, DEIS paper Sec. on PNDM; Liu et al. 2022): Adams-Bashforth on the
  slope d = (x - D) / sigma with the constant-step coefficients of orders 1..4 (Euler, then
  (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24): the lower orders are the warm start.
* DEIS-tAB (Zhang & Chen 2023, Eq. 14 with Lagrange extrapolation in the VP time t): the slope
  d(sigma) = eps is extrapolated by the Lagrange polynomial in t through the last p nodes and
  integrated exactly in sigma: x_{i+1} = x_i + sum_j C_ij d_{i-j}, C_ij = int L_j(t(sigma)) dsigma.
  t(sigma) is the VP time of diff-sampler's fit through (eps_s = 1e-3, sigma_min) and (1, sigma_max)
  (edm.txt Table 1's VP sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)); the integral is a
  64-point Gauss-Legendre rule in log sigma, where the integrand is analytic in a strip of half-width
  pi/2 (coefficients exact to ~1e-15; diff-sampler sums 10^4 points, error ~1e-4 relative).
* UniPC (Zhao et al. 2023, Alg. 1-2, B(h) = e^h - 1 "bh2"): data-prediction predictor UniP-p and
  corrector UniC-p in lambda = -log sigma; the corrector reuses the evaluation at the predicted point
  (no extra evaluation) and is skipped on the last step; orders ramp 1, 2, 3 and fall to
  min(3, steps left) at the end (``lower_order_final``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from latentdiff.solvers.base import eval_at

__all__ = [
    "IPNDM_COEFFS",
    "deis_coefficients",
    "deis_sampler",
    "ipndm_sampler",
    "ipndm_states",
    "unipc_coefficients",
    "unipc_sampler",
    "vp_time_fit",
]

# Adams-Bashforth weights on (d_i, d_{i-1}, ...) for constant steps, orders 1-4
IPNDM_COEFFS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _levels(sigmas) -> list[float]:
    """The positive levels of a grid (an appended 0 dropped), checked strictly decreasing."""
    sig = [float(s) for s in sigmas]
    if sig and sig[-1] == 0:
        sig = sig[:-1]
    if not sig or any(not (s > 0 and math.isfinite(s)) for s in sig):
        raise ValueError(f"a grid needs positive finite levels (an appended 0 allowed), got {sigmas}")
    if any(b >= a for a, b in zip(sig, sig[1:])):
        raise ValueError("the sigma grid must be strictly decreasing")
    return sig


def _final(denoise, x: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """The counted Euler step sigma_min -> 0: x + (0 - sigma)(x - D)/sigma = D(x; sigma_min)."""
    return eval_at(denoise, x, sigma_min)


def ipndm_states(denoise, x: torch.Tensor, sigmas, *, max_order: int = 4) -> tuple[list, list]:
    """iPNDM's trajectory: the states at every positive level (N of them) and the slopes
    d_i = (x_i - D(x_i; sigma_i)) / sigma_i at the first N - 1 (one evaluation each), dtype of x."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"iPNDM max_order must be in 1..4, got {max_order}")
    sig = _levels(sigmas)
    states, slopes = [x], []
    for i in range(len(sig) - 1):
        slopes.append((x - eval_at(denoise, x, sig[i])) / sig[i])
        recent = slopes[::-1][:max_order]
        x = x + (sig[i + 1] - sig[i]) * sum(c * d for c, d in zip(IPNDM_COEFFS[len(recent)], recent))
        states.append(x)
    return states, slopes


def ipndm_sampler(denoise, x: torch.Tensor, sigmas, *, max_order: int = 4) -> torch.Tensor:
    """iPNDM down the grid, then the Euler step to 0 (module docstring); N levels = N evaluations."""
    sig = _levels(sigmas)
    return _final(denoise, ipndm_states(denoise, x, sig, max_order=max_order)[0][-1], sig[-1])


def vp_time_fit(sigma_min: float, sigma_max: float, eps_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) of the VP schedule (edm.txt Table 1) with sigma(eps_s) = sigma_min and
    sigma(1) = sigma_max: from ln(1 + sigma^2) = beta_d t^2 / 2 + beta_min t at both points."""
    a, b = math.log1p(sigma_min**2), math.log1p(sigma_max**2)
    beta_d = 2 * (a / eps_s - b) / (eps_s - 1)
    return beta_d, b - 0.5 * beta_d


def _vp_time(sig: np.ndarray, beta_d: float, beta_min: float) -> np.ndarray:
    """t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d (edm.txt Table 1)."""
    return (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(sig**2)) - beta_min) / beta_d


_GL_X, _GL_W = np.polynomial.legendre.leggauss(64)


def deis_coefficients(sigmas, *, nodes: int = 3) -> list[np.ndarray]:
    """C_i (one array per step, length min(i + 1, nodes)): x_{i+1} = x_i + sum_j C_i[j] d_{i-j}.

    C_i[j] = int_{sigma_i}^{sigma_{i+1}} L_j(t(sigma)) dsigma with L_j the Lagrange basis in VP time
    through t_i, ..., t_{i-p+1} (module docstring); the integral in s = log sigma (dsigma = sigma ds) by
    64-point Gauss-Legendre.  The first step (one node) is Euler, C_0 = [sigma_1 - sigma_0].
    """
    sig = np.asarray(_levels(sigmas), dtype=np.float64)
    beta_d, beta_min = vp_time_fit(float(sig[-1]), float(sig[0]))
    t = _vp_time(sig, beta_d, beta_min)
    out = []
    for i in range(len(sig) - 1):
        p = min(i + 1, nodes)
        if p == 1:
            out.append(np.array([sig[i + 1] - sig[i]]))
            continue
        lo, hi = math.log(sig[i]), math.log(sig[i + 1])
        s = 0.5 * (hi - lo) * _GL_X + 0.5 * (hi + lo)
        wq = 0.5 * (hi - lo) * _GL_W * np.exp(s)  # dsigma = sigma ds
        tq = _vp_time(np.exp(s), beta_d, beta_min)
        tn = t[[i - k for k in range(p)]]
        c = np.empty(p)
        for j in range(p):
            basis = np.prod([(tq - tn[k]) / (tn[j] - tn[k]) for k in range(p) if k != j], axis=0)
            c[j] = float(np.sum(wq * basis))
        out.append(c)
    return out


def deis_sampler(denoise, x: torch.Tensor, sigmas, *, nodes: int = 3) -> torch.Tensor:
    """DEIS-tAB with ``nodes`` Lagrange nodes (3: third order), then the Euler step to 0."""
    if not 1 <= nodes <= 4:
        raise ValueError(f"DEIS-tAB nodes must be in 1..4, got {nodes}")
    sig = _levels(sigmas)
    coeffs = deis_coefficients(sig, nodes=nodes)
    slopes: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        slopes = ([(x - eval_at(denoise, x, sig[i])) / sig[i]] + slopes)[:nodes]
        x = x + sum(float(c) * s for c, s in zip(coeffs[i], slopes))
    return _final(denoise, x, sig[-1])


def unipc_coefficients(lams: list[float], lam_t: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """UniPC-bh2 weights (rho_p, rho_c) for a step from ``lams[0]`` (nodes most recent first) to lam_t.

    With h = lam_t - lam_0, r_k = (lam_k - lam_0) / h (k = 1..p-1), r_p = 1, B(h) = e^h - 1 in the
    variable -h of data prediction: R_ik = r_k^(i-1), g_i = i! phi_{i+1}(-h) / B with
    phi_1(z) = (e^z - 1)/z - 1 ... (the recursion phi_{k+1} = phi_k / z - 1/(k+1)!, UniPC Thm. 3.1).
    Predictor: R[:-1, :-1] rho_p = g[:-1] (0.5 for p = 2; none for p = 1).  Corrector: R rho_c = g
    (0.5 for p = 1).
    """
    h = lam_t - lams[0]
    r = [(lams[k] - lams[0]) / h for k in range(1, order)] + [1.0]
    z = -h
    b_h = math.expm1(z)
    phi = math.expm1(z) / z - 1
    g, fact = [], 1
    for i in range(1, order + 1):
        g.append(phi * fact / b_h)
        fact *= i + 1
        phi = phi / z - 1 / fact
    big = np.array([[rk ** (i - 1) for rk in r] for i in range(1, order + 1)])
    g = np.array(g)
    if order == 1:
        rho_p = np.zeros(0)
    elif order == 2:
        rho_p = np.array([0.5])
    else:
        rho_p = np.linalg.solve(big[:-1, :-1], g[:-1])
    rho_c = np.array([0.5]) if order == 1 else np.linalg.solve(big, g)
    return rho_p, rho_c


def _unipc_step(x, ds, lams, sig_s, sig_t, order, denoise, correct):
    """One UniP step sig_s -> sig_t (and UniC through the new evaluation when ``correct``).
    Returns (x_t, D(x_t predicted; sig_t) or None)."""
    lam_t = -math.log(sig_t)
    rho_p, rho_c = unipc_coefficients(lams[:order], lam_t, order)
    h = lam_t - lams[0]
    b_h = math.expm1(-h)
    d1 = [(ds[k] - ds[0]) / ((lams[k] - lams[0]) / h) for k in range(1, order)]
    base = (sig_t / sig_s) * x - math.expm1(-h) * ds[0]  # the exact linear part + DDIM (order 1)
    x_t = base - b_h * sum(float(c) * v for c, v in zip(rho_p, d1)) if len(rho_p) else base
    if not correct:
        return x_t, None
    d_t = eval_at(denoise, x_t, sig_t)
    corr = sum(float(c) * v for c, v in zip(rho_c[:-1], d1)) + float(rho_c[-1]) * (d_t - ds[0])
    return base - b_h * corr, d_t


def unipc_sampler(denoise, x: torch.Tensor, sigmas, *, order: int = 3, lower_order_final: bool = True) -> torch.Tensor:
    """UniPC-bh2 of ``order`` (1..3) down the grid, then the Euler step to 0 (module docstring)."""
    if not 1 <= order <= 3:
        raise ValueError(f"UniPC order must be in 1..3, got {order}")
    sig = _levels(sigmas)
    n = len(sig)
    if n == 1:
        return _final(denoise, x, sig[0])
    ds, lams = [eval_at(denoise, x, sig[0])], [-math.log(sig[0])]  # most recent first
    for i in range(n - 1):
        p = i + 1 if i + 1 < order else (min(order, n - 1 - i) if lower_order_final else order)
        last = i == n - 2
        x, d_t = _unipc_step(x, ds, lams, sig[i], sig[i + 1], p, denoise, correct=not last)
        if not last:
            ds, lams = ([d_t] + ds)[:order], ([-math.log(sig[i + 1])] + lams)[:order]
    return _final(denoise, x, sig[-1])
