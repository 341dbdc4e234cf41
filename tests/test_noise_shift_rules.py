"""Each shift rule against its formula (K re-computed in numpy), the WSNR-equivalence property for every
base, the rule <-> rule identity for band-limited upsampling, and the refusal of bad settings."""
import math

import pytest
import torch

from latentdiff.diffusion.noise import IDDPMSigma, LogNormalSigma, Shifted, VPSigma, wsnr_aligned
from latentdiff.diffusion.shift import ShiftRule, resolution_log_factor, wsnr_log_factor
from latentdiff.diffusion.spectral import power_spectrum, wsnr
from latentdiff.utils.errors import ConfigError
from noise_cases import BASES, assert_close, synthetic_power


def _k_numpy(p, include_dc):
    """Eq. 2-3 of wsnr.txt, independently: K = sum_c sum_uv P^2 / sum_uv P."""
    p = torch.as_tensor(p, dtype=torch.float64).numpy().copy()
    if not include_dc:
        p[:, 0, 0] = 0.0
    return float(sum((pc**2).sum() / pc.sum() for pc in p))


@pytest.mark.parametrize("include_dc", [True, False])
@pytest.mark.parametrize("sides", [(16, 64), (32, 64), (64, 16)])
def test_wsnr_shift_is_half_log_k_ratio(include_dc, sides):
    pt, pr = synthetic_power(sides[0], slope=2.4), synthetic_power(sides[1], slope=2.9, dc_mean=0.2)
    expect = 0.5 * math.log(_k_numpy(pt, include_dc) / _k_numpy(pr, include_dc))
    rule = ShiftRule("wsnr", include_dc=include_dc)
    rec = rule.resolve(power_target=pt, power_ref=pr)
    assert rec["log_factor"] == pytest.approx(expect, rel=1e-12, abs=1e-14)
    assert rec["sigma_factor"] == pytest.approx(math.exp(expect), rel=1e-12)
    assert rec["log_factor_other_dc"] == pytest.approx(wsnr_log_factor(pr, pt, include_dc=not include_dc), rel=1e-12)
    dist, _ = rule.apply(LogNormalSigma(-1.2, 1.2), power_target=pt, power_ref=pr)
    assert dist == LogNormalSigma(-1.2 + rec["log_factor"], 1.2)  # P_mean' = P_mean + 0.5 ln(K_t/K_r)
    # wsnr_aligned(base, power_ref, power_target): the same shift, arguments in the (reference, target) order
    al = wsnr_aligned(LogNormalSigma(-1.2, 1.2), pr, pt, include_dc=include_dc)
    assert al.p_mean == pytest.approx(-1.2 + expect, rel=1e-12) and al.p_std == 1.2
    assert wsnr_aligned(VPSigma(), pr, pt, include_dc=include_dc) == Shifted(VPSigma(), rec["log_factor"])


@pytest.mark.parametrize("include_dc", [True, False])
@pytest.mark.parametrize("name", sorted(BASES))
def test_wsnr_aligned_distribution_has_the_reference_wsnr_law(name, include_dc):
    """wsnr.txt Sec. 4: p(WSNR(P_target, sigma')) = p(WSNR(P_ref, sigma)); WSNR is monotone in sigma, so
    equal quantiles of WSNR <=> equal laws."""
    base = BASES[name][0]
    pt, pr = synthetic_power(16), synthetic_power(64)
    dist, _ = ShiftRule("wsnr", include_dc=include_dc).apply(base, power_target=pt, power_ref=pr)
    q = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    a = wsnr(pt, dist.quantile(q), include_dc=include_dc)
    b = wsnr(pr, base.quantile(q), include_dc=include_dc)
    assert_close(a, b, rtol=1e-10, atol=0, what="WSNR quantiles")


