"""Preconditioning and the training loss (edm.txt Sec. 5, Eq. 7-8, Table 1).

``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))`` (Eq. 7) for
the four model families of Table 1.  ``F`` is any network called as
``F(x, c_noise, labels, **kwargs)`` with ``c_noise`` of shape (B,).

The loss is ``E[lambda(sigma) ||D(y + n; sigma) - y||^2]`` with ``n ~ N(0, sigma^2 I)`` (Eq. 8's
starting point, Sec. 5); ``edm_loss`` returns it per sample together with the drawn sigmas so
a trainer can log it per noise level.
"""
from __future__ import annotations

import abc
import math

import torch
from torch import nn

from latentdiff.diffusion.noise import LogNormalSigma
from latentdiff.diffusion.grids import iddpm_sigmas, vp_sigma_inv

__all__ = ["Precond", "EDMPrecond", "VPPrecond", "VEPrecond", "IDDPMPrecond", "build_precond", "edm_loss"]


class Precond(nn.Module, abc.ABC):
    """Base class: the generic Eq. 7 forward around ``self.model``; subclasses give the coefficients.

    Coefficients are computed in float64 for float64 inputs and float32 otherwise; the
    network runs in the dtype of its parameters and its output is cast back, so the
    skip connection keeps full precision under bf16/fp16 training (as in NVlabs/edm).
    """

    kind = "base"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # Table 1 coefficients; sigma is a tensor --------------------------------------------------
    @abc.abstractmethod
    def c_skip(self, sigma): ...

    @abc.abstractmethod
    def c_out(self, sigma): ...

    @abc.abstractmethod
    def c_in(self, sigma): ...

    @abc.abstractmethod
    def c_noise(self, sigma): ...

    @abc.abstractmethod
    def loss_weight(self, sigma):
        """lambda(sigma) of Table 1, "Loss weighting"."""

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    # -----------------------------------------------------------------------------------------
    def _net_dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.dtype.is_floating_point:
                return p.dtype
        return torch.float32

    def forward(self, x: torch.Tensor, sigma, labels=None, **model_kwargs) -> torch.Tensor:
        cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(cdtype)
        sigma = torch.as_tensor(sigma, dtype=cdtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.reshape(-1)
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma has {sigma.shape[0]} entries for a batch of {x.shape[0]}")
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        f = self.model((self.c_in(s) * x).to(self._net_dtype()), self.c_noise(sigma), labels, **model_kwargs)
        return self.c_skip(s) * x + self.c_out(s) * f.to(cdtype)


class EDMPrecond(Precond):
    """edm.txt Table 1, "Ours": c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2),
    c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4, lambda = (s^2+sd^2)/(s sd)^2."""

    kind = "edm"

    def __init__(self, model: nn.Module, sigma_data: float = 0.5):
        super().__init__(model)
        if not (sigma_data > 0 and math.isfinite(sigma_data)):
            raise ValueError(f"sigma_data must be a positive number, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def c_skip(self, sigma):
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma):
        return sigma * self.sigma_data / torch.sqrt(sigma**2 + self.sigma_data**2)

    def c_in(self, sigma):
        return 1 / torch.sqrt(sigma**2 + self.sigma_data**2)

    def c_noise(self, sigma):
        return torch.log(sigma) / 4

    def loss_weight(self, sigma):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sigma_data": self.sigma_data}


class _EpsilonPrecond(Precond):
    """The epsilon-prediction scalings VP and iDDPM share (edm.txt Table 1): c_skip = 1, c_out = -sigma,
    c_in = 1/sqrt(sigma^2+1), lambda = 1/sigma^2."""

    def c_skip(self, sigma):
        return torch.ones_like(sigma)

    def c_out(self, sigma):
        return -sigma

    def c_in(self, sigma):
        return 1 / torch.sqrt(sigma**2 + 1)

    def loss_weight(self, sigma):
        return 1 / sigma**2


class VPPrecond(_EpsilonPrecond):
    """edm.txt Table 1, VP: c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = (M-1) sigma^-1(s),
    lambda = 1/s^2; beta_d = 19.9, beta_min = 0.1, M = 1000.  ``F`` predicts epsilon."""

    kind = "vp"

    def __init__(self, model: nn.Module, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000):
        super().__init__(model)
        self.beta_d, self.beta_min, self.M = float(beta_d), float(beta_min), int(M)

    def c_noise(self, sigma):
        return ((self.M - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min)).to(sigma.dtype)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "beta_d": self.beta_d, "beta_min": self.beta_min, "M": self.M}


