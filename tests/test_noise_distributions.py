"""Each base and each shifted version against its analytic CDF (KS), inverse/density/median consistency,
dict round trips, bad-parameter messages, and bitwise agreement with the draws of the earlier samplers
(their formulas restated here) and with the dicts that checkpoints already hold.

KS determinism: samples come from a seeded CPU torch.Generator (mt19937), so the statistic and the
p-value are fixed up to float64 rounding of exp/log/tan (ulp level: the p-values agree to >= 12 digits
under ATEN_CPU_CAPABILITY=default/avx2/avx512).  The KS statistic is invariant under the monotone map
uniform/normal draw -> sigma, so each KS test checks that the sampler's map is the inverse of the CDF.
"""
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from latentdiff.diffusion.grids import iddpm_sigmas
from latentdiff.diffusion.noise import (CosineSigma, IDDPMSigma, LogitNormalSigma, LogNormalSigma, Shifted, VESigma,
                                        VPSigma, sigma_distribution_from_dict)
from latentdiff.utils.errors import ConfigError
from noise_cases import BASES, N_KS, SHIFTS, assert_close, gen


def _shifted(base, c, path):
    return Shifted(base, c) if path == "wrapper" else base.shift(c)


@pytest.mark.parametrize("path", ["wrapper", "family"])
@pytest.mark.parametrize("shift", sorted(SHIFTS))
@pytest.mark.parametrize("name", sorted(BASES))
def test_ks_against_analytic_cdf(name, shift, path):
    base, ref = BASES[name]
    c = SHIFTS[shift]
    dist = _shifted(base, c, path)
    x = dist.sample(N_KS, gen()).numpy()
    assert x.dtype == np.float64 and x.shape == (N_KS,)
    res = stats.kstest(x, ref(c))
    assert res.pvalue > 0.01, f"{dist!r}: KS D = {res.statistic:.4g}, p = {res.pvalue:.3g}"
    # the class CDF is the analytic one (so the same KS statistic follows from either)
    assert_close(dist.cdf(torch.from_numpy(x)), ref(c)(x), rtol=0, atol=1e-12, what=f"cdf of {dist!r}")


@pytest.mark.parametrize("name", sorted(BASES))
def test_ks_detects_a_wrong_shift(name):
    """Power check: the same KS test rejects a CDF that is off by 0.2 in ln sigma."""
    base, ref = BASES[name]
    x = base.shift(SHIFTS["resolution"]).sample(N_KS, gen()).numpy()
    assert stats.kstest(x, ref(SHIFTS["resolution"] + 0.2)).pvalue < 1e-6


ALL = {**{k: v[0] for k, v in BASES.items()}, "iddpm": IDDPMSigma()}
ALL_SHIFTED = {f"{k}+{s}": d.shift(c) for k, d in ALL.items() for s, c in SHIFTS.items()}


@pytest.mark.parametrize("name", sorted(set(ALL_SHIFTED) - {k for k in ALL_SHIFTED if k.startswith("iddpm")}))
def test_quantile_inverts_cdf(name):
    dist = ALL_SHIFTED[name]
    q = torch.linspace(1e-6, 1 - 1e-6, 2001, dtype=torch.float64)
    s = dist.quantile(q)
    assert s.dtype == torch.float64 and bool((s[1:] > s[:-1]).all())
    assert_close(dist.cdf(s), q, rtol=0, atol=1e-11, what="cdf(quantile(q))")
    assert_close(dist.quantile(dist.cdf(s)), s, rtol=1e-7, atol=0, what="quantile(cdf(sigma))")


@pytest.mark.parametrize("name", sorted(set(ALL_SHIFTED) - {k for k in ALL_SHIFTED if k.startswith("iddpm")}))
def test_log_pdf_is_the_derivative_of_the_cdf_in_log_sigma(name):
    """p(lambda) = dF/dlambda, checked by a central difference (h = 1e-5: error ~h^2 F''' ~ 1e-10)."""
    dist = ALL_SHIFTED[name]
    lam = torch.log(dist.quantile(torch.linspace(0.002, 0.998, 301, dtype=torch.float64)))
    h = 1e-5
    num = (dist.cdf(torch.exp(lam + h)) - dist.cdf(torch.exp(lam - h))) / (2 * h)
    assert_close(torch.exp(dist.log_pdf(torch.exp(lam))), num, rtol=1e-5, atol=1e-9, what="density")


