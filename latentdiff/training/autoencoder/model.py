"""Build the ``AutoencoderKL``, keep its EMA, and measure the latent statistics the export records."""
from __future__ import annotations

import copy

import torch

__all__ = ["ModelEMA", "build_autoencoder", "latent_statistics"]


def build_autoencoder(arch: dict, seed: int):
    """A freshly initialized diffusers ``AutoencoderKL`` (deterministic given ``seed``)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**arch)


class ModelEMA:
    """``ema <- d ema + (1 - d) theta`` after every step, in float32 (a plain copy of the model)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().requires_grad_(False).train(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach().float(), 1 - self.decay)


@torch.no_grad()
def latent_statistics(vae, crops: torch.Tensor, batch: int = 32) -> tuple[float, float]:
    """(mean, std) over every value of the posterior means of ``crops``, computed in float64.

    The export sets ``shift_factor = mean`` and ``scaling_factor = 1 / std`` so that
    ``(z - shift) * scaling`` has zero mean and unit variance on the training data (the convention of
    diffusers ``AutoencoderKL``: latents = (z - shift_factor) * scaling_factor).
    """
    total, sq, n = 0.0, 0.0, 0
    for i in range(0, len(crops), batch):
        z = vae.encode(crops[i:i + batch]).latent_dist.mean.double()
        total += float(z.sum())
        sq += float((z * z).sum())
        n += z.numel()
    mean = total / n
    var = max(sq / n - mean * mean, 1e-12)
    return mean, var**0.5