class VEPrecond(Precond):
    """edm.txt Table 1, VE: c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s/2), lambda = 1/s^2."""

    kind = "ve"

    def c_skip(self, sigma):
        return torch.ones_like(sigma)

    def c_out(self, sigma):
        return sigma

    def c_in(self, sigma):
        return torch.ones_like(sigma)

    def c_noise(self, sigma):
        return torch.log(sigma / 2)

    def loss_weight(self, sigma):
        return 1 / sigma**2


class IDDPMPrecond(_EpsilonPrecond):
    """edm.txt Table 1, iDDPM: c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1),
    c_noise = M - 1 - argmin_j |u_j - s|, lambda = 1/s^2; C1 = 0.001, C2 = 0.008, M = 1000."""

    kind = "iddpm"

    def __init__(self, model: nn.Module, C1: float = 0.001, C2: float = 0.008, M: int = 1000):
        super().__init__(model)
        self.C1, self.C2, self.M = float(C1), float(C2), int(M)
        self.register_buffer("u", iddpm_sigmas(self.M, self.C1, self.C2), persistent=False)

    def sigma_index(self, sigma) -> torch.Tensor:
        """argmin_j |u_j - sigma| over j = 0..M."""
        s = torch.as_tensor(sigma, dtype=torch.float64, device=self.u.device)
        return (s.reshape(-1, 1) - self.u.reshape(1, -1)).abs().argmin(dim=1).reshape(s.shape)

    def round_sigma(self, sigma):
        """The nearest trained noise level u_j (what an iDDPM sampler steps through)."""
        return self.u[self.sigma_index(sigma)]

    def c_noise(self, sigma):
        return (self.M - 1 - self.sigma_index(sigma)).to(sigma.dtype).to(sigma.device)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "C1": self.C1, "C2": self.C2, "M": self.M}


def build_precond(spec: dict, model: nn.Module) -> Precond:
    """Build a wrapper from ``Precond.to_dict()`` output (used by exports)."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    classes = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond, "iddpm": IDDPMPrecond}
    if kind not in classes:
        raise ValueError(f"unknown preconditioning {kind!r}; expected one of {sorted(classes)}")
    return classes[kind](model, **spec)


def edm_loss(
    denoiser: Precond,
    y: torch.Tensor,
    sigma_dist=None,
    labels=None,
    generator: torch.Generator | None = None,
    *,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    **model_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``lambda(sigma) * mean ||D(y + sigma n; sigma) - y||^2`` and the sigmas used.

    ``sigma ~ sigma_dist`` (default EDM log-normal) unless ``sigma`` is given; ``n ~ N(0, I)``
    from ``generator`` unless ``noise`` is given.  Returns ``(loss (B,), sigma (B,))`` in float32
    (float64 for float64 data).  The mean over elements instead of the sum keeps the loss scale
    independent of resolution; it is the same objective up to a constant factor.
    """
    b = y.shape[0]
    cdtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    y = y.to(cdtype)
    if sigma is None:
        sigma_dist = sigma_dist if sigma_dist is not None else LogNormalSigma()
        sigma = sigma_dist.sample(b, generator=generator, device=y.device)
    sigma = torch.as_tensor(sigma, device=y.device).to(cdtype).reshape(-1)
    if noise is None:
        dev = generator.device if generator is not None else y.device
        noise = torch.randn(y.shape, generator=generator, device=dev, dtype=cdtype).to(y.device)
    s = sigma.reshape(-1, *([1] * (y.ndim - 1)))
    d = denoiser(y + s * noise.to(cdtype), sigma, labels, **model_kwargs)
    loss = denoiser.loss_weight(s) * (d - y).square()
    return loss.reshape(b, -1).mean(dim=1), sigma
