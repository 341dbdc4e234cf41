"""latentdiff.solvers.auto: budget, final Euler step, exact coefficients, convergence, peers."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.solvers.auto import auto_sample
from latentdiff.solvers.auto_grid import TAIL_BALANCE, auto_plan, kappa, tail_levels
from latentdiff.solvers.auto_grid import sigma_lo as _sigma_lo
from latentdiff.solvers.exp_adams import exp_adams_weights, exp_integral
from latentdiff.diffusion.grids import karras_sigmas
from latentdiff.solvers import SAMPLERS, ideal_denoiser, sample

MU, S = 0.3, 0.5  # Gaussian data N(MU, S^2 I)
SMIN, SMAX = 0.002, 80.0


def gaussian_denoiser(x, sigma):
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + s**2) * (x - MU)


def gaussian_exact(x0, s0, s1):
    """x(sigma) = mu + (x0 - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma0^2))."""
    return MU + (x0 - MU) * math.sqrt((S**2 + s1**2) / (S**2 + s0**2))


class Recorder:
    """Counts calls and keeps the last call's input (the state at sigma_min before the final Euler step)."""

    def __init__(self, denoise):
        self.denoise, self.calls, self.x, self.sigma = denoise, 0, None, None

    def __call__(self, x, sigma):
        self.calls += 1
        self.x, self.sigma = x.clone(), sigma.clone()
        return self.denoise(x, sigma)


def _noise(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------


def test_exp_integral_series_and_closed_form_agree():
    """Both branches (series below h = 0.5, closed form above) against quadrature of the definition."""
    for k in range(5):
        for h in (0.05, 0.3, 0.499, 0.501, 1.0, 3.0):
            u = np.linspace(0, h, 200001)
            f = np.exp(-u) * (h - u) ** k / math.factorial(k)
            quad = float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(u)))
            assert exp_integral(k, [h])[0] == pytest.approx(quad, rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_exp_adams_weights_exact_for_polynomials(p):
    """sum_j w_j P(lambda_j) == int_{lambda_s}^{lambda_t} e^{lambda - lambda_t} P(lambda) dlambda, deg P < p."""
    rng = np.random.default_rng(p)
    lam_s, h = 1.3, 0.7
    nodes = lam_s - np.concatenate([[0.0], np.cumsum(rng.uniform(0.2, 0.9, p - 1))])
    coef = rng.normal(size=p)
    poly = lambda lam: sum(c * lam**i for i, c in enumerate(coef))  # noqa: E731
    w = exp_adams_weights(nodes[None, :], np.array([lam_s]), np.array([lam_s + h]))[0]
    lam = np.linspace(lam_s, lam_s + h, 400001)
    f = np.exp(lam - lam_s - h) * poly(lam)
    exact = float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(lam)))
    assert float(w @ poly(nodes)) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    if p > 1:  # and not exact one degree higher (the weights really have order p)
        bad = lambda lam: (lam - nodes[0]) ** p  # noqa: E731
        fb = np.exp(lam - lam_s - h) * bad(lam)
        assert abs(float(w @ bad(nodes)) - float(np.sum((fb[1:] + fb[:-1]) / 2 * np.diff(lam)))) > 1e-6


def test_budget_never_exceeded_and_counted_exactly_every_nfe():
    noise = _noise((2, 3, 4))
    for nfe in range(1, 101):
        rec = Recorder(gaussian_denoiser)
        x, info = auto_sample(rec, noise, nfe=nfe, return_info=True)
        assert rec.calls == info.nfe == nfe, nfe
        assert len(info.eval_sigmas) == nfe
        assert x.shape == noise.shape and torch.isfinite(x).all()
        grid = info.sigmas
        assert grid[0] == SMAX and grid[-1] == 0.0
        assert all(a > b for a, b in zip(grid, grid[1:])), (nfe, grid)
        if nfe >= 2:
            assert grid[-2] == SMIN


@pytest.mark.parametrize("nfe", [2, 3, 7, 19, 51])
def test_final_step_is_euler_at_sigma_min(nfe):
    """The last call is at sigma_min for every sample and the output is its Euler step to 0, i.e. D(x; sigma_min)."""
    noise = _noise((3, 5), seed=nfe)
    rec = Recorder(gaussian_denoiser)
    out = auto_sample(rec, noise, nfe=nfe)
    assert torch.all(rec.sigma == SMIN)
    euler = rec.x + (0.0 - SMIN) * (rec.x - gaussian_denoiser(rec.x, rec.sigma)) / SMIN
    assert torch.allclose(out, euler, rtol=0, atol=1e-12)
    # NFE = 1: the only call is the Euler step from sigma_max
    rec1 = Recorder(gaussian_denoiser)
    auto_sample(rec1, noise, nfe=1)
    assert rec1.calls == 1 and torch.all(rec1.sigma == SMAX) and torch.equal(rec1.x, noise * SMAX)


