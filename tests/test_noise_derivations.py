"""The mappings of SD3's rectified flow and simple diffusion's shifted cosine onto EDM sigma, checked
numerically against the papers' own formulas (written out here, independent of the classes)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from latentdiff.diffusion.noise import CosineSigma, LogitNormalSigma, rectified_flow_sigma, rectified_flow_time
from noise_cases import N_KS, assert_close, gen


def _sd3_draw_t(n, m, s, g):
    """SD3 Sec. 3.1 as written: u ~ N(m, s^2), t = sigmoid(u)."""
    u = m + s * torch.randn(n, generator=g, dtype=torch.float64)
    return u, torch.sigmoid(u)


def test_rectified_flow_divided_by_one_minus_t_is_edm():
    """x_t = (1 - t) x0 + t eps  =>  x_t / (1 - t) = x0 + sigma eps with sigma = t/(1-t), ln sigma = logit t = u."""
    g = gen(5)
    u, t = _sd3_draw_t(4096, 0.0, 1.0, g)
    x0 = torch.randn(4096, 8, generator=g, dtype=torch.float64) * 0.5
    eps = torch.randn(4096, 8, generator=g, dtype=torch.float64)
    xt = (1 - t)[:, None] * x0 + t[:, None] * eps
    sigma = rectified_flow_sigma(t)
    assert_close(xt / (1 - t)[:, None], x0 + sigma[:, None] * eps, rtol=1e-12, atol=1e-12, what="x_t/(1-t)")
    assert_close(torch.log(sigma), u, rtol=0, atol=1e-11, what="ln sigma = u")
    assert_close(rectified_flow_time(sigma), t, rtol=1e-14, atol=0, what="t(sigma)")


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (-0.5, 0.8), (1.0, 1.6)])
def test_sd3_time_samples_follow_the_logit_normal_sigma_cdf(m, s):
    _, t = _sd3_draw_t(N_KS, m, s, gen(11))
    sig = (t / (1 - t)).numpy()
    d = LogitNormalSigma(m, s)
    assert stats.kstest(sig, lambda x: d.cdf(torch.from_numpy(x)).numpy()).pvalue > 0.01
    # and the density of t (SD3 Eq. for pi_ln) equals p(ln sigma) * dln(sigma)/dt = p(u) / (t (1 - t))
    tt = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    pi_ln = torch.exp(-(torch.logit(tt) - m) ** 2 / (2 * s * s)) / (s * math.sqrt(2 * math.pi) * tt * (1 - tt))
    dens_t = torch.exp(d.log_pdf(rectified_flow_sigma(tt))) / (tt * (1 - tt))
    assert_close(dens_t, pi_ln, rtol=1e-12, atol=0, what="pi_ln")


@pytest.mark.parametrize("alpha", [0.25, 3.0, 4.0])
def test_sd3_time_shift_is_a_sigma_scale(alpha):
    """SD3 Sec. 5.3.2: t_m = a t_n / (1 + (a - 1) t_n)  <=>  sigma_m = a sigma_n  <=>  LogitNormal(m + ln a, s)."""
    q = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    base = LogitNormalSigma(0.0, 1.0)
    t_n = torch.sigmoid(torch.special.ndtri(q))  # SD3 base quantiles in t
    t_m = alpha * t_n / (1 + (alpha - 1) * t_n)
    assert_close(rectified_flow_sigma(t_m), alpha * rectified_flow_sigma(t_n), rtol=1e-12, atol=0, what="sigma scale")
    assert_close(base.shift(math.log(alpha)).quantile(q), rectified_flow_sigma(t_m), rtol=1e-12, atol=0,
                 what="shifted quantile")


def test_rectified_flow_loss_is_an_edm_weighted_x0_loss():
    """||v - v_hat||^2 with v = eps - x0 and v_hat from an x0-prediction D equals ((1+sigma)/sigma)^2 ||D - x0||^2."""
    g = gen(7)
    t = torch.rand(512, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x0, eps, D = (torch.randn(512, 16, generator=g, dtype=torch.float64) for _ in range(3))
    xt = (1 - t)[:, None] * x0 + t[:, None] * eps
    v_hat = (xt - D) / t[:, None]  # eps_hat - D with eps_hat = (x_t - (1-t) D) / t
    lhs = ((eps - x0) - v_hat).square().sum(1)
    sigma = rectified_flow_sigma(t)
    rhs = ((1 + sigma) / sigma).square() * (D - x0).square().sum(1)
    assert_close(lhs, rhs, rtol=1e-10, atol=0, what="RF loss weight")


def _simple_diffusion_logsnr(t, d, d_ref=64, logsnr_min=-15.0, logsnr_max=15.0):
    """Hoogeboom et al. 2023, Sec. 3 pseudocode (cosine with clipped angle, then + 2 log(d_ref / d))."""
    a0 = math.atan(math.exp(-0.5 * logsnr_max))
    a1 = math.atan(math.exp(-0.5 * logsnr_min))
    return -2 * np.log(np.tan(a0 + t * (a1 - a0))) + 2 * math.log(d_ref / d)


@pytest.mark.parametrize("d", [16, 32, 64, 128, 256])
def test_shifted_cosine_matches_simple_diffusion(d):
    t = np.linspace(0.0, 1.0, 1001)
    sig_paper = np.exp(-0.5 * _simple_diffusion_logsnr(t, d))  # sigma^2 = 1/SNR in the EDM parametrization
    dist = CosineSigma().shift(math.log(d / 64))
    assert_close(dist.quantile(torch.from_numpy(t)), sig_paper, rtol=1e-12, atol=0, what=f"d={d}")
    lo, hi = (float(v) for v in torch.log(dist.quantile(torch.tensor([0.0, 1.0], dtype=torch.float64))))
    assert lo == pytest.approx(-7.5 + math.log(d / 64), abs=1e-12)
    assert hi == pytest.approx(7.5 + math.log(d / 64), abs=1e-12)
