"""The ``auto`` sampler, the default of ``sample()`` and of ``latentdiff-sample``: accuracy per evaluation.

``auto_sample(denoise, noise, nfe=...)`` integrates the probability-flow ODE
dx/dsigma = (x - D(x; sigma)) / sigma (wsnr.txt Eq. 1; edm.txt Eq. 4 with sigma(t) = t, s(t) = 1) from
x = noise * sigma_max to sigma_min with exactly ``nfe`` denoiser calls; the last call is the Euler
step sigma_min -> 0, i.e. the output is D(x(sigma_min); sigma_min).  Three pieces:

1. the multistep exponential integrator with a free PEC corrector (:mod:`latentdiff.solvers.exp_adams`,
   Eq. E1-E2 there), each step's order following its log step;
2. a grid per sample, placed from the data scale that the first two evaluations measure
   (:mod:`latentdiff.solvers.auto_grid`); ``sigma`` is passed to ``denoise`` as a (B,) tensor, so a
   sample's result does not depend on the batch it shares;
3. exact collapse: when a sample's denoiser output did not change over a step (relative RMS change
   <= COLLAPSE_EPS * machine epsilon: the ideal denoiser has snapped onto one training image, D = y),
   Eq. 1 has the closed-form solution x(sigma) = y + (sigma / sigma_k)(x_k - y); the sample jumps to
   sigma_min and its remaining calls are evaluations at sigma_min that leave it unchanged.  A network
   that keeps refining its output never triggers this.

NFE = 1: the single evaluation is the Euler step sigma_max -> 0 (as ``sample()`` does).  NFE = 2: one
exponential-Euler step sigma_max -> sigma_min, then the final evaluation.  ``rho`` only sets sigma_1
(edm.txt Eq. 5's first level); the rest of the grid is not Eq. 5.  The measurements behind the
design and its constants are in ``tools/bench/README.md``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from latentdiff.solvers.auto_grid import auto_plan, data_scale, first_sigma, kappa, order_for, sigma_lo, tail_levels
from latentdiff.solvers.base import CountingDenoiser, SampleInfo
from latentdiff.solvers.exp_adams import ExpAdams

__all__ = ["auto_sample", "COLLAPSE_EPS", "HISTORY"]

COLLAPSE_EPS = 10.0  # collapse: relative RMS change of D <= COLLAPSE_EPS * eps(dtype)
HISTORY = 4  # evaluations kept for the multistep interpolants (predictor order <= 4)


def _check(nfe, sigma_min: float, sigma_max: float, rho: float, noise: torch.Tensor) -> None:
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    if noise.ndim < 1 or noise.shape[0] < 1:
        raise ValueError("noise must be a batch (B, ...) with B >= 1")


def _rms(t: torch.Tensor) -> np.ndarray:
    return t.reshape(t.shape[0], -1).double().square().mean(1).sqrt().cpu().numpy()


class _AutoRun:
    """One ``auto_sample`` call: the state between the denoiser calls."""

    def __init__(self, denoise, noise: torch.Tensor, nfe: int, sigma_min: float, sigma_max: float, rho: float):
        self.counter = CountingDenoiser(denoise)
        self.nfe, self.sigma_min, self.sigma_max, self.rho = nfe, float(sigma_min), float(sigma_max), rho
        b = noise.shape[0]
        self.x = noise * self.sigma_max
        self.sig = np.full(b, self.sigma_max)
        self.levels = [self.sig.copy()]  # every sample's noise level at every call
        self.done = np.zeros(b, dtype=bool)
        self.scale = np.full(b, np.nan)
        self.plan = None
        self.sigma_1 = self.sigma_min
        self.first = None  # (x, D) of the first evaluation
        self.x_eval1 = None  # the state of the second evaluation (the first prediction)
        self.tol = COLLAPSE_EPS * torch.finfo(noise.dtype).eps
        self.stepper = ExpAdams(HISTORY)

    def _collapse(self) -> None:
        """Rows whose D did not change over the last step jump to sigma_min on Eq. 1's exact solution."""
        new, old = self.stepper.ds[-1], self.stepper.ds[-2]
        coll = (~self.done) & (self.sig > self.sigma_min) & (_rms(new - old) <= self.tol * np.maximum(_rms(new), 1e-30))
        if not coll.any():
            return
        rows = np.nonzero(coll)[0]
        ri = torch.as_tensor(rows, device=self.x.device)
        y = new[ri]
        ratio = torch.as_tensor(self.sigma_min / self.sig[rows], dtype=self.x.dtype, device=self.x.device)
        self.x = self.x.clone()
        self.x[ri] = y + ratio.reshape(-1, *([1] * (self.x.ndim - 1))) * (self.x[ri] - y)
        self.sig = self.sig.copy()
        self.sig[rows] = self.sigma_min
        self.done |= coll

    def _next_levels(self, call: int) -> np.ndarray:
        if call == 0:
            self.sigma_1 = first_sigma(self.nfe, self.sigma_min, self.sigma_max, self.rho)
            nxt = np.full(self.sig.shape, self.sigma_1)
        else:
            nxt = self.plan[:, call - 1].copy()
        return np.where(self.done, self.sigma_min, nxt)

    def _step(self, call: int, d: torch.Tensor) -> None:
        """Everything between evaluation ``call`` and the next: correct, collapse, plan, predict."""
        lam = -np.log(self.sig)
        self.x = self.stepper.observe(self.x, d, self.sig)
        if call == 0:
            self.first = (self.x, d)
        else:
            self._collapse()
        if call == 1:  # the per-sample plan from the data scale of the first two evaluations
            (x0, d0), sig1 = self.first, self.sigma_1
            self.scale = data_scale(x0, d0, self.sigma_max, self.x_eval1, d, sig1)
            self.plan = np.stack([auto_plan(self.nfe, sig1, self.sigma_min, float(s)) for s in self.scale])
        nxt = self._next_levels(call)
        order = order_for(-np.log(nxt) - lam, len(self.stepper.ds))
        self.x = self.stepper.predict(self.x, self.sig, nxt, order)
        if call == 0:
            self.x_eval1 = self.x
        self.sig = nxt
        self.levels.append(self.sig.copy())

    def integrate(self) -> torch.Tensor:
        dtype, dev = self.x.dtype, self.x.device
        for call in range(self.nfe):
            d = self.counter(self.x, torch.as_tensor(self.sig, dtype=dtype, device=dev))
            if call == self.nfe - 1:  # the Euler step sigma -> 0: x + (0 - sigma)(x - D)/sigma = D
                return d
            self._step(call, d)
        raise AssertionError("unreachable: the last call returns")

    def info(self) -> SampleInfo:
        lv = np.stack(self.levels, axis=1)  # (B, calls)
        # distinct levels per sample (a collapsed sample repeats sigma_min until the last call)
        grids = [[float(v) for i, v in enumerate(row) if i == 0 or v < row[i - 1]] for row in lv]
        nfe, smin = self.nfe, self.sigma_min
        return SampleInfo(method="auto", nfe=self.counter.calls, sigmas=grids[0] + [0.0], eval_sigmas=self.counter.sigmas,
                          extra={"rho": self.rho, "sigma_min": smin, "sigma_max": self.sigma_max,
                                 "data_scale": [float(s) for s in self.scale],
                                 "sigma_lo": [sigma_lo(nfe, self.sigma_1, smin, float(s)) if np.isfinite(s) else None
                                              for s in self.scale],
                                 "kappa": kappa(nfe), "tail_levels": tail_levels(nfe), "collapsed": int(self.done.sum()),
                                 "grids": grids})


def auto_sample(
    denoise,
    noise: torch.Tensor,
    *,
    nfe: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    return_info: bool = False,
):
    """Sample with exactly ``nfe`` denoiser calls (module docstring); returns x_0 or (x_0, SampleInfo).

    ``noise``: standard normal (B, ...), float32 or float64; the trajectory starts at
    ``noise * sigma_max``.  Deterministic: no generator is needed.  ``SampleInfo.nfe`` is the counted
    number of calls; ``sigmas`` are the noise levels of the first sample (every sample has its own);
    ``extra`` has the per-sample data scales S, sigma_lo, the number of collapsed samples and the
    per-sample grids.
    """
    _check(nfe, sigma_min, sigma_max, rho, noise)
    run = _AutoRun(denoise, noise, int(nfe), sigma_min, sigma_max, rho)
    out = run.integrate()
    if run.counter.calls > run.nfe:  # never expected: the loop makes exactly nfe calls
        raise RuntimeError(f"auto used {run.counter.calls} evaluations for a budget of {run.nfe}")
    return (out, run.info()) if return_info else out