def test_converges_on_gaussian_ode_with_high_order():
    noise = _noise((4, 6), seed=1)
    exact = gaussian_exact(noise * SMAX, SMAX, SMIN)
    nfes = (25, 49, 97, 193)
    errs = []
    for nfe in nfes:
        rec = Recorder(gaussian_denoiser)
        auto_sample(rec, noise, nfe=nfe)
        errs.append((rec.x - exact).abs().max().item())
    orders = [math.log(errs[i] / errs[i + 1]) / math.log(nfes[i + 1] / nfes[i]) for i in range(len(errs) - 1)]
    assert all(o > 2.5 for o in orders), (errs, orders)
    assert errs[-1] < 1e-7
    # the same run through sample(method="auto") is the same computation
    x_auto = auto_sample(gaussian_denoiser, noise, nfe=49)
    assert torch.equal(sample(gaussian_denoiser, noise, method="auto", nfe=49), x_auto)


def test_batched_any_shape_dtype_and_batch_independent():
    """Per-sample grids: a sample's result does not depend on the rest of the batch; float32 works."""
    data = _noise((40, 2, 3, 3), seed=5) * 0.7
    den = ideal_denoiser(data)
    noise = _noise((5, 2, 3, 3), seed=6)
    full = auto_sample(den, noise, nfe=13)
    for b in range(noise.shape[0]):
        single = auto_sample(den, noise[b : b + 1], nfe=13)
        assert torch.allclose(single[0], full[b], rtol=0, atol=1e-12)
    x32 = auto_sample(den, noise.float(), nfe=13)
    assert x32.dtype == torch.float32 and x32.shape == noise.shape
    assert (x32.double() - full).abs().max() < 1e-3
    flat = auto_sample(gaussian_denoiser, _noise((3, 7)), nfe=9)
    assert flat.shape == (3, 7)


def test_collapse_is_exact_for_a_constant_denoiser():
    """D = c: the ODE solution is x(sigma) = c + (sigma / sigma_max)(x_T - c); auto reproduces it exactly."""
    c = torch.full((2, 4), 0.25, dtype=torch.float64)
    noise = _noise((2, 4), seed=2)
    rec = Recorder(lambda x, s: c.clone())
    out, info = auto_sample(rec, noise, nfe=10, return_info=True)
    assert info.extra["collapsed"] == 2
    expect = c + (SMIN / SMAX) * (noise * SMAX - c)
    assert torch.allclose(rec.x, expect, rtol=0, atol=1e-12) and torch.equal(out, c)


def test_plan_uses_the_budget():
    for nfe in (3, 7, 15, 35, 79):
        plan = auto_plan(nfe, 40.0, SMIN, 30.0)
        assert len(plan) == nfe - 2 and plan[-1] == SMIN and np.all(np.diff(plan) < 0)
        if nfe >= 15:
            assert tail_levels(nfe) >= 1
    assert kappa(7) > kappa(79)


@pytest.mark.parametrize("scale", [5.0, 40.0, 150.0])
def test_tail_is_balanced_against_the_main_range(scale):
    """For NFE >= 15 the tail below sigma_lo has at least round(0.08 NFE) levels and a log step at most
    TAIL_BALANCE x the main range's; the main range stays log-uniform from sigma_1 to sigma_lo."""
    for nfe in (15, 19, 27, 51, 79):
        s1 = 60.0
        plan = auto_plan(nfe, s1, SMIN, scale)
        lo = _sigma_lo(nfe, s1, SMIN, scale)
        k = int(np.argmin(np.abs(np.log(plan / lo))))  # sigma_lo is a level of the plan
        assert math.isclose(plan[k], lo, rel_tol=1e-12)
        main, tail = np.log(np.concatenate([[s1], plan[: k + 1]])), np.log(plan[k:])
        h_main, h_tail = -np.diff(main), -np.diff(tail)
        assert np.allclose(h_main, h_main[0]) and np.allclose(h_tail, h_tail[0])
        assert len(tail) - 2 >= tail_levels(nfe)
        assert h_tail[0] <= TAIL_BALANCE * h_main[0] * (1 + 1e-12) or len(main) == 2, (nfe, h_main[0], h_tail[0])
        # one level fewer in the tail would break the balance (levels are moved only as needed)
        r = len(tail) - 2
        if r > tail_levels(nfe):
            assert (tail[0] - tail[-1]) / r > TAIL_BALANCE * (main[0] - main[-1]) / (len(main))


@pytest.mark.parametrize("nfe", [3, 7, 19, 79])
def test_first_step_is_the_eq5_first_step(nfe):
    """sigma_1 is the second level of edm.txt Eq. 5 with N = NFE levels (and the given rho)."""
    noise = _noise((2, 3, 4, 4))
    for rho in (7.0, 3.0):
        _, info = auto_sample(lambda x, s: 0.5 * x / (1 + s[:, None, None, None] ** 2), noise, nfe=nfe, rho=rho,
                              return_info=True)
        assert math.isclose(info.sigmas[1], float(karras_sigmas(nfe, SMIN, SMAX, rho)[1]), rel_tol=1e-12)


