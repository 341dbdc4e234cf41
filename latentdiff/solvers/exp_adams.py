"""A multistep exponential integrator in lambda = -log(sigma) with data prediction: ``auto``'s integrator.

The probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (wsnr.txt Eq. 1; edm.txt Eq. 4 with
sigma(t) = t, s(t) = 1) has, from sigma_s to sigma_t, the exact solution (variation of constants;
DPM-Solver++, Lu et al. 2022, Eq. 8-9 with alpha = 1, so that sigma_t e^{lambda_t} = 1)

    x_t = (sigma_t / sigma_s) x_s + int_{lambda_s}^{lambda_t} e^{lambda - lambda_t} D(x_lambda; lambda) dlambda.   (E1)

The linear part is exact.  D is replaced by the polynomial P of degree p - 1 in lambda through the
last p evaluations (lambda_j, D_j) (exponential Adams-Bashforth, the *predictor*), and the integral
of e^{lambda - lambda_t} P is exact: with P(lambda) = sum_k a_k (lambda - lambda_s)^k / k!,

    int_{lambda_s}^{lambda_t} e^{lambda - lambda_t} (lambda - lambda_s)^k / k! dlambda = I_k(h)
      = int_0^h e^{-u} (h - u)^k / k! du = sum_{j > k} (-1)^{j-k-1} h^j / j!,   h = lambda_t - lambda_s,   (E2)

so x_t = (sigma_t / sigma_s) x_s + sum_j w_j D_j with w = V^{-T} I, V_jk = (lambda_j - lambda_s)^k / k!.
For p = 1 this is DDIM / DPM-Solver++(1): x_t = (sigma_t / sigma_s) x_s + (1 - sigma_t / sigma_s) D_s.
The local error is O(h^{p+1}).  After the next evaluation D_t = D(x_t; sigma_t) the step is
*corrected* with the interpolant through (lambda_t, D_t) and the previous nodes (exponential
Adams-Moulton, order p + 1) and the corrected x_t is kept: a PEC scheme, the evaluation at the
predicted point is reused, so the corrector costs no evaluation.  Every sample (row) may have its own
noise levels and order; all coefficients are computed in float64 and applied in the dtype of x.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from latentdiff.solvers.base import eval_at

__all__ = ["exp_integral", "exp_adams_weights", "weights_by_order", "ExpAdams", "exp_adams_sampler"]


def exp_integral(k: int, h) -> np.ndarray:
    """I_k(h) = int_0^h e^{-u} (h - u)^k / k! du (Eq. E2), elementwise for h > 0.

    Closed form (-1)^{k+1} (e^{-h} - sum_{j<=k} (-h)^j / j!) for h >= 0.5; for smaller h the
    alternating series sum_{j>k} (-1)^{j-k-1} h^j / j! (no cancellation).
    """
    h = np.atleast_1d(np.asarray(h, dtype=np.float64))
    out = np.empty_like(h)
    small = h < 0.5
    if small.any():
        hs = h[small]
        term = hs ** (k + 1) / math.factorial(k + 1)
        tot = np.zeros_like(hs)
        for j in range(k + 1, k + 40):
            tot += term
            term = -term * hs / (j + 1)
        out[small] = tot
    if (~small).any():
        hb = h[~small]
        partial = sum((-hb) ** j / math.factorial(j) for j in range(k + 1))
        out[~small] = (-1) ** (k + 1) * (np.exp(-hb) - partial)
    return out


def exp_adams_weights(nodes: np.ndarray, lam_s: np.ndarray, lam_t: np.ndarray) -> np.ndarray:
    """Weights w (B, p) with int_{lambda_s}^{lambda_t} e^{lambda - lambda_t} P(lambda) dlambda = sum_j w_j D_j.

    ``nodes`` (B, p): the lambdas of the interpolated evaluations D_j; P is their Lagrange
    interpolant.  With V_jk = (nodes_j - lambda_s)^k / k! and I_k = ``exp_integral(k, h)``,
    w = V^{-T} I (exact for every polynomial of degree < p).
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    p = nodes.shape[1]
    d = nodes - lam_s[:, None]
    v = np.stack([d**k / math.factorial(k) for k in range(p)], axis=2)  # (B, node j, power k)
    i = np.stack([exp_integral(k, lam_t - lam_s) for k in range(p)], axis=1)  # (B, p)
    return np.linalg.solve(np.transpose(v, (0, 2, 1)), i[:, :, None])[:, :, 0]