@pytest.mark.parametrize("name", sorted(ALL_SHIFTED))
def test_median(name):
    dist = ALL_SHIFTED[name]
    m = dist.median_log_sigma
    assert isinstance(m, float)
    assert m == pytest.approx(float(torch.log(dist.quantile(0.5))), abs=1e-12)
    assert float(dist.cdf(math.exp(m) * (1 + 1e-12))) >= 0.5


def test_median_closed_forms():
    assert LogNormalSigma(-1.2, 1.2).median_log_sigma == -1.2
    assert LogitNormalSigma(0.3, 2).median_log_sigma == 0.3
    assert CosineSigma().median_log_sigma == pytest.approx(0.0, abs=1e-14)  # symmetric clip: tan(pi/4)
    assert VESigma(0.02, 100).median_log_sigma == pytest.approx(0.5 * math.log(2.0), abs=1e-12)
    for d in ALL.values():
        for c in SHIFTS.values():
            assert d.shift(c).median_log_sigma == pytest.approx(d.median_log_sigma + c, abs=1e-12)


def test_iddpm_is_the_uniform_index_law_on_its_atoms():
    """Discrete law: the atoms are hit exactly and the index counts pass a chi-square test."""
    d = IDDPMSigma(M=50)
    atoms = d.atoms
    for c in SHIFTS.values():
        x = d.shift(c).sample(N_KS, gen())
        j = torch.searchsorted(atoms * math.exp(c), x)
        assert_close(x, atoms[j] * math.exp(c), rtol=1e-15, atol=0, what="atoms")
        res = stats.chisquare(torch.bincount(j, minlength=50).numpy())
        assert res.pvalue > 0.01, res
    k = torch.arange(50, dtype=torch.float64)
    assert_close(d.cdf(atoms), (k + 1) / 50.0, rtol=0, atol=0, what="cdf at atoms")
    assert_close(d.cdf(atoms * (1 - 1e-12)), k / 50.0, rtol=0, atol=0, what="cdf below atoms")
    assert_close(d.quantile((k + 1) / 50.0), atoms, rtol=0, atol=0, what="quantile")
    assert_close(d.quantile((k + 0.5) / 50.0), atoms, rtol=0, atol=0, what="quantile inside steps")
    assert float(d.log_pmf(atoms[3])) == -math.log(50) and float(d.log_pmf(atoms[3] * 1.01)) == -math.inf
    with pytest.raises(TypeError, match="discrete"):
        d.log_pdf(1.0)


@pytest.mark.parametrize("name", sorted(ALL_SHIFTED))
def test_dict_round_trip_through_json(name):
    dist = ALL_SHIFTED[name]
    d = json.loads(json.dumps(dist.to_dict()))
    back = sigma_distribution_from_dict(d)
    assert back == dist and type(back) is type(dist) and back.to_dict() == dist.to_dict()


def test_shift_stays_in_family_where_closed():
    assert LogNormalSigma(-1.2, 1.2).shift(0.5) == LogNormalSigma(-0.7, 1.2)
    assert LogitNormalSigma(0, 1).shift(-0.25) == LogitNormalSigma(-0.25, 1)
    assert VESigma(0.02, 100).shift(math.log(2)) == VESigma(0.04, 200)
    assert Shifted(Shifted(CosineSigma(), 0.5), -0.25) == Shifted(CosineSigma(), 0.25)
    assert CosineSigma().shift(0.5).shift(0.25) == Shifted(CosineSigma(), 0.75)


# The samplers of the four earlier kinds, restated from their formulas (edm.txt Table 1) as the package
# drew them before the distributions gained cdf/quantile/shift: training runs resumed across the change
# must draw the same sigmas and leave the generator at the same state.
def _old_lognormal(n, g):
    return torch.exp(-0.7 + 1.1 * torch.randn(n, generator=g, dtype=torch.float64))


def _old_vp(n, g):
    t = 1e-5 + (1 - 1e-5) * torch.rand(n, generator=g, dtype=torch.float64)
    return torch.sqrt(torch.expm1(0.5 * 19.9 * t.square() + 0.1 * t))


