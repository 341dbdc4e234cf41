"""The NFE-guided hybrid sampler: wsnr.txt Algorithm 1 (plan for a budget) and Algorithm 2 (run the plan).

Ambiguities of the paper and how they are resolved here
-------------------------------------------------------
1. Algorithm 2 uses both T and N for the number of noise levels; they are the same number.  Its
   step index i runs T..1 with sigma_T = sigma_max and sigma_1 = sigma_min; "i < N - numOde3 + 1"
   selects Heun, so Ode3 steps are the numOde3 steps with the largest sigma ("large sigma first").
2. Algorithm 2's grid is edm.txt Eq. 5 (``karras_sigmas``) listed in the opposite order.  With
   T = 1 the formula divides by zero; we use the single level sigma_max and one Euler step to 0.
3. Algorithm 1 needs h_tau, which the paper does not state.  Default ``H_TAU`` = 1.335: on the
   EDM CIFAR-10 grid (sigma in [0.002, 80], Delta lambda = 10.6) Table 4 prefers Midpoint at
   NFE 15 (h = 1.514) and the third-order method at NFE 19 (h = 1.177); 1.335 is the geometric
   mean of the two bracketing step sizes.
4. Algorithm 1 with an even NFE can leave one evaluation unused (2T - 1 <= NFE); in pure
   third-order mode up to two.  The plan reports the evaluations actually spent; it never exceeds
   the budget.
5. Algorithm 1 line 7 can give T = 1 (when the whole log-sigma range is below h_tau); the hybrid
   then degenerates to pure third order (line 9-11) and possibly to the single Euler step of (2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latentdiff.diffusion.grids import karras_sigmas
from latentdiff.solvers.base import Denoise
from latentdiff.solvers.runge_kutta import ode_step

__all__ = ["H_TAU", "NFEPlan", "plan_nfe", "hybrid_sampler", "nfe_guided_sampler"]

H_TAU = 1.335  # step-size threshold of Algorithm 1, see ambiguity 3 in the module docstring


@dataclass(frozen=True)
class NFEPlan:
    """The outcome of Algorithm 1 for one budget.

    ``steps`` = T noise levels (T steps, the last one Euler to 0), ``is_midpoint``, ``ode3_steps``
    (TOde3), ``h`` = the intended 2nd-order log step of line 3, ``evaluations`` = NFE actually spent.
    """

    nfe: int
    steps: int
    is_midpoint: bool
    ode3_steps: int
    h: float
    h_tau: float

    @property
    def heun_steps(self) -> int:
        return 0 if self.is_midpoint else self.steps - 1 - self.ode3_steps

    @property
    def midpoint_steps(self) -> int:
        return self.steps - 1 if self.is_midpoint else 0

    @property
    def evaluations(self) -> int:
        return 1 + 2 * self.midpoint_steps + 2 * self.heun_steps + 3 * self.ode3_steps

    def to_dict(self) -> dict:
        return {"steps": self.steps, "is_midpoint": self.is_midpoint, "ode3_steps": self.ode3_steps,
                "heun_steps": self.heun_steps, "h": self.h, "h_tau": self.h_tau}

    def methods(self) -> list[str]:
        """Method of each step, largest sigma first (Algorithm 2)."""
        if self.is_midpoint:
            return ["midpoint"] * (self.steps - 1) + ["euler"]
        return ["ode3"] * self.ode3_steps + ["heun"] * self.heun_steps + ["euler"]


def plan_nfe(nfe: int, sigma_min: float, sigma_max: float, h_tau: float = H_TAU) -> NFEPlan:
    """wsnr.txt Algorithm 1 (lines 2-14): steps and methods for an NFE budget."""
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if not h_tau > 0:
        raise ValueError(f"h_tau must be positive, got {h_tau}")
    nfe = int(nfe)
    lam_max, lam_min = math.log(sigma_max), math.log(sigma_min)
    t = (nfe + 1) // 2  # line 2
    h = (lam_max - lam_min) / (t - 1) if t > 1 else math.inf  # line 3 (T = 1: no step, ambiguity 2)
    if h >= h_tau:  # lines 4-5
        is_midpoint, t_ode3 = True, 0
    else:
        t = math.floor((lam_max - lam_min) / h_tau + 1)  # line 7
        t_ode3 = nfe - 2 * t + 1  # line 8
        if t_ode3 > t - 1:  # lines 9-11
            t = (nfe + 2) // 3
            t_ode3 = t - 1
        is_midpoint = False  # line 13
    return NFEPlan(nfe=nfe, steps=t, is_midpoint=is_midpoint, ode3_steps=t_ode3, h=h, h_tau=h_tau)


def hybrid_sampler(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    is_midpoint: bool = False,
    num_ode3: int = 0,
    placement: str = "log",
) -> torch.Tensor:
    """wsnr.txt Algorithm 2 on a given grid ``sigmas`` (T levels + the appended 0).

    Step i (T..1, i.e. grid position T - i): i = 1 -> Euler; ``is_midpoint`` -> Midpoint;
    i < T - numOde3 + 1 -> Heun; otherwise Ode3 (the numOde3 largest-sigma steps).
    """
    sig = [float(s) for s in sigmas]
    t = len(sig) - 1
    if not 0 <= num_ode3 <= max(t - 1, 0):
        raise ValueError(f"num_ode3 must be in [0, T-1] = [0, {t - 1}], got {num_ode3}")
    for pos in range(t):
        i = t - pos  # the paper's step index, T..1
        if i == 1:
            method = "euler"
        elif is_midpoint:
            method = "midpoint"
        elif i < t - num_ode3 + 1:
            method = "heun"
        else:
            method = "ode3"
        x = ode_step(denoise, x, sig[pos], sig[pos + 1], method, placement=placement)
    return x


def nfe_guided_sampler(
    denoise: Denoise,
    x: torch.Tensor,
    nfe: int,
    sigma_min: float,
    sigma_max: float,
    *,
    h_tau: float = H_TAU,
    rho: float = 7.0,
    placement: str = "log",
) -> torch.Tensor:
    """wsnr.txt Algorithm 1: plan for the budget, then Algorithm 2 on the Eq. 5 grid."""
    plan = plan_nfe(nfe, sigma_min, sigma_max, h_tau)
    sigmas = karras_sigmas(plan.steps, sigma_min, sigma_max, rho)
    return hybrid_sampler(denoise, x, sigmas, is_midpoint=plan.is_midpoint, num_ode3=plan.ode3_steps, placement=placement)