def test_sample_dispatches_auto_and_auto_is_the_default():
    """sample(method="auto") runs auto_sample (same result, exact budget); auto is the default of
    sample() (issue 5; the CLI default follows the trained-network benchmark, issue 18), and the paper-exact
    nfe-guided stays available."""
    from latentdiff.solvers.registry import DEFAULT_SAMPLER as DEFAULT_SOLVER
    from latentdiff.solvers import DEFAULT_SAMPLER

    assert "auto" in SAMPLERS and "nfe-guided" in SAMPLERS
    assert DEFAULT_SAMPLER == "auto" and DEFAULT_SOLVER == "auto"
    assert torch.equal(sample(gaussian_denoiser, _noise((2, 3)), nfe=9), auto_sample(gaussian_denoiser, _noise((2, 3)), nfe=9))
    noise = _noise((2, 3))
    out, info = sample(gaussian_denoiser, noise, method="auto", nfe=9, return_info=True)
    assert info.method == "auto" and info.nfe == 9
    assert torch.equal(out, auto_sample(gaussian_denoiser, noise, nfe=9))
    with pytest.raises(ValueError):
        sample(gaussian_denoiser, noise, method="auto", steps=5)


def test_sample_offers_the_peers_dpm_2m_and_3m():
    """The DPM-Solver++ peers are samplers of sample() (and so of the CLI): the same result as
    peer_samplers.dpm_solver_pp, one evaluation per noise level (steps= and nfe= agree), counted."""
    from latentdiff.solvers.dpm import dpm_solver_pp

    noise = _noise((2, 3, 4, 4))
    for method, order in (("dpm-2m", 2), ("dpm-3m", 3)):
        assert method in SAMPLERS
        for nfe in (1, 2, 7):
            calls = []

            def den(x, s):
                calls.append(float(s.reshape(-1)[0]))
                return gaussian_denoiser(x, s)

            out, info = sample(den, noise, method=method, nfe=nfe, sigma_max=40.0, return_info=True)
            assert info.method == method and info.nfe == nfe == len(calls)
            assert torch.equal(out, dpm_solver_pp(gaussian_denoiser, noise, nfe=nfe, sigma_max=40.0, order=order))
            assert torch.equal(out, sample(gaussian_denoiser, noise, method=method, steps=nfe, sigma_max=40.0))
        with pytest.raises(ValueError):
            sample(gaussian_denoiser, noise, method=method, nfe=5, steps=5)


# ----------------------------------------------------------------------------------------------
# ideal denoiser vs the peers, on data the constants were not fitted on


@pytest.mark.parametrize("data_seed", [7, 9])
def test_ideal_denoiser_at_least_as_accurate_as_peers(data_seed):
    """12x12 photo crops (150), dataset seeds 7/9, noise seed 3 -- not the fit data (24x24/16x16 seeds 3/5,
    8x8 latent-like, noise seed 11).  At NFE 7 and 11 auto must match at least as many samples to the
    reference's training point and have an RMS error at sigma_min no larger than EDM Heun and
    DPM-Solver++ 2M/3M.  (Misses of 64 at NFE 7 and 11, auto vs the best peer, measured with the
    Eq. 5 first step of 2026-11-22 (2): seed 7: 21 vs 35 and 5 vs 15; seed 9: 22 vs 32 and 7 vs 15;
    seed 8: 25 vs 25 and 7 vs 21.  With the earlier log-uniform first step auto missed 11 / 6, 11 / 5
    and 13 / 4: on this small-scale data (S ~ 15 < sigma_1) the new first step costs accuracy at NFE 7.)"""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
    from sampler_accuracy import LastCall, make_dataset, nearest, reference

    from latentdiff.solvers.dpm import dpm_solver_pp

    data = make_dataset("photos", 150, 12, seed=data_seed)
    den = ideal_denoiser(data)
    noise = _noise((64, *data.shape[1:]), seed=3)
    ref_x, ref_final = reference(den, noise, SMIN, SMAX, 100)
    ref_idx = nearest(ref_final, data)
    solvers = {
        "heun": lambda d, n: sample(d, noise, method="heun", nfe=n),
        "2m": lambda d, n: dpm_solver_pp(d, noise, nfe=n, order=2),
        "3m": lambda d, n: dpm_solver_pp(d, noise, nfe=n, order=3),
        "auto": lambda d, n: auto_sample(d, noise, nfe=n),
    }
    for nfe in (7, 11):
        res = {}
        for name, fn in solvers.items():
            rec = LastCall(den)
            final = fn(rec, nfe)
            assert rec.calls <= nfe
            res[name] = ((rec.x - ref_x).square().mean().sqrt().item(),
                         (nearest(final, data) == ref_idx).double().mean().item())
        best_rms = min(v[0] for k, v in res.items() if k != "auto")
        best_match = max(v[1] for k, v in res.items() if k != "auto")
        assert res["auto"][0] <= best_rms and res["auto"][1] >= best_match, (nfe, res)
