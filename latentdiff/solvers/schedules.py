"""Time schedules: where a fixed-grid solver puts its N noise levels, an axis separate from the solver.

* ``karras`` — edm.txt Eq. 5 with exponent rho (``grids.karras_sigmas``), the default;
* ``log-uniform`` — uniform in log sigma (``grids.loguniform_sigmas``);
* ``gits`` — Chen et al. 2024 (GITS, "On the trajectory regularity of ODE-based diffusion sampling"):
  levels chosen by dynamic programming among the levels of a fine Eq. 5 grid, from a few hundred
  warm-up trajectories of the model itself (``gits_cost_matrix``; a one-off cost per model that
  ``latentdiff.sampling.gits_cache`` keeps beside the export).

The data-driven sigma_max (wsnr.txt Eq. 6-8) is the start of every schedule, chosen apart
(``--sigma-max data``).  All grids are float64, strictly decreasing from sigma_max to sigma_min, with an
appended 0.

GITS.  A teacher (iPNDM, :mod:`latentdiff.solvers.multistep`) integrates the warm-up noises on the
fine grid s_0 > ... > s_{M-1}; its states x_i and slopes d_i = (x_i - D(x_i; s_i)) / s_i give the cost of
jumping from level i to level j > i with one Euler step,

    c_ij = E || x_i + (s_j - s_i) d_i - x_j ||_2        (the L2 norm per sample, mean over samples),

and the N levels are the path 0 = p_0 < p_1 < ... < p_{N-1} = M - 1 minimising
c_{p_0 p_1} + g c_{p_1 p_2} + g^2 c_{p_2 p_3} + ... (g the ``coeff`` weighing later steps, GITS' 1.15),
found exactly by the recursion V_k(j) = min_{j < i < M-1} c_ji + g V_{k-1}(i), V_1(j) = c_{j, M-1}.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from latentdiff.diffusion.grids import karras_sigmas, loguniform_sigmas
from latentdiff.solvers.multistep import ipndm_states

__all__ = [
    "DEFAULT_SCHEDULE",
    "SCHEDULES",
    "GITSParams",
    "GITSTable",
    "gits_cost_matrix",
    "gits_path",
    "path_cost",
    "schedule_sigmas",
]

SCHEDULES = ("karras", "log-uniform", "gits")
DEFAULT_SCHEDULE = "karras"


@dataclass(frozen=True)
class GITSParams:
    """What determines a GITS cost matrix besides the model (all part of its cache key)."""

    fine_levels: int = 81  # M: levels of the fine Eq. 5 grid (GITS uses 21 for NFE <= 10; more reach NFE 80)
    rho: float = 7.0  # the fine grid's Eq. 5 exponent
    warmup: int = 256  # warm-up trajectories (GITS' default)
    coeff: float = 1.15  # g: the weight of later steps (GITS' default)
    teacher: str = "ipndm"  # the teacher on the fine grid (GITS' default)
    seed: int = 1_000_000  # warm-up noise seeds seed .. seed + warmup - 1 (one generator each)

    def to_dict(self) -> dict:
        return {"fine_levels": self.fine_levels, "rho": self.rho, "warmup": self.warmup, "coeff": self.coeff,
                "teacher": self.teacher, "seed": self.seed}


@dataclass(frozen=True)
class GITSTable:
    """A fine grid and its cost matrix: the GITS grid of any number of levels (``grid``)."""

    sigmas: list  # the fine grid's M levels, decreasing, sigma_max .. sigma_min
    cost: list  # M x M, c_ij for j > i (else unused)
    coeff: float = 1.15
    meta: dict = field(default_factory=dict)

    def grid(self, levels: int) -> torch.Tensor:
        """The ``levels`` GITS levels (``gits_path``) with an appended 0, float64."""
        idx = gits_path(np.asarray(self.cost, dtype=np.float64), levels, self.coeff)
        return torch.tensor([float(self.sigmas[i]) for i in idx] + [0.0], dtype=torch.float64)


def gits_cost_matrix(denoise, noise: torch.Tensor, fine: torch.Tensor, *, batch: int = 64) -> np.ndarray:
    """c_ij (module docstring) from the iPNDM teacher's trajectories of ``noise`` (standard normal, one row
    per warm-up trajectory) on the ``fine`` levels (an appended 0 allowed); ``denoise(x, sigma)`` as the
    solvers take it.  M - 1 evaluations per trajectory, ``batch`` trajectories at a time."""
    sig = [float(s) for s in fine if float(s) > 0]
    m = len(sig)
    total = np.zeros((m, m))
    for start in range(0, noise.shape[0], batch):
        x0 = noise[start : start + batch] * sig[0]
        states, slopes = ipndm_states(denoise, x0, sig)
        flat = [s.reshape(s.shape[0], -1).double() for s in states]
        for i in range(m - 1):
            d = slopes[i].reshape(x0.shape[0], -1).double()
            for j in range(i + 1, m):
                jump = flat[i] + (sig[j] - sig[i]) * d - flat[j]
                total[i, j] += float(jump.norm(dim=1).sum())
    return total / noise.shape[0]


def gits_path(cost: np.ndarray, levels: int, coeff: float) -> list[int]:
    """Indices 0 = p_0 < ... < p_{levels-1} = M - 1 minimising sum_k coeff^k c_{p_k p_{k+1}} (exact DP;
    the lowest index wins a tie).  ``levels == 1`` gives [0]."""
    m = cost.shape[0]
    if not 1 <= levels <= m:
        raise ValueError(f"GITS picks {levels} levels among a fine grid of {m}; raise GITSParams.fine_levels "
                         f"(--gits-fine) to at least {levels}")
    if levels == 1:
        return [0]
    k_steps = levels - 1
    value = np.full((m, k_steps + 1), np.inf)  # value[j, k]: best cost of k steps from j to M - 1
    value[: m - 1, 1] = cost[: m - 1, m - 1]
    choice = np.zeros((m, k_steps + 1), dtype=np.int64)
    for k in range(2, k_steps + 1):
        for j in range(m - 2):
            cand = cost[j, j + 1 : m - 1] + coeff * value[j + 1 : m - 1, k - 1]
            if cand.size and np.isfinite(cand).any():
                a = int(np.argmin(cand))
                value[j, k], choice[j, k] = cand[a], j + 1 + a
    path, j = [0], 0
    for k in range(k_steps, 1, -1):
        j = int(choice[j, k])
        path.append(j)
    return path + [m - 1]


def path_cost(cost: np.ndarray, path, coeff: float) -> float:
    """sum_k coeff^k c_{p_k p_{k+1}}: the DP's objective of one path (brute-force checks use it)."""
    return float(sum(coeff**k * cost[a, b] for k, (a, b) in enumerate(zip(path[:-1], path[1:]))))


def schedule_sigmas(name: str, levels: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                    gits: GITSTable | None = None) -> torch.Tensor:
    """``levels`` noise levels of schedule ``name`` from sigma_max to sigma_min, and an appended 0."""
    if name == "karras":
        return karras_sigmas(levels, sigma_min, sigma_max, rho)
    if name == "log-uniform":
        return loguniform_sigmas(levels, sigma_min, sigma_max)
    if name == "gits":
        if gits is None:
            raise ValueError("schedule 'gits' needs the model's GITS table (gits=; latentdiff-sample computes and "
                             "caches it beside the export)")
        grid = gits.grid(levels)
        if abs(float(grid[0]) - sigma_max) > 1e-9 * sigma_max or abs(float(grid[-2]) - sigma_min) > 1e-9 * sigma_min:
            raise ValueError(f"the GITS table spans [{grid[-2]:.6g}, {grid[0]:.6g}], not the requested "
                             f"[{sigma_min:.6g}, {sigma_max:.6g}]; recompute it for this sigma range")
        return grid
    raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
