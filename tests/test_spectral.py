"""spectral.py: power spectrum conventions, WSNR (wsnr.txt Eq. 2-3), WSNR-equivalent sigma."""
import math

import pytest
import torch

from latentdiff.data.photos import random_crops
from latentdiff.diffusion.spectral import (
    SpectrumAccumulator,
    power_spectrum,
    radial_profile,
    wsnr,
    wsnr_constant,
    wsnr_equivalent_sigma,
)


def test_white_noise_has_flat_power_sigma_squared():
    # Eq. 3 / Appendix A.1: E[P_{sigma n}(u, v)] = sigma^2 in every bin, by Monte Carlo.
    g = torch.Generator().manual_seed(1)
    sigma = 0.7
    x = sigma * torch.randn(4000, 2, 16, 12, generator=g, dtype=torch.float64)
    p = power_spectrum(x)
    assert p.shape == (2, 16, 12) and p.dtype == torch.float64
    # each bin is a mean of 4000 chi^2 draws (relative std ~ 1/sqrt(4000) ~ 1.6% for complex bins,
    # ~2.2% for the real-valued bins); 6 sigma bound per bin
    assert torch.allclose(p, torch.full_like(p, sigma**2), rtol=0.14)
    assert abs(p.mean().item() - sigma**2) < 0.01 * sigma**2


def test_parseval():
    x = torch.randn(3, 4, 9, 7, dtype=torch.float64)
    p = power_spectrum(x)
    energy = x.square().sum(dim=(-2, -1)).mean(dim=0)
    assert torch.allclose(p.sum(dim=(-2, -1)), energy, rtol=1e-12)


def test_power_spectrum_matches_dft_definition():
    # explicit DFT with the orthonormal 1/sqrt(HW) factor of Appendix A.1
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64)
    h, w = 5, 6
    k = torch.arange(h, dtype=torch.float64)
    l = torch.arange(w, dtype=torch.float64)
    ref = torch.zeros(h, w, dtype=torch.float64)
    for u in range(h):
        for v in range(w):
            phase = -2 * math.pi * (k[:, None] * u / h + l[None, :] * v / w)
            re = (x[:, 0] * torch.cos(phase)).sum(dim=(-2, -1)) / math.sqrt(h * w)
            im = (x[:, 0] * torch.sin(phase)).sum(dim=(-2, -1)) / math.sqrt(h * w)
            ref[u, v] = (re**2 + im**2).mean()
    assert torch.allclose(power_spectrum(x)[0], ref, rtol=1e-10, atol=1e-12)


def test_wsnr_equals_defining_double_sum():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(3, 6, 5, generator=g, dtype=torch.float64) ** 3
    for sigma in (0.01, 0.5, 7.0):
        ref = 0.0
        for c in range(3):
            total = sum(p[c, u, v].item() for u in range(6) for v in range(5))
            for u in range(6):
                for v in range(5):
                    ref += (p[c, u, v].item() / total) * (p[c, u, v].item() / sigma**2)
        assert math.isclose(wsnr(p, sigma).item(), ref, rel_tol=1e-12)
    # broadcasting over sigma
    s = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    assert torch.allclose(wsnr(p, s), torch.stack([wsnr(p, v) for v in s]))


def test_wsnr_with_monte_carlo_noise_power():
    # Eq. 2 with the *measured* noise spectrum instead of Eq. 3's sigma^2 gives the same WSNR
    g = torch.Generator().manual_seed(4)
    p = torch.rand(1, 8, 8, generator=g, dtype=torch.float64) + 0.1
    sigma = 0.3
    pn = power_spectrum(sigma * torch.randn(20000, 1, 8, 8, generator=g, dtype=torch.float64))
    mc = ((p / p.sum()) * (p / pn)).sum()
    assert math.isclose(mc.item(), wsnr(p, sigma).item(), rel_tol=0.02)


def test_dc_free_variant_is_an_option_not_the_default():
    p = torch.rand(2, 4, 4, dtype=torch.float64)
    p[:, 0, 0] = 100.0  # a dominant DC bin, as in natural images
    q = p.clone()
    q[:, 0, 0] = 0.0
    assert torch.allclose(wsnr(p, 1.0, include_dc=False), wsnr(q, 1.0))
    assert wsnr(p, 1.0) > 10 * wsnr(p, 1.0, include_dc=False)
    assert torch.equal(wsnr(p, 1.0), wsnr(p, 1.0, include_dc=True))


