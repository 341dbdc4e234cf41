"""solvers/multistep.py: iPNDM, UniPC-bh2 and DEIS-tAB3 against diff-sampler's numbers, exact solutions,
measured convergence orders, and exact evaluation counts."""
import math
import sys
from pathlib import Path

import pytest
import torch

from latentdiff.diffusion.grids import karras_sigmas
from latentdiff.solvers import CountingDenoiser, sample
from latentdiff.solvers.multistep import (
    IPNDM_COEFFS,
    deis_coefficients,
    deis_sampler,
    ipndm_sampler,
    unipc_coefficients,
    unipc_sampler,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
from sampler_convergence import fit_order, gaussian_problem, make_gmm

PEERS = ("ipndm", "unipc", "deis-tab3")

# --- zju-pi/diff-sampler 68d5ce427f261962b89ce3b0ee8f6b29f0577328 (diff-solvers-main), made by
#     python tools/bench/diff_sampler_reference.py diff-sampler/diff-solvers-main   (states at sigma_min)
S2 = torch.tensor([0.25, 1.0, 4.0, 0.01], dtype=torch.float64).reshape(1, 4, 1, 1)
LATENTS = [1.5409961082440433, -0.2934289057609464, -2.1787893820745574, 0.5684312772806678, -1.084522342424021,
           -1.3985953953708767, 0.4033468476292993, 0.8380263329976598]
REF = {
    6: {"ipndm": [0.7822472515478402, -0.3210106699376869, -4.498890554511521, 0.06361628775041414,
                  -0.5505300221491904, -1.530060726892175, 0.8328539407804757, 0.0937881613366607],
        "unipc": [0.6094829664415491, -0.2972489337134588, -5.222720794956988, 0.033895269224170306,
                  -0.42894196221295666, -1.416803122693162, 0.9668525035164702, 0.04997108588005197],
        "deis_N10000": [0.5565771014829297, -0.2539181158431484, -4.032052225631551, 0.03495000236824887,
                        -0.3917078690923218, -1.2102717239071055, 0.7464308244134503, 0.05152605687540534],
        "deis_N100000": [0.5567276112761342, -0.2539244066333155, -4.032029074424188, 0.03499961045264522,
                         -0.39181379488448453, -1.2103017082405787, 0.7464265385625167, 0.05159919303577505]},
    9: {"ipndm": [0.8219373127532269, -0.31242508166879684, -4.588844893862721, 0.06065231095050564,
                  -0.5784630960350622, -1.4891385001324073, 0.8495066744069516, 0.08941843238613341],
        "unipc": [0.995231480218952, -0.4117154807688472, -5.9456351452377225, 0.0487390434305792,
                  -0.7004240766130796, -1.9623948571560756, 1.1006815127317073, 0.07185495146456301],
        "deis_N10000": [0.6652742274265632, -0.27553344833890053, -4.346543556226901, 0.04046557429198944,
                        -0.46820673953884145, -1.3132987396660745, 0.8046508101752683, 0.05965754910389355],
        "deis_N100000": [0.6653036487789976, -0.2755412545599817, -4.346676512524303, 0.04046853881190899,
                         -0.46822744570019326, -1.3133359471280681, 0.8046754236160489, 0.05966191963355398]},
}


def _ref_denoise(x, t):
    return S2 / (S2 + t.reshape(-1, 1, 1, 1) ** 2) * x


class LastInput:
    """Counts calls and keeps the last input: the state at sigma_min before the final Euler step."""

    def __init__(self, denoise):
        self.denoise, self.calls, self.x = denoise, 0, None

    def __call__(self, x, sigma):
        self.calls += 1
        self.x = x
        return self.denoise(x, sigma)


FNS = {"ipndm": ipndm_sampler, "unipc": unipc_sampler, "deis": deis_sampler}


@pytest.mark.parametrize("levels", [6, 9])
@pytest.mark.parametrize("name", ["ipndm", "unipc"])
def test_matches_diff_sampler(name, levels):
    lat = torch.tensor(LATENTS, dtype=torch.float64).reshape(2, 4, 1, 1)
    rec = LastInput(_ref_denoise)
    FNS[name](rec, lat * 80.0, karras_sigmas(levels, 0.002, 80.0))
    ref = torch.tensor(REF[levels][name], dtype=torch.float64)
    assert torch.allclose(rec.x.flatten(), ref, rtol=0, atol=1e-13)
    assert rec.calls == levels


@pytest.mark.parametrize("levels", [6, 9])
def test_deis_matches_diff_sampler_quadrature_limit(levels):
    """diff-sampler's tAB integrals are N-point sums (error ~1/N, seen: 10x N -> 10x closer); their
    Richardson limit (10 R_1e5 - R_1e4) / 9 equals our Gauss-Legendre coefficients' result."""
    lat = torch.tensor(LATENTS, dtype=torch.float64).reshape(2, 4, 1, 1)
    rec = LastInput(_ref_denoise)
    deis_sampler(rec, lat * 80.0, karras_sigmas(levels, 0.002, 80.0))
    r4, r5 = (torch.tensor(REF[levels][k], dtype=torch.float64) for k in ("deis_N10000", "deis_N100000"))
    limit = (10 * r5 - r4) / 9
    assert (rec.x.flatten() - limit).abs().max() < 1e-7
    assert (rec.x.flatten() - r5).abs().max() > 1e-6  # the raw N = 1e5 sums are visibly off: the test can tell


def test_coefficients_exact_on_polynomials():
    """UniPC weights reproduce DDIM at order 1; DEIS weights integrate each Lagrange basis exactly: with
    every slope equal to 1 the step is sigma_{i+1} - sigma_i (the basis sums to one)."""
    sig = [float(s) for s in karras_sigmas(10, 0.002, 80.0)[:-1]]
    for c in deis_coefficients(sig):
        assert c.shape[0] <= 3
    for i, c in enumerate(deis_coefficients(sig)):
        assert math.isclose(float(c.sum()), sig[i + 1] - sig[i], rel_tol=1e-13, abs_tol=1e-15)
    rho_p, rho_c = unipc_coefficients([0.0], 0.7, 1)
    assert rho_p.size == 0 and rho_c.tolist() == [0.5]
    assert sum(IPNDM_COEFFS[4]) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("method", PEERS)
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 7, 20])
def test_nfe_counted_exactly(method, nfe):
    counter = CountingDenoiser(lambda x, s: 0.5 * x)
    x, info = sample(counter, torch.randn(3, 2, 4, 4, dtype=torch.float64), method=method, nfe=nfe, return_info=True)
    assert counter.calls == info.nfe == nfe and x.dtype == torch.float64
    assert info.eval_sigmas == pytest.approx(info.sigmas[:-1], rel=1e-15)  # one evaluation per positive level
    _, by_steps = sample(counter, torch.randn(3, 5), method=method, steps=nfe, return_info=True)
    assert by_steps.nfe == nfe