def _old_ve(n, g):
    lo, hi = math.log(0.1), math.log(50.0)
    return torch.exp(lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64))


def _old_iddpm(n, g):
    return iddpm_sigmas(1000, 0.001, 0.008)[torch.randint(0, 1000, (n,), generator=g)]


OLD_DRAWS = {"lognormal": (LogNormalSigma(-0.7, 1.1), _old_lognormal), "vp": (VPSigma(), _old_vp),
             "ve": (VESigma(0.1, 50.0), _old_ve), "iddpm": (IDDPMSigma(), _old_iddpm)}


@pytest.mark.parametrize("name", sorted(OLD_DRAWS))
def test_draws_are_bitwise_those_of_the_earlier_samplers(name):
    dist, old = OLD_DRAWS[name]
    g_new, g_old = gen(3), gen(3)
    for n in (1000, 7):  # two calls in a row: the generator stream is consumed identically
        a, b = dist.sample(n, g_new), old(n, g_old)
        assert a.dtype == torch.float64 and torch.equal(a, b), name
    assert torch.equal(g_new.get_state(), g_old.get_state())


def test_lognormal_quantile_and_density_match_the_earlier_formulas():
    """Earlier: quantile exp(P_mean + P_std sqrt(2) erfinv(2q - 1)), log_pdf -z^2/2 - ln(P_std sqrt(2 pi)).
    ndtri replaces erfinv(2q - 1), which loses relative accuracy ~eps/q in the tails: 1e-12 holds for
    q in [1e-3, 1 - 1e-3] (measured 2e-14)."""
    d = LogNormalSigma(0.4, 2.0)
    q = torch.linspace(1e-3, 1 - 1e-3, 9999, dtype=torch.float64)
    assert_close(d.quantile(q), torch.exp(0.4 + 2.0 * math.sqrt(2.0) * torch.erfinv(2 * q - 1)), rtol=1e-12, atol=0,
                 what="quantile")
    s = torch.exp(torch.linspace(-12, 10, 1001, dtype=torch.float64))
    z = (torch.log(s) - 0.4) / 2.0
    assert_close(d.log_pdf(s), -0.5 * z.square() - math.log(2.0 * math.sqrt(2 * math.pi)), rtol=0, atol=1e-13,
                 what="log_pdf")


OLD_DICTS = [  # to_dict() of the earlier four kinds, as json text, exactly as checkpoints and exports hold it
    ('{"kind": "lognormal", "p_mean": -1.2, "p_std": 1.2}', LogNormalSigma()),
    ('{"kind": "lognormal", "p_mean": -0.7354880283914, "p_std": 1.1}', LogNormalSigma(-0.7354880283914, 1.1)),
    ('{"kind": "vp", "beta_d": 19.9, "beta_min": 0.1, "eps_t": 1e-05}', VPSigma()),
    ('{"kind": "ve", "sigma_min": 0.02, "sigma_max": 100.0}', VESigma()),
    ('{"kind": "ve", "sigma_min": 0.1, "sigma_max": 50}', VESigma(0.1, 50)),
    ('{"kind": "iddpm", "M": 1000, "C1": 0.001, "C2": 0.008}', IDDPMSigma()),
]


@pytest.mark.parametrize("text,dist", OLD_DICTS, ids=[t[:40] for t, _ in OLD_DICTS])
def test_earlier_dicts_load_and_are_written_byte_identically(text, dist):
    loaded = sigma_distribution_from_dict(json.loads(text))
    assert loaded == dist and type(loaded) is type(dist)
    assert json.dumps(loaded.to_dict()) == text


def test_sample_dtype_device_and_n():
    for d in ALL_SHIFTED.values():
        x = d.sample(7, None, "cpu")
        assert x.dtype == torch.float64 and x.shape == (7,) and bool((x > 0).all())
        assert d.sample(0, gen()).shape == (0,)
    assert torch.equal(LogNormalSigma().sample(5, gen(1)), LogNormalSigma().sample(5, gen(1)))


