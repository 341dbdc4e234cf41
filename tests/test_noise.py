"""noise.py: training sigma distributions, Karras grid, distance statistics, data-driven sigma_max."""
import math

import numpy as np
import pytest
import torch

from latentdiff.diffusion.distances import DistanceStats, data_driven_sigma_max, p_upper_bound
from latentdiff.diffusion.noise import (
    IDDPMSigma,
    LogNormalSigma,
    VESigma,
    VPSigma,
    sigma_distribution_from_dict,
    wsnr_aligned,
)
from latentdiff.diffusion.grids import iddpm_sigmas, karras_sigmas, vp_sigma, vp_sigma_inv
from latentdiff.diffusion.spectral import wsnr


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_lognormal_defaults_quantiles_and_sampling():
    d = LogNormalSigma()
    assert (d.p_mean, d.p_std) == (-1.2, 1.2)  # edm.txt Table 1
    s = d.sample(200_000, generator=_gen(1))
    logs = torch.log(s)
    assert abs(logs.mean().item() + 1.2) < 0.01 and abs(logs.std().item() - 1.2) < 0.01
    # analytic quantiles: exp(P_mean + P_std * Phi^-1(q))
    for q, z in ((0.5, 0.0), (0.8413447460685429, 1.0), (0.022750131948179195, -2.0)):
        assert math.isclose(d.quantile(q).item(), math.exp(-1.2 + 1.2 * z), rel_tol=1e-9)
        assert abs((s <= d.quantile(q)).double().mean().item() - q) < 0.005
    # same generator seed -> same draws; different seeds differ
    assert torch.equal(d.sample(5, _gen(7)), d.sample(5, _gen(7)))
    assert not torch.equal(d.sample(5, _gen(7)), d.sample(5, _gen(8)))
    # log density integrates to 1 over ln(sigma)
    grid = torch.linspace(-12, 10, 20001, dtype=torch.float64)
    dens = torch.exp(d.log_pdf(torch.exp(grid)))
    assert abs(torch.trapezoid(dens, grid).item() - 1) < 1e-6
    with pytest.raises(ValueError):
        LogNormalSigma(0.0, 0.0)


def test_wsnr_aligned_equals_analytic_shift_and_matches_wsnr_distribution():
    g = _gen(2)
    p_ref = torch.rand(3, 8, 8, generator=g, dtype=torch.float64) ** 4
    p_tgt = torch.rand(4, 4, 4, generator=g, dtype=torch.float64) ** 2
    base = LogNormalSigma()
    al = wsnr_aligned(base, p_ref, p_tgt)
    k_ref = sum(((p_ref[c] ** 2).sum() / p_ref[c].sum()).item() for c in range(3))
    k_tgt = sum(((p_tgt[c] ** 2).sum() / p_tgt[c].sum()).item() for c in range(4))
    assert math.isclose(al.p_mean, -1.2 + 0.5 * math.log(k_tgt / k_ref), rel_tol=1e-12)
    assert al.p_std == base.p_std
    # the WSNR distribution on the target under `al` equals the base's on the reference
    w_ref = torch.sort(wsnr(p_ref, base.sample(50_000, _gen(3)))).values
    w_tgt = torch.sort(wsnr(p_tgt, al.sample(50_000, _gen(3)))).values
    assert torch.allclose(torch.log(w_ref), torch.log(w_tgt), atol=1e-9)
    # aligning a dataset to itself is the identity
    assert math.isclose(wsnr_aligned(base, p_ref, p_ref).p_mean, base.p_mean, abs_tol=1e-12)


def test_vp_schedule_and_distribution():
    t = torch.tensor([1e-5, 0.1, 0.5, 1.0], dtype=torch.float64)
    s = vp_sigma(t)
    ref = torch.sqrt(torch.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)
    assert torch.allclose(s, ref, rtol=1e-12)
    assert torch.allclose(vp_sigma_inv(s), t, rtol=1e-9)
    d = VPSigma()
    tt = vp_sigma_inv(d.sample(100_000, _gen(4)))
    assert tt.min() >= 1e-5 - 1e-12 and tt.max() <= 1.0 + 1e-12
    # sigma^-1(sigma) ~ U(eps_t, 1): uniform deciles
    hist = torch.histc(tt, bins=10, min=0.0, max=1.0) / tt.numel()
    assert (hist - 0.1).abs().max() < 0.006


def test_ve_distribution_is_log_uniform():
    d = VESigma()
    assert (d.sigma_min, d.sigma_max) == (0.02, 100.0)
    ls = torch.log(d.sample(100_000, _gen(5)))
    lo, hi = math.log(0.02), math.log(100)
    assert ls.min() >= lo and ls.max() <= hi
    hist = torch.histc(ls, bins=10, min=lo, max=hi) / ls.numel()
    assert (hist - 0.1).abs().max() < 0.006


def test_iddpm_sigmas_follow_the_recursion():
    m, c1, c2 = 1000, 0.001, 0.008
    u = iddpm_sigmas(m, c1, c2)
    assert u.shape == (m + 1,) and u[-1] == 0
    # independent numpy evaluation of edm.txt Table 1's recursion
    abar = np.sin(0.5 * np.pi * np.arange(m + 1) / (m * (c2 + 1))) ** 2
    ref = np.zeros(m + 1)
    for j in range(m, 0, -1):
        ref[j - 1] = np.sqrt((ref[j] ** 2 + 1) / max(abar[j - 1] / abar[j], c1) - 1)
    assert np.allclose(u.numpy(), ref, rtol=1e-12)
    assert (u[:-1] > u[1:]).all()
    d = IDDPMSigma()
    s = d.sample(1000, _gen(6))
    assert torch.isin(s, u[:-1]).all()


