"""precond.py: every Table 1 coefficient of edm.txt against its closed form, and the loss."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from latentdiff.diffusion.noise import LogNormalSigma
from latentdiff.diffusion.grids import iddpm_sigmas, vp_sigma
from latentdiff.diffusion.precond import (
    EDMPrecond,
    IDDPMPrecond,
    VEPrecond,
    VPPrecond,
    build_precond,
    edm_loss,
)

SIGMAS = [0.002, 0.05, 0.5, 1.0, 3.7, 80.0]


class ZeroNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, c_noise, labels=None):
        return x * self.w


class Recorder(nn.Module):
    """Returns a fixed output and records what the wrapper fed it."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x, c_noise, labels=None):
        self.x, self.c_noise, self.labels = x, c_noise, labels
        return self.out.to(x.dtype)


def _t(v):
    return torch.tensor(v, dtype=torch.float64)


def test_edm_coefficients_closed_form():
    for sd in (0.5, 1.3):
        p = EDMPrecond(ZeroNet(), sigma_data=sd)
        for s in SIGMAS:
            st = _t(s)
            assert math.isclose(p.c_skip(st).item(), sd**2 / (s**2 + sd**2), rel_tol=1e-14)
            assert math.isclose(p.c_out(st).item(), s * sd / math.sqrt(s**2 + sd**2), rel_tol=1e-14)
            assert math.isclose(p.c_in(st).item(), 1 / math.sqrt(s**2 + sd**2), rel_tol=1e-14)
            assert math.isclose(p.c_noise(st).item(), math.log(s) / 4, rel_tol=1e-14)
            assert math.isclose(p.loss_weight(st).item(), (s**2 + sd**2) / (s * sd) ** 2, rel_tol=1e-14)
            # lambda(sigma) = 1 / c_out^2: unit effective weight (Sec. 5, "Loss weighting")
            assert math.isclose((p.loss_weight(st) * p.c_out(st) ** 2).item(), 1.0, rel_tol=1e-12)
        # at sigma = sigma_data
        st = _t(sd)
        assert math.isclose(p.c_skip(st).item(), 0.5)
        assert math.isclose(p.c_out(st).item(), sd / math.sqrt(2))
        assert math.isclose(p.c_in(st).item(), 1 / (sd * math.sqrt(2)))


def test_vp_coefficients_closed_form():
    p = VPPrecond(ZeroNet())
    assert (p.beta_d, p.beta_min, p.M) == (19.9, 0.1, 1000)
    for s in SIGMAS:
        st = _t(s)
        assert p.c_skip(st).item() == 1.0
        assert p.c_out(st).item() == -s
        assert math.isclose(p.c_in(st).item(), 1 / math.sqrt(s**2 + 1), rel_tol=1e-14)
        # c_noise = (M - 1) sigma^-1(sigma): check through the forward schedule
        t = p.c_noise(st).item() / 999
        assert math.isclose(vp_sigma(t).item(), s, rel_tol=1e-9)
        t_ref = (math.sqrt(0.1**2 + 2 * 19.9 * math.log1p(s**2)) - 0.1) / 19.9
        assert math.isclose(t, t_ref, rel_tol=1e-12)
        assert math.isclose(p.loss_weight(st).item(), 1 / s**2, rel_tol=1e-14)


def test_ve_coefficients_closed_form():
    p = VEPrecond(ZeroNet())
    for s in SIGMAS:
        st = _t(s)
        assert (p.c_skip(st).item(), p.c_out(st).item(), p.c_in(st).item()) == (1.0, s, 1.0)
        assert math.isclose(p.c_noise(st).item(), math.log(0.5 * s), rel_tol=1e-14)
        assert math.isclose(p.loss_weight(st).item(), 1 / s**2, rel_tol=1e-14)


