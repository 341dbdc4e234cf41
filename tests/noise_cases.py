"""Shared fixtures of the noise tests: every continuous base with its independent reference CDF
(:mod:`noise_refcdf`), the shift values, a synthetic spectrum, seeded generators."""
import torch

import noise_refcdf as refcdf
from latentdiff.diffusion.noise import CosineSigma, LogitNormalSigma, LogNormalSigma, VESigma, VPSigma
from latentdiff.diffusion.shift import ShiftRule

N_KS = 20000  # n of every KS test; the 1% critical KS distance is 1.63 / sqrt(n) = 0.0115
SEED = 0


def synthetic_power(side: int, slope: float = 2.7, dc_mean: float = 0.3) -> torch.Tensor:
    """A deterministic natural-image-like (3, side, side) spectrum: 1/(1+|f|)^slope off DC, DC = mean^2 * HW."""
    f = torch.fft.fftfreq(side, dtype=torch.float64) * side
    r = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    p = (1.0 + r) ** (-slope) * side**2 * 0.05
    p[0, 0] = dc_mean**2 * side**2
    return torch.stack([p, 0.8 * p, 1.2 * p])


WSNR_C = ShiftRule("wsnr").resolve(power_target=synthetic_power(16), power_ref=synthetic_power(64))["log_factor"]
RES_C = ShiftRule("resolution").resolve(side=16)["log_factor"]  # ln(16/64)
SHIFTS = {"none": 0.0, "wsnr": WSNR_C, "resolution": RES_C}

BASES = {
    "lognormal": (LogNormalSigma(-1.2, 1.2), lambda c: refcdf.lognormal(-1.2, 1.2, c)),
    "lognormal_wide": (LogNormalSigma(0.4, 2.0), lambda c: refcdf.lognormal(0.4, 2.0, c)),
    "logit_normal": (LogitNormalSigma(0.0, 1.0), lambda c: refcdf.logit_normal(0.0, 1.0, c)),
    "logit_normal_m": (LogitNormalSigma(-0.5, 0.8), lambda c: refcdf.logit_normal(-0.5, 0.8, c)),
    "cosine": (CosineSigma(), lambda c: refcdf.cosine(-15.0, 15.0, c)),
    "cosine_clip": (CosineSigma(-6.0, 8.0), lambda c: refcdf.cosine(-6.0, 8.0, c)),
    "ve": (VESigma(), lambda c: refcdf.ve(0.02, 100.0, c)),
    "vp": (VPSigma(), lambda c: refcdf.vp(19.9, 0.1, 1e-5, c)),
}


def gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_close(a, b, rtol, atol, what=""):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    err = (a - b).abs().max().item()
    tol = (atol + rtol * b.abs()).min().item()
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what}: max |diff| {err:.3g} (tol ~{tol:.3g})"


__all__ = ["N_KS", "SEED", "SHIFTS", "BASES", "gen", "synthetic_power", "WSNR_C", "RES_C", "assert_close"]
