"""Power-function EMA math (EDM2 Sec. 3.1, App. C) against independent derivations: numerical moments and
integrals of the profiles (scipy quad), a brute-force discrete EMA, and a brute-force least squares on a
fine τ grid."""
import math

import numpy as np
import pytest
from scipy import integrate, optimize

from latentdiff.training.power_ema import (
    SIGMA_REL_MAX,
    gamma_to_sigma_rel,
    power_beta,
    profile_inner,
    sigma_rel_to_gamma,
    solve_weights,
)


def _density(t, g):
    """The profile written from its definition: τ^γ on [0, t], normalized numerically (no closed form)."""
    z = integrate.quad(lambda u: (u / t) ** g, 0, t)[0]
    return lambda u: ((u / t) ** g / z) if 0 <= u <= t else 0.0


def _numerical_sigma_rel(g, t=3.0):
    p = _density(t, g)
    m1 = integrate.quad(lambda u: u * p(u), 0, t)[0]
    m2 = integrate.quad(lambda u: u * u * p(u), 0, t)[0]
    return math.sqrt(m2 - m1 * m1) / t


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.15, 0.25, 0.29])
def test_sigma_rel_gamma_round_trip_against_numerical_std(sigma_rel):
    g = sigma_rel_to_gamma(sigma_rel)
    assert g > -0.382
    assert _numerical_sigma_rel(g) == pytest.approx(sigma_rel, rel=1e-7)
    assert gamma_to_sigma_rel(g) == pytest.approx(sigma_rel, rel=1e-12)
    # the root is the only one on the decreasing branch: an independent bracketed root finder agrees
    lo = (math.sqrt(5) - 1) / 2 - 1
    g2 = optimize.brentq(lambda x: _numerical_sigma_rel(x) - sigma_rel, lo + 1e-9, 1e3)
    assert g == pytest.approx(g2, rel=1e-6, abs=1e-6)


def test_known_values_and_range():
    # EDM2 App. C quotes gamma = 6.94 for sigma_rel 0.10 and 16.97 for 0.05 (rounded)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    for g in (0.0, 1.0, 6.94, 16.97, 100.0):
        assert gamma_to_sigma_rel(g) == pytest.approx(_numerical_sigma_rel(g), rel=1e-7)
    # the maximum width is attained at gamma = phi - 2
    res = optimize.minimize_scalar(lambda x: -_numerical_sigma_rel(x), bounds=(-0.9, 1.0), method="bounded",
                                   options={"xatol": 1e-10})
    assert -res.fun == pytest.approx(SIGMA_REL_MAX, rel=1e-8)
    for bad in (0.0, -0.1, SIGMA_REL_MAX, 0.5):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("ta,ga,tb,gb", [(1.0, 6.9, 1.0, 6.9), (0.4, 6.9, 1.0, 16.9), (1.0, 16.9, 0.4, 6.9),
                                         (2.0, 0.0, 5.0, 3.5), (7.0, 40.0, 7.0, 2.0), (3.0, -0.3, 1.0, 1.0)])
def test_inner_products_against_quadrature(ta, ga, tb, gb):
    pa, pb = _density(ta, ga), _density(tb, gb)
    lo = min(ta, tb)
    num = integrate.quad(lambda u: pa(u) * pb(u), 0, lo, limit=200, epsabs=0, epsrel=1e-11)[0]
    assert float(profile_inner(ta, ga, tb, gb)) == pytest.approx(num, rel=1e-8)
    assert float(profile_inner(tb, gb, ta, ga)) == pytest.approx(num, rel=1e-8)


def test_discrete_update_puts_the_profile_mass_on_each_step():
    """Brute force: run the β recursion on indicator trajectories; the weight of step k equals the
    integral of the profile over that step's image interval (computed by quadrature)."""
    gamma, batch, steps = sigma_rel_to_gamma(0.1), 16, 40
    t_end = batch * steps
    p = _density(t_end, gamma)
    weights = np.zeros(steps)
    ema = np.zeros(steps)  # ema[k] = current weight of step k's parameters
    for n in range(1, steps + 1):
        beta = power_beta(gamma, n * batch, batch)
        ema *= beta
        ema[n - 1] += 1.0 - beta
    for k in range(steps):
        weights[k] = integrate.quad(p, k * batch, (k + 1) * batch)[0]
    np.testing.assert_allclose(ema, weights, rtol=1e-9, atol=1e-14)
    assert power_beta(gamma, batch, batch) == 0.0  # the first step copies the weights
    with pytest.raises(ValueError):
        power_beta(gamma, 10, 20)


