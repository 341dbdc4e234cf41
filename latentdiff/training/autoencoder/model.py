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
    """(mean, std) over every value of the *sampled* latents ``z = m + s eps`` of ``crops``, in float64.

    Exact moments of the posterior mixture, no sampling: ``E[z] = E[m]`` and
    ``Var[z] = Var[m] + E[s^2]`` (law of total variance), over all crops, channels and positions.  The
    diffusion model trains on sampled latents (the encode stage's ``sampled_latent_power``), and LDM
    (Rombach et al. 2022) likewise sets its scale factor from the std of sampled latents.  The export sets
    ``shift_factor = mean`` and ``scaling_factor = 1 / std``, so ``(z - shift) * scaling`` has zero mean
    and unit variance on the training data (diffusers: latents = (z - shift_factor) * scaling_factor).
    """
    total, sq, post, n = 0.0, 0.0, 0.0, 0
    for i in range(0, len(crops), batch):
        dist = vae.encode(crops[i:i + batch]).latent_dist
        z, s = dist.mean.double(), dist.std.double()
        total += float(z.sum())
        sq += float((z * z).sum())
        post += float((s * s).sum())
        n += z.numel()
    mean = total / n
    var = max(sq / n - mean * mean + post / n, 1e-12)
    return mean, var**0.5