def test_wsnr_equivalent_sigma_round_trips():
    g = torch.Generator().manual_seed(5)
    pa = torch.rand(3, 8, 8, generator=g, dtype=torch.float64) ** 2
    pb = torch.rand(4, 4, 4, generator=g, dtype=torch.float64) ** 4
    for sigma in (0.002, 0.3, 80.0):
        s2 = wsnr_equivalent_sigma(sigma, pa, pb)
        assert torch.allclose(wsnr(pb, s2), wsnr(pa, sigma), rtol=1e-12)
        back = wsnr_equivalent_sigma(s2, pb, pa)
        assert math.isclose(back.item(), sigma, rel_tol=1e-12)


def test_natural_images_wsnr_depends_on_resolution_and_matches_at_equivalent_sigma():
    # wsnr.txt Fig. 2: at the same sigma, larger crops of the same photos are *less* noisy
    # (higher WSNR); at the WSNR-equivalent sigma the two agree.
    x32, _ = random_crops(600, 32, seed=11, dtype=torch.float64)
    x64, _ = random_crops(600, 64, seed=12, dtype=torch.float64)
    p32, p64 = power_spectrum(x32), power_spectrum(x64)
    sig = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=torch.float64)
    w32, w64 = wsnr(p32, sig), wsnr(p64, sig)
    assert (w64 > 2.0 * w32).all(), (w32, w64)
    s_eq = wsnr_equivalent_sigma(sig, p32, p64)
    assert (s_eq > 1.3 * sig).all()
    assert torch.allclose(wsnr(p64, s_eq), w32, rtol=1e-12)
    # the same holds for the DC-free variant, with a smaller (but still > 1) shift
    s_eq_nodc = wsnr_equivalent_sigma(sig, p32, p64, include_dc=False)
    assert (s_eq_nodc > sig).all()
    # natural images are far from white: the radial spectrum falls off with frequency
    r, prof = radial_profile(p64)
    assert prof[1] > 10 * prof[-1]


def test_accumulator_streaming_merge_and_state():
    x = torch.randn(37, 3, 8, 8)
    full = SpectrumAccumulator().update(x)
    parts = [SpectrumAccumulator().update(x[i : i + 10]) for i in range(0, 37, 10)]
    merged = SpectrumAccumulator()
    for p in parts:
        merged.merge(p)
    assert merged.count == 37 and full.count == 37
    assert torch.allclose(merged.power, power_spectrum(x), rtol=1e-13)
    assert torch.allclose(full.power, merged.power, rtol=1e-13)
    again = SpectrumAccumulator.from_state_dict(merged.state_dict())
    assert torch.equal(again.power, merged.power)
    with pytest.raises(ValueError, match="shape changed"):
        full.update(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        SpectrumAccumulator().power


def test_wsnr_input_validation():
    with pytest.raises(ValueError):
        wsnr(torch.ones(2, 2, 2), 0.0)
    with pytest.raises(ValueError):
        wsnr_constant(torch.ones(2, 2, 2, 2))
    with pytest.raises(ValueError):
        wsnr_constant(torch.zeros(1, 2, 2))
    assert math.isclose(wsnr_constant(torch.ones(1, 2, 2)).item(), 1.0)


def test_affine_power_spectrum_is_exact():
    from latentdiff.diffusion.spectral import affine_power_spectrum

    g = torch.Generator().manual_seed(9)
    y = torch.randn(500, 3, 6, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.3]).view(1, 3, 1, 1)
    y = y + torch.tensor([0.7, -1.5, 3.0]).view(1, 3, 1, 1)
    shift, scale = torch.tensor([0.2, -1.0, 2.5]), torch.tensor([0.5, 3.0, -1.2])
    direct = power_spectrum((y - shift.view(1, 3, 1, 1)) * scale.view(1, 3, 1, 1))
    mean_c = y.mean(dim=(0, 2, 3))
    assert torch.allclose(affine_power_spectrum(power_spectrum(y), mean_c, shift, scale), direct, rtol=1e-10, atol=1e-10)
