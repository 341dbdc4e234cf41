"""solvers/schedules.py and diffusion/grids.py: karras, log-uniform and GITS as an axis of every fixed-grid solver."""
import itertools
import math

import numpy as np
import pytest
import torch

from latentdiff.diffusion.grids import karras_sigmas, loguniform_sigmas
from latentdiff.solvers import CountingDenoiser, sample
from latentdiff.solvers.dpm import dpm_solver_pp
from latentdiff.solvers.schedules import (
    GITSTable,
    gits_cost_matrix,
    gits_path,
    path_cost,
    schedule_sigmas,
)


def gauss(x, sigma):
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.3 + 0.25 / (0.25 + s**2) * (x - 0.3)


def test_loguniform_grid():
    g = loguniform_sigmas(9, 0.002, 80.0)
    assert g.dtype == torch.float64 and g[0] == 80.0 and g[-2] == 0.002 and g[-1] == 0
    ratios = g[1:-1] / g[:-2]
    assert torch.allclose(ratios, torch.full_like(ratios, (0.002 / 80.0) ** (1 / 8)), rtol=1e-13)
    assert loguniform_sigmas(1, 0.002, 80.0).tolist() == [80.0, 0.0]
    # Eq. 5 tends to it as rho grows
    assert torch.allclose(karras_sigmas(9, 0.002, 80.0, rho=1e6), g, rtol=1e-4)
    with pytest.raises(ValueError):
        loguniform_sigmas(3, 1.0, 0.5)


@pytest.mark.parametrize("method", ["euler", "heun", "midpoint", "ode3", "ipndm", "unipc", "deis-tab3", "dpm-3m"])
@pytest.mark.parametrize("schedule", ["karras", "log-uniform"])
def test_every_fixed_grid_solver_takes_a_schedule(method, schedule):
    counter = CountingDenoiser(gauss)
    _, info = sample(counter, torch.randn(2, 6, dtype=torch.float64), method=method, nfe=9, schedule=schedule,
                     return_info=True)
    assert counter.calls == info.nfe <= 9 and info.extra["options"] == {"schedule": schedule}
    want = schedule_sigmas(schedule, len(info.sigmas) - 1, 0.002, 80.0)
    assert info.sigmas == pytest.approx(want.tolist(), rel=1e-6)  # dpm keeps them in float32


@pytest.mark.parametrize("method", ["auto", "nfe-guided"])
def test_planners_refuse_a_schedule(method):
    with pytest.raises(ValueError, match="does not use schedule"):
        sample(gauss, torch.randn(1, 3), method=method, nfe=9, schedule="karras")


def test_unknown_schedule_and_missing_table():
    with pytest.raises(ValueError, match="unknown schedule"):
        sample(gauss, torch.randn(1, 3), method="euler", nfe=5, schedule="cosine")
    with pytest.raises(ValueError, match="GITS table"):
        sample(gauss, torch.randn(1, 3), method="euler", nfe=5, schedule="gits")


def test_dpm_given_grid_equals_its_own():
    noise = torch.randn(3, 5, dtype=torch.float64)
    a = dpm_solver_pp(gauss, noise, nfe=8, order=3)
    b = dpm_solver_pp(gauss, noise, nfe=8, order=3, sigmas=karras_sigmas(8, 0.002, 80.0))
    assert (a - b).abs().max() < 1e-5 * a.abs().max()  # the same grid up to float32 rounding of the levels


def _brute(cost, levels, coeff):
    m = cost.shape[0]
    best = None
    for mid in itertools.combinations(range(1, m - 1), levels - 2):
        p = [0, *mid, m - 1]
        c = path_cost(cost, p, coeff)
        if best is None or c < best[0]:
            best = (c, p)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.8])
def test_gits_dp_is_the_brute_force_optimum(seed, coeff):
    rng = np.random.default_rng(seed)
    m = 9
    cost = rng.random((m, m)) * np.arange(m)[None, :]  # any non-negative costs
    for levels in range(2, m + 1):
        path = gits_path(cost, levels, coeff)
        best, _ = _brute(cost, levels, coeff)
        assert len(path) == levels and path[0] == 0 and path[-1] == m - 1 and path == sorted(set(path))
        assert math.isclose(path_cost(cost, path, coeff), best, rel_tol=1e-12)
    assert gits_path(cost, 1, coeff) == [0]
    with pytest.raises(ValueError, match="fine_levels"):
        gits_path(cost, m + 1, coeff)


def test_gits_cost_matrix_and_grid():
    fine = karras_sigmas(13, 0.002, 80.0)
    noise = torch.randn(10, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counter = CountingDenoiser(gauss)
    cost = gits_cost_matrix(counter, noise, fine, batch=4)
    assert counter.calls == 3 * 12  # three batches, M - 1 teacher evaluations each
    assert cost.shape == (13, 13) and np.all(cost[np.triu_indices(13, 1)] >= 0)
    # a longer Euler jump from the same level costs more here (smooth, convex trajectories)
    assert all(cost[0, j] < cost[0, j + 1] for j in range(1, 12))
    table = GITSTable(sigmas=[float(s) for s in fine[:-1]], cost=cost.tolist())
    g = table.grid(6)
    assert g[0] == 80.0 and g[-2] == 0.002 and g[-1] == 0 and len(g) == 7 and bool(torch.all(g[1:] < g[:-1]))
    assert set(g[:-1].tolist()) <= set(fine.tolist())
    counter = CountingDenoiser(gauss)
    _, info = sample(counter, noise[:2], method="ipndm", nfe=6, schedule="gits", gits=table, return_info=True)
    assert info.sigmas == g.tolist() and counter.calls == 6 and info.extra["options"] == {"schedule": "gits"}
    with pytest.raises(ValueError, match="recompute"):
        sample(gauss, noise[:2], method="ipndm", nfe=6, schedule="gits", gits=table, sigma_max=20.0)