def test_least_squares_against_a_discretized_fit():
    """The analytic normal equations equal a brute-force least squares on a fine τ grid, and the fit error
    is the L2 residual of the combined profile measured on that grid."""
    g05, g10 = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)
    times = np.arange(1, 9) * 1000.0
    snap_t = np.concatenate([times, times])
    snap_g = np.array([g05] * 8 + [g10] * 8)
    target_t, target_g = 7000.0, sigma_rel_to_gamma(0.07)
    fit = solve_weights(snap_t, snap_g, target_t, target_g)
    tau = (np.arange(400_000) + 0.5) * (8000.0 / 400_000)  # midpoint rule on [0, 8000]
    dtau = 8000.0 / 400_000

    def prof(t, g):
        return np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)

    basis = np.stack([prof(t, g) for t, g in zip(snap_t, snap_g)], 1) * math.sqrt(dtau)
    target = prof(target_t, target_g) * math.sqrt(dtau)
    x_brute = np.linalg.lstsq(basis, target, rcond=None)[0]
    comb_a = basis @ fit.weights
    comb_b = basis @ x_brute
    # same combined profile (the weights themselves are ill-conditioned; the fit is what is unique)
    assert np.linalg.norm(comb_a - comb_b) <= 1e-3 * np.linalg.norm(target)
    err = np.linalg.norm(comb_a - target) / np.linalg.norm(target)
    assert fit.rel_error == pytest.approx(err, rel=2e-2, abs=1e-4)
    assert 1e-5 < fit.rel_error < 0.2
    # a target equal to a snapshot is reproduced exactly by that snapshot
    exact = solve_weights(snap_t, snap_g, 4000.0, g10)
    assert exact.rel_error < 1e-6
    assert np.abs(basis @ exact.weights - prof(4000.0, g10) * math.sqrt(dtau)).max() < 1e-6


def test_power_ema_tracker_equals_the_closed_form_weighted_average(tmp_path):
    """PowerEMA on a module whose weights follow a known trajectory equals Σ_k w_k θ_k with the closed-form
    weights w_k = (s_k/t)^(γ+1) − (s_{k−1}/t)^(γ+1) (float64, written here); save/load is exact."""
    import torch

    from latentdiff.training.ema import PowerEMA, consolidate

    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    pema = PowerEMA(net, [0.05, 0.2])
    batch, steps = 12, 30
    traj = []
    for n in range(1, steps + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        traj.append({k: v.detach().double().clone() for k, v in net.named_parameters()})
        pema.update(n * batch, batch)
    t = steps * batch
    for s in (0.05, 0.2):
        g = sigma_rel_to_gamma(s)
        w = [((k * batch / t) ** (g + 1) - ((k - 1) * batch / t) ** (g + 1)) for k in range(1, steps + 1)]
        assert sum(w) == pytest.approx(1.0, rel=1e-12)
        for name, got in pema.full_state(s, dst=None).items():
            want = sum(wk * th[name] for wk, th in zip(w, traj))
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    pema.save(tmp_path, 0, 1)
    assert (tmp_path / "power_ema.safetensors").is_file() and not (tmp_path / "ema.safetensors").exists()
    other = PowerEMA(torch.nn.Linear(5, 3), [0.05, 0.2])
    other.load(tmp_path, 0, 1)
    full = consolidate(tmp_path, stem=PowerEMA.STEM)
    for s in (0.05, 0.2):
        for name, v in other.full_state(s, dst=None).items():
            assert torch.equal(v, pema.full_state(s, dst=None)[name]) and torch.equal(v, full[s][name])
    from latentdiff.utils.errors import TrainError

    with pytest.raises(TrainError, match="sigma_rels"):
        PowerEMA(torch.nn.Linear(5, 3), [0.1]).load(tmp_path, 0, 1)
