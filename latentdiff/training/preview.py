"""The sample grid written to tensorboard (and ``RUN/samples/step_NNNNNNNN.png``) during training.

Images of seeds ``0..n-1`` (class ``i % num_classes`` for a conditional model) from the EMA weights,
with the run's sampler (``sample_solver``, by default the sampler of ``latentdiff-sample``) and its
NFE budget, decoded through the dataset's VAE.  The VAE is loaded (and its weights hashed) once per
run, on the first grid.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from latentdiff.solvers.generate import generate_latents
from latentdiff.training.checkpoint import tag_for
from latentdiff.training.tb import TBWriter
from latentdiff.utils.io import atomic_open
from latentdiff.vae.decode import decode_to_uint8, image_grid, load_vae_for
from latentdiff.vae.normalization import Normalization

__all__ = ["SamplePreview"]


class SamplePreview:
    """Rank 0's sample grids: :meth:`log` generates, decodes and writes one grid."""

    def __init__(self, run_dir: str | Path, vae_desc, norm: Normalization, sample_shape, num_classes: int, *,
                 solver: str, nfe: int, count: int, sigma_min: float, sigma_max: float, device):
        self.out = Path(run_dir) / "samples"
        self.vae_desc, self.norm, self.sample_shape = vae_desc, norm, tuple(sample_shape)
        self.num_classes, self.solver, self.nfe, self.count = num_classes, solver, nfe, count
        self.sigma_min, self.sigma_max, self.device = sigma_min, sigma_max, device
        self._autoencoder = None

    @property
    def autoencoder(self):
        """The dataset's VAE, loaded and checked against its recorded sha256 on first use."""
        if self._autoencoder is None:
            self._autoencoder = load_vae_for(self.vae_desc, self.device)
        return self._autoencoder

    @torch.no_grad()
    def log(self, tb: TBWriter, denoiser, step: int) -> torch.Tensor:
        """One grid from ``denoiser`` (no collectives: rank 0 only); returns it as (3, H, W) uint8."""
        n = self.count
        labels = (torch.arange(n) % self.num_classes) if self.num_classes > 0 else None
        z, _ = generate_latents(denoiser, seeds=list(range(n)), shape=self.sample_shape, labels=labels,
                                num_classes=self.num_classes, method=self.solver, nfe=self.nfe,
                                sigma_min=self.sigma_min, sigma_max=self.sigma_max, device=self.device)
        grid = image_grid(decode_to_uint8(z, self.norm, autoencoder=self.autoencoder, device=self.device))
        tb.image("samples/ema", grid, step)
        with atomic_open(self.out / f"{tag_for(step)}.png") as f:
            Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG")
        return grid