BAD = [
    (LogNormalSigma, {"p_std": 0.0}, "LogNormalSigma.p_std"),
    (LogNormalSigma, {"p_std": -1.0}, "LogNormalSigma.p_std"),
    (LogNormalSigma, {"p_mean": float("nan")}, "LogNormalSigma.p_mean"),
    (LogNormalSigma, {"p_mean": True}, "LogNormalSigma.p_mean"),
    (LogNormalSigma, {"p_std": "1.2"}, "LogNormalSigma.p_std"),
    (LogitNormalSigma, {"s": 0.0}, "LogitNormalSigma.s"),
    (LogitNormalSigma, {"m": float("inf")}, "LogitNormalSigma.m"),
    (CosineSigma, {"logsnr_min": 5.0, "logsnr_max": -5.0}, "CosineSigma.logsnr_max"),
    (CosineSigma, {"logsnr_min": float("nan")}, "CosineSigma.logsnr_min"),
    (VESigma, {"sigma_min": 0.0}, "VESigma.sigma_min"),
    (VESigma, {"sigma_min": 10.0, "sigma_max": 1.0}, "VESigma.sigma_max"),
    (VPSigma, {"eps_t": 0.0}, "VPSigma.eps_t"),
    (VPSigma, {"eps_t": 1.0}, "VPSigma.eps_t"),
    (VPSigma, {"beta_d": 0.0}, "VPSigma.beta_d"),
    (VPSigma, {"beta_min": -0.1}, "VPSigma.beta_min"),
    (IDDPMSigma, {"M": 0}, "IDDPMSigma.M"),
    (IDDPMSigma, {"M": 10.5}, "IDDPMSigma.M"),
    (IDDPMSigma, {"M": True}, "IDDPMSigma.M"),
    (IDDPMSigma, {"C1": 0.0}, "IDDPMSigma.C1"),
    (IDDPMSigma, {"C1": 1.5}, "IDDPMSigma.C1"),
    (IDDPMSigma, {"C2": -1.0}, "IDDPMSigma.C2"),
]


@pytest.mark.parametrize("cls,kwargs,field", BAD, ids=[f"{f}={list(k.values())[-1]}" for _, k, f in BAD])
def test_bad_parameters_are_refused_naming_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cls(**kwargs)


def test_bad_shift_dict_and_call_arguments():
    with pytest.raises(ConfigError, match=r"Shifted\.log_factor"):
        Shifted(LogNormalSigma(), float("nan"))
    with pytest.raises(ConfigError, match=r"Shifted\.base"):
        Shifted("lognormal", 0.1)
    with pytest.raises(ConfigError, match="log_factor"):
        LogNormalSigma().shift(float("inf"))
    with pytest.raises(ConfigError, match="unknown sigma distribution kind 'lognorm'"):
        sigma_distribution_from_dict({"kind": "lognorm"})
    with pytest.raises(ConfigError, match=r"unknown fields \['p_men'\]"):
        sigma_distribution_from_dict({"kind": "lognormal", "p_men": 0.0})
    with pytest.raises(ConfigError, match="needs a 'base'"):
        sigma_distribution_from_dict({"kind": "shifted", "log_factor": 0.1})
    with pytest.raises(ConfigError, match=r"unknown fields \['scale'\]"):
        sigma_distribution_from_dict({"kind": "shifted", "base": {"kind": "ve"}, "scale": 2.0})
    with pytest.raises(ConfigError, match="LogNormalSigma.p_std"):
        sigma_distribution_from_dict({"kind": "lognormal", "p_std": -2})
    with pytest.raises(ConfigError, match="must be a dict"):
        sigma_distribution_from_dict(["lognormal"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CosineSigma().quantile(1.5)
    with pytest.raises(ValueError, match="non-negative integer"):
        VESigma().sample(-1)
    with pytest.raises(ValueError, match="NaN"):
        LogNormalSigma().cdf(float("nan"))


def test_describe_and_repr_are_readable():
    d = LogNormalSigma(-1.2, 1.2).shift(0.25)
    assert repr(d) == "LogNormalSigma(p_mean=-0.95, p_std=1.2)"
    assert "median ln sigma = -0.9500" in d.describe()
    s = CosineSigma().shift(math.log(0.25))
    assert repr(s).startswith("Shifted(base=CosineSigma(logsnr_min=-15.0, logsnr_max=15.0), log_factor=-1.386")
    assert "x 0.25" in s.describe() and "median ln sigma = -1.3863" in s.describe()