def weights_by_order(hist_lams: np.ndarray, lam_s, lam_t, order: np.ndarray) -> np.ndarray:
    """Rows with different orders: (B, H) weights, zero beyond each row's order (nodes most recent first)."""
    b, hlen = hist_lams.shape
    w = np.zeros((b, hlen))
    for q in np.unique(order):
        rows = np.nonzero(order == q)[0]
        w[rows, :q] = exp_adams_weights(hist_lams[rows, :q], lam_s[rows], lam_t[rows])
    return w


def _col(values, x: torch.Tensor) -> torch.Tensor:
    """(B,) numbers as a tensor broadcasting against x (B, ...)."""
    return torch.as_tensor(np.asarray(values), dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))


def _combine(x_s, sig_s, sig_t, weights, ds, rows) -> torch.Tensor:
    """(sigma_t / sigma_s) x_s + sum_j w_j D_j for the selected ``rows`` (Eq. E1 with the interpolant)."""
    out = _col(sig_t[rows] / sig_s[rows], x_s) * x_s[rows]
    for j in range(weights.shape[1]):
        if j < len(ds) and np.any(weights[:, j] != 0):
            out = out + _col(weights[:, j], x_s) * ds[j][rows]
    return out


def _replace_rows(x: torch.Tensor, rows: np.ndarray, values: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[torch.as_tensor(rows, device=x.device)] = values
    return x


class ExpAdams:
    """The integrator's state over a batch: the last ``history`` evaluations and the last predictor step.

    Per evaluation call :meth:`observe` (the corrector, then the new node), then :meth:`predict` to the
    next noise levels.  Rows whose next level is not below their current one stand still.
    """

    def __init__(self, history: int, corrector: bool = True):
        self.history, self.corrector = int(history), corrector
        self.ds: list[torch.Tensor] = []  # evaluations D_j, most recent last
        self.lams: list[np.ndarray] = []  # their lambdas, (B,) each
        self._last = None  # (x_s, sigma_s, order) of the last predictor step

    def observe(self, x: torch.Tensor, d: torch.Tensor, sig: np.ndarray) -> torch.Tensor:
        """Take D(x; sig) (sig: (B,)): correct the last step through it where a row moved (exponential
        Adams-Moulton of order p + 1), then keep it as a node.  Returns the (corrected) state."""
        lam = -np.log(sig)
        if self.corrector and self._last is not None:
            x_s, sig_s, order = self._last
            rows = np.nonzero(sig < sig_s)[0]
            if rows.size:
                q = np.minimum(order[rows] + 1, len(self.ds) + 1)
                nodes = np.stack([lam] + self.lams[::-1], axis=1)[rows]
                w = weights_by_order(nodes, -np.log(sig_s[rows]), lam[rows], q)
                x = _replace_rows(x, rows, _combine(x_s, sig_s, sig, w, [d] + self.ds[::-1], rows))
        self.ds, self.lams = (self.ds + [d])[-self.history :], (self.lams + [lam])[-self.history :]
        return x

    def predict(self, x: torch.Tensor, sig: np.ndarray, nxt: np.ndarray, order: np.ndarray) -> torch.Tensor:
        """Exponential Adams-Bashforth step sig -> nxt of ``order`` (per row, <= the nodes held) for
        the rows with nxt < sig (Eq. E1-E2)."""
        self._last = (x, sig, order)
        rows = np.nonzero(nxt < sig)[0]
        if not rows.size:
            return x
        nodes = np.stack(self.lams[::-1], axis=1)[rows]
        w = weights_by_order(nodes, -np.log(sig[rows]), -np.log(nxt[rows]), order[rows])
        return _replace_rows(x, rows, _combine(x, sig, nxt, w, self.ds[::-1], rows))


def exp_adams_sampler(denoise, x: torch.Tensor, sigmas, *, order: int = 3, corrector: bool = True) -> torch.Tensor:
    """:class:`ExpAdams` on a given grid: predictor of ``order`` (the first steps use the nodes
    available) with the PEC corrector of order + 1 when ``corrector``.  ``sigmas``: decreasing levels
    ending at sigma_min > 0 (an appended 0 is allowed); ``x`` is at ``sigmas[0]``.  Returns the state at
    the last positive level (one evaluation per level except the last).  ``auto`` runs the same
    integrator on its own grid; this fixed-grid form measures its order (``tools/bench``)."""
    sig = [float(s) for s in sigmas if float(s) > 0]
    stepper = ExpAdams(history=order, corrector=corrector)
    b = x.shape[0]
    for i in range(len(sig) - 1):
        here = np.full(b, sig[i])
        x = stepper.observe(x, eval_at(denoise, x, sig[i]), here)
        x = stepper.predict(x, here, np.full(b, sig[i + 1]), np.full(b, min(order, len(stepper.ds))))
    return x