@pytest.mark.parametrize("d,d_ref", [(16, 64), (32, 64), (64, 64), (256, 64), (32, 256)])
def test_resolution_shift_is_log_side_ratio(d, d_ref):
    rule = ShiftRule("resolution", side_ref=d_ref)
    rec = rule.resolve(side=d)
    assert rec["log_factor"] == pytest.approx(math.log(d / d_ref), abs=1e-15)
    for base in [*(b for b, _ in BASES.values()), IDDPMSigma()]:
        dist, _ = rule.apply(base, side=d)
        assert dist.median_log_sigma == pytest.approx(base.median_log_sigma + math.log(d / d_ref), abs=1e-12)
    # SD3 form: sigma factor sqrt(m/n) for pixel counts m = d^2, n = d_ref^2
    assert rec["sigma_factor"] == pytest.approx(math.sqrt(d * d / (d_ref * d_ref)), rel=1e-14)


def _band_limited_upsample(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ideal (zero-padded spectrum) upsampling of odd-sized images by an odd factor k; x_up[::k, ::k] = x."""
    n = x.shape[-1]
    f = torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))
    big = torch.zeros(*x.shape[:-2], k * n, k * n, dtype=f.dtype)
    o = (k * n - n) // 2
    big[..., o : o + n, o : o + n] = f
    return torch.fft.ifft2(torch.fft.ifftshift(big, dim=(-2, -1)), norm="ortho").real * k


@pytest.mark.parametrize("include_dc", [True, False])
def test_wsnr_equals_resolution_rule_for_band_limited_upsampled_reference(include_dc):
    """If the reference is the target upsampled ideally from d to d_ref = k d, then P_ref = k^2 P_target on the
    target's band and 0 elsewhere, so K_ref = k^2 K_target and 0.5 ln(K_t/K_r) = ln(d/d_ref) exactly."""
    g = torch.Generator().manual_seed(2)
    x = torch.cumsum(torch.cumsum(torch.randn(64, 3, 15, 15, generator=g, dtype=torch.float64), -1), -2) / 15 + 0.3
    up = _band_limited_upsample(x, 3)
    assert_close(up[..., ::3, ::3], x, rtol=0, atol=1e-12, what="interpolation")
    c = wsnr_log_factor(power_spectrum(up), power_spectrum(x), include_dc=include_dc)
    assert c == pytest.approx(resolution_log_factor(15, 45), abs=1e-12)


def test_none_rule_returns_the_base():
    base = LogNormalSigma(-1.2, 1.2)
    dist, rec = ShiftRule("none").apply(base)
    assert dist is base and rec == {"rule": "none", "log_factor": 0.0, "sigma_factor": 1.0}


def test_rule_round_trip_and_bad_values():
    for r in [ShiftRule(), ShiftRule("wsnr", include_dc=False, reference="/data/imagenet64"),
              ShiftRule("resolution", side_ref=256)]:
        assert ShiftRule.from_dict(r.to_dict()) == r
    for kwargs, field in [({"rule": "snr"}, "ShiftRule.rule"), ({"include_dc": 1}, "ShiftRule.include_dc"),
                          ({"side_ref": 0}, "ShiftRule.side_ref"), ({"side_ref": 64.0}, "ShiftRule.side_ref"),
                          ({"reference": ""}, "ShiftRule.reference")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            ShiftRule(**kwargs)
    with pytest.raises(ConfigError, match="unknown fields"):
        ShiftRule.from_dict({"rule": "none", "d_ref": 64})
    with pytest.raises(ValueError, match="needs power_target and power_ref"):
        ShiftRule("wsnr").resolve(power_target=synthetic_power(16))
    with pytest.raises(ValueError, match="needs side"):
        ShiftRule("resolution").resolve()
    with pytest.raises(ConfigError, match="side must be a positive"):
        resolution_log_factor(0)
    with pytest.raises(ValueError, match="zero total power"):
        wsnr_log_factor(torch.zeros(3, 8, 8), synthetic_power(8))