def test_distributions_round_trip_through_dicts():
    for d in (LogNormalSigma(-0.4, 1.1), VPSigma(), VESigma(0.1, 50), IDDPMSigma()):
        assert sigma_distribution_from_dict(d.to_dict()) == d
    with pytest.raises(ValueError, match="unknown sigma distribution"):
        sigma_distribution_from_dict({"kind": "cosine"})


def test_karras_sigmas_eq5():
    s = karras_sigmas(10, 0.002, 80.0, 7.0)
    assert s.dtype == torch.float64 and s.shape == (11,)
    assert s[0] == 80.0 and s[9] == 0.002 and s[10] == 0
    assert (s[:-1] > s[1:]).all()
    i = torch.arange(10, dtype=torch.float64)
    ref = (80 ** (1 / 7) + i / 9 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(s[:-1], ref, rtol=1e-12)
    assert torch.equal(karras_sigmas(1, 0.002, 80.0), torch.tensor([80.0, 0.0], dtype=torch.float64))
    for bad in (dict(steps=0, sigma_min=0.1, sigma_max=1), dict(steps=3, sigma_min=2, sigma_max=1)):
        with pytest.raises(ValueError):
            karras_sigmas(**bad)


def _brute_force_distance_moments(y: torch.Tensor):
    f = y.reshape(y.shape[0], -1).double()
    d2 = torch.cdist(f, f).square()
    n = f.shape[0]
    per_point = d2.sum(dim=1) / (n - 1)  # the j = i term is zero
    return per_point, per_point.mean().item(), per_point.std(unbiased=False).item()


def test_distance_stats_equal_brute_force_and_any_channel_scale():
    g = _gen(8)
    y = torch.randn(203, 3, 5, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    y = y + torch.tensor([3.0, -1.0, 0.0]).view(1, 3, 1, 1)
    st = DistanceStats.from_tensor(y, batch_size=50)
    per_point, mu, sd = _brute_force_distance_moments(y)
    assert math.isclose(st.mu_d, mu, rel_tol=1e-10)
    assert math.isclose(st.sigma_d, sd, rel_tol=1e-8)
    assert torch.allclose(st.per_point(y[:17]), per_point[:17], rtol=1e-10)
    # per-channel affine normalization, exact from the stored moments
    scale, shift = torch.tensor([0.3, 1.7, 4.0]), torch.tensor([0.5, -2.0, 1.0])
    yn = (y - shift.view(1, 3, 1, 1)) * scale.view(1, 3, 1, 1)
    _, mu_n, sd_n = _brute_force_distance_moments(yn)
    mu_s, sd_s = st.moments(scale)
    assert math.isclose(mu_s, mu_n, rel_tol=1e-10) and math.isclose(sd_s, sd_n, rel_tol=1e-8)


def test_distance_stats_merge_and_state_dict():
    y = torch.randn(120, 2, 6, 6, dtype=torch.float64)
    a, b = DistanceStats(), DistanceStats()
    a.update_mean(y[:50]), b.update_mean(y[50:])
    a.merge(b).finish_mean()
    c, d = DistanceStats(), DistanceStats()
    c.mean = d.mean = a.mean  # pass 2 on two "ranks" sharing the merged mean
    c.n = d.n = a.n
    c.update_distances(y[:70]), d.update_distances(y[70:])
    a.merge(c).merge(d)
    ref = DistanceStats.from_tensor(y)
    assert math.isclose(a.mu_d, ref.mu_d, rel_tol=1e-12) and math.isclose(a.sigma_d, ref.sigma_d, rel_tol=1e-9)
    again = DistanceStats.from_state_dict(a.state_dict())
    assert again.moments() == a.moments()
    with pytest.raises(RuntimeError, match="pass 1 saw"):
        e = DistanceStats()
        e.update_mean(y).finish_mean()
        e.update_distances(y[:10])
        e.moments()


def test_distance_stats_scales_linearly_in_n_in_memory():
    # memory independent of N: the state has the size of one point plus C + C^2 numbers
    st = DistanceStats.from_tensor(torch.randn(3000, 4, 8, 8, dtype=torch.float64), batch_size=256)
    sizes = {k: (v.numel() if torch.is_tensor(v) else 1) for k, v in st.state_dict().items()}
    assert sizes == {"n": 1, "mean": 4 * 64, "sum_a": 4, "sum_aa": 16}


def test_data_driven_sigma_max_and_p_upper_bound():
    st = DistanceStats.from_tensor(torch.randn(300, 3, 4, 4, dtype=torch.float64))
    mu, sd = st.moments()
    for alpha in (1.0, 2.0, 3.0):
        assert math.isclose(data_driven_sigma_max(st, alpha), math.sqrt(mu + alpha * sd), rel_tol=1e-12)
        assert math.isclose(data_driven_sigma_max((mu, sd), alpha), math.sqrt(mu + alpha * sd), rel_tol=1e-12)
    # white data in d dims: mean squared distance ~ 2 d (N/(N-1))
    assert abs(mu / (2 * 48) - 1) < 0.05
    n, d2 = 1000, 50.0
    s = torch.tensor([1e-3, 1.0, 5.0, 1e4], dtype=torch.float64)
    p = p_upper_bound(s, d2, n)
    ref = 1 / (1 + (n - 1) * torch.exp(-d2 / (2 * s**2)))
    assert torch.allclose(p, ref, rtol=1e-12)
    assert math.isclose(p[0].item(), 1.0) and abs(p[-1].item() - 1 / n) < 1e-6
    assert (p[:-1] >= p[1:]).all()
    with pytest.raises(ValueError):
        data_driven_sigma_max(st, -1)
