"""latentdiff: latent diffusion training at scale.

EDM preconditioning (Karras et al. 2022), WSNR-aligned training noise and the NFE-guided hybrid ODE
sampler ("Rethinking the Noise Schedule of Diffusion-Based Generative Models"), DeepSpeed ZeRO
training, webdataset latents, FID.

Layers (a module imports only from its own layer or the layers above it in this list; the test
``tests/test_layout.py`` enforces it):

1. ``utils``      process groups and collectives, atomic writes + hashing, seed lists, error types
2. ``diffusion``  the papers' math, no I/O: spectra + WSNR, noise distributions and grids, distance
                  statistics + data-driven sigma_max, preconditioning + loss, guidance
3. ``solvers``    ODE/SDE samplers of one signature, the registry and ``sample()``, the ideal denoiser
4. ``models``     UViT and U-Net denoisers, the diffusers VP bridge
5. ``vae``        autoencoder, normalization and its exact inverse, decoding to images
6. ``contracts``  the typed records between stages (export metadata, ...)
7. ``data``       encode stage: inputs, crops, shards, manifest, statistics, the training reader
8. ``metrics``    evaluation stage: feature extractors, statistics, FID
9. ``training``   train stage: config, schedule, trainer, EMA, checkpoints, export
10. ``sampling``  sample stage: seeds -> latents -> decoded images -> files
11. ``cli``       thin entry points, one per stage (``python -m latentdiff.train`` etc. forward to them)

The public API below is imported on first use, so ``import latentdiff`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "EDMPrecond": "latentdiff.diffusion.precond",
    "VPPrecond": "latentdiff.diffusion.precond",
    "VEPrecond": "latentdiff.diffusion.precond",
    "IDDPMPrecond": "latentdiff.diffusion.precond",
    "edm_loss": "latentdiff.diffusion.precond",
    "LogNormalSigma": "latentdiff.diffusion.noise",
    "karras_sigmas": "latentdiff.diffusion.grids",
    "wsnr": "latentdiff.diffusion.spectral",
    "power_spectrum": "latentdiff.diffusion.spectral",
    "sample": "latentdiff.solvers.registry",
    "SAMPLERS": "latentdiff.solvers.registry",
    "SOLVERS": "latentdiff.solvers.registry",
    "ideal_denoiser": "latentdiff.solvers.ideal",
    "generate_latents": "latentdiff.solvers.generate",
    "build_model": ("latentdiff.models", "build"),
    "load_export": "latentdiff.contracts.export",
    "Autoencoder": "latentdiff.vae.autoencoder",
    "Normalization": "latentdiff.vae.normalization",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")
    target = _API[name]
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(importlib.import_module(module), attr)