def test_iddpm_coefficients_closed_form():
    p = IDDPMPrecond(ZeroNet())
    assert (p.C1, p.C2, p.M) == (0.001, 0.008, 1000)
    u = iddpm_sigmas()
    for j in (0, 8, 500, 999):
        st = u[j].clone()
        assert p.c_noise(st).item() == 1000 - 1 - j
        assert p.round_sigma(st * (1 + 1e-6)).item() == u[j].item()
    for s in SIGMAS:
        st = _t(s)
        assert (p.c_skip(st).item(), p.c_out(st).item()) == (1.0, -s)
        assert math.isclose(p.c_in(st).item(), 1 / math.sqrt(s**2 + 1), rel_tol=1e-14)
        j = int(np.argmin(np.abs(u.numpy() - s)))
        assert p.c_noise(st).item() == 999 - j
        assert math.isclose(p.loss_weight(st).item(), 1 / s**2, rel_tol=1e-14)


@pytest.mark.parametrize("cls", [EDMPrecond, VPPrecond, VEPrecond, IDDPMPrecond])
def test_forward_is_eq7(cls):
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    f = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    net = Recorder(f).double()  # the network runs in its parameters' dtype
    p = cls(net)
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    d = p(x, sigma, labels)
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(net.x, p.c_in(s) * x)
    assert torch.allclose(net.c_noise, p.c_noise(sigma)) and net.c_noise.shape == (4,)
    assert torch.equal(net.labels, labels)
    assert torch.allclose(d, p.c_skip(s) * x + p.c_out(s) * f, rtol=1e-14)
    # a zero network gives c_skip * x; a scalar sigma broadcasts
    z = cls(ZeroNet())
    assert torch.allclose(z(x, 0.7), z.c_skip(torch.tensor(0.7, dtype=torch.float64)) * x)


def test_network_runs_in_its_own_dtype_and_skip_stays_fp32():
    net = Recorder(torch.zeros(2, 1, 2, 2)).to(torch.bfloat16)
    p = EDMPrecond(net, 0.5)
    x = torch.randn(2, 1, 2, 2)
    d = p(x, 1.0)
    assert net.x.dtype == torch.bfloat16 and d.dtype == torch.float32
    assert torch.allclose(d, x * 0.25 / 1.25)


def test_build_precond_round_trip():
    for p in (EDMPrecond(ZeroNet(), 0.8), VPPrecond(ZeroNet()), VEPrecond(ZeroNet()), IDDPMPrecond(ZeroNet())):
        q = build_precond(p.to_dict(), ZeroNet())
        assert type(q) is type(p) and q.to_dict() == p.to_dict()
    with pytest.raises(ValueError, match="unknown preconditioning"):
        build_precond({"kind": "rectified-flow"}, ZeroNet())


def test_edm_loss_matches_manual_formula():
    torch.manual_seed(0)
    y = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    f = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    p = EDMPrecond(Recorder(f).double(), 0.5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    loss, sigma = edm_loss(p, y, LogNormalSigma(), generator=g1)
    s_ref = LogNormalSigma().sample(6, generator=g2)
    n_ref = torch.randn(y.shape, generator=g2, dtype=torch.float64)
    assert torch.allclose(sigma, s_ref)
    s = s_ref.view(-1, 1, 1, 1)
    d = p.c_skip(s) * (y + s * n_ref) + p.c_out(s) * f
    ref = (p.loss_weight(s) * (d - y) ** 2).mean(dim=(1, 2, 3))
    assert loss.shape == (6,) and torch.allclose(loss, ref, rtol=1e-12)
    # the perfect denoiser output (F = effective target of Eq. 8) has zero loss
    target = (y - p.c_skip(s) * (y + s * n_ref)) / p.c_out(s)
    loss0, _ = edm_loss(EDMPrecond(Recorder(target).double(), 0.5), y, sigma=s_ref, noise=n_ref)
    assert loss0.abs().max() < 1e-20


def test_bad_sigma_data():
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrecond(ZeroNet(), 0.0)