@pytest.mark.parametrize("method", PEERS)
def test_float32_close_to_float64(method):
    den, _ = gaussian_problem()
    noise = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x64 = sample(den, noise, method=method, nfe=15)
    x32 = sample(den, noise.float(), method=method, nfe=15)
    assert x32.dtype == torch.float32 and (x32.double() - x64).abs().max() < 1e-4


def _errors(method, den, noise, ref, nfes):
    out = []
    for n in nfes:
        rec = LastInput(den)
        sample(rec, noise, method=method, nfe=n)
        assert rec.calls == n
        out.append(float((rec.x - ref).square().mean().sqrt()))
    return out


# measured orders on Eq. 5 grids (sigma 0.002..80, rho 7), NFE 49, 97, 193 (values in tools/bench/README.md).
# iPNDM's constant-step Adams-Bashforth weights on a non-uniform grid leave an O(h^3) local term
# (F' g'' / 12 h^3 for sigma = g(u), F = slope), so it is second order asymptotically on any Eq. 5 grid.
ORDERS = {"ipndm": (1.8, 2.6), "unipc": (3.5, 4.8), "deis-tab3": (2.5, 3.3)}
NFES = (49, 97, 193)


@pytest.mark.parametrize("method", PEERS)
def test_order_gaussian_exact(method):
    den, exact = gaussian_problem()
    noise = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = _errors(method, den, noise, exact(noise, 0.002, 80.0), NFES)
    lo, hi = ORDERS[method]
    assert lo < fit_order(NFES, errs) < hi, errs


@pytest.mark.parametrize("method", PEERS)
def test_order_gaussian_mixture(method):
    """Reference: classical Ode3 with 1536 steps (checked against 768 steps)."""
    from sampler_accuracy import reference

    den = make_gmm(16, components=6, seed=0)
    noise = torch.randn(6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, _ = reference(den, noise, 0.002, 80.0, 1536)
    half, _ = reference(den, noise, 0.002, 80.0, 768)
    errs = _errors(method, den, noise, ref, NFES)
    # the reference's own error, (ref - half) / (2^3 - 1) for a 3rd-order method, is < 1% of the smallest error
    assert float((ref - half).square().mean().sqrt()) / 7 < 1e-2 * errs[-1]
    lo, hi = ORDERS[method]
    assert lo - 0.3 < fit_order(NFES, errs) < hi + 0.3, errs


def test_bad_grid_refused():
    with pytest.raises(ValueError, match="strictly decreasing"):
        ipndm_sampler(lambda x, s: x, torch.zeros(1, 2), [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="order"):
        unipc_sampler(lambda x, s: x, torch.zeros(1, 2), [2.0, 1.0, 0.0], order=4)
