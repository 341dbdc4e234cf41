"""What every solver shares: the denoiser call convention, evaluation counting, the run record.

``denoise(x, sigma)`` returns D(x; sigma) (edm.txt Eq. 2's denoiser, through any preconditioning);
solvers call it with ``sigma`` as a (B,) tensor of ``x``'s dtype and device.  One evaluation is one
call on the whole batch, i.e. one network evaluation per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Denoise", "CountingDenoiser", "SampleInfo", "eval_at", "slope", "randn_like"]

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CountingDenoiser:
    """Wraps ``denoise`` and counts its calls (one call = one network evaluation per image)."""

    def __init__(self, denoise: Denoise):
        self.denoise = denoise
        self.calls = 0
        self._sigmas: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        # keep the (device) tensor: reading it back here would wait for the GPU before every forward
        self._sigmas.append(sigma.detach().reshape(-1)[:1])
        return self.denoise(x, sigma)

    @property
    def sigmas(self) -> list[float]:
        """The noise level of the first batch item at every call (one device sync, when read)."""
        return torch.cat(self._sigmas).double().cpu().tolist() if self._sigmas else []


def eval_at(denoise: Denoise, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """D(x; sigma) with sigma broadcast to a (B,) tensor of x's dtype."""
    s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    return denoise(x, s)


def slope(denoise: Denoise, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """dx/dsigma = (x - D(x; sigma)) / sigma (wsnr.txt Eq. 1)."""
    return (x - eval_at(denoise, x, sigma)) / sigma


def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like x from one generator or one generator per batch item."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        draws = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
        if all(d.device == draws[0].device for d in draws):  # one host-to-device copy, not one per image
            return torch.stack(draws).to(x.device)
        return torch.stack([d.to(x.device) for d in draws])
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


@dataclass
class SampleInfo:
    """What a sampler actually did: method, evaluations counted, grid, plan, the options that took effect."""

    method: str
    nfe: int
    sigmas: list[float]
    plan: object | None = None  # the planner's record (e.g. an NFEPlan), with a to_dict()
    eval_sigmas: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"method": self.method, "nfe": self.nfe, "sigmas": self.sigmas, **self.extra}
        if self.plan is not None:
            d["plan"] = self.plan.to_dict()
        return d
