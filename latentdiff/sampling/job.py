"""One sampling run's settled inputs: the configuration, the seeds, the model source, the VAE, the
dry-run record of the solver and the fixed forward shapes, shared by the loop and the record."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latentdiff.sampling.config import SampleConfig
from latentdiff.sampling.options import solver_record
from latentdiff.sampling.source import ModelSource, load_source
from latentdiff.solvers.base import SampleInfo
from latentdiff.solvers.generate import generate_latents
from latentdiff.solvers.registry import FIXED_GRID_SAMPLERS
from latentdiff.utils import dist as ldist
from latentdiff.vae.autoencoder import Autoencoder
from latentdiff.vae.decode import load_vae_for

__all__ = ["SampleJob", "prepare_job"]


@dataclass(frozen=True)
class SampleJob:
    cfg: SampleConfig
    seeds: list
    interval: tuple | None
    options: dict  # the sampler options that take effect (``SampleConfig.solver_options``)
    src: ModelSource
    ae: Autoencoder
    plan: SampleInfo  # what the solver will do (a dry run on a zero denoiser)
    img_size: tuple  # PIL (width, height)
    net_batch: int  # rows of every network forward
    dec_batch: int  # latents of every VAE decode
    rank: int
    world: int
    device: object

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def per_image_grid(self) -> bool:
        """Does the solver place its own noise levels for each image (``auto``)?"""
        return self.cfg.solver not in FIXED_GRID_SAMPLERS

    def generate(self, seeds: list[int]) -> tuple[torch.Tensor, SampleInfo]:
        """Model-space latents of ``seeds`` (at most ``net_batch``), padded to the fixed forward shape."""
        cfg, src = self.cfg, self.src
        labels = None if cfg.class_label is None else torch.full((len(seeds),), cfg.class_label)
        return generate_latents(
            src.denoiser, seeds, src.shape, labels=labels, num_classes=src.num_classes, method=cfg.solver,
            **cfg.budget, sigma_min=src.sigma_min, sigma_max=src.sigma_max, rho=cfg.rho, cfg_scale=cfg.cfg,
            guidance_interval=self.interval, null_label=src.null_label, device=self.device,
            solver_kwargs=self.options, pad_to=self.net_batch,
        )

    def fingerprint(self) -> dict:
        """Everything that determines the pixels (``OUT/config.json``; a resume must match it)."""
        cfg, src, ae, norm = self.cfg, self.src, self.ae, self.src.normalization
        return {
            "source": src.kind, "model_hash": src.model_hash(), "weights": src.weights_file,
            "vae_sha256": None if ae.is_pixel else (ae.weights_sha256 or ae.revision),
            "normalization": {"kind": norm.kind, "shift": list(norm.shift), "scale": list(norm.scale)},
            "shape": list(src.shape), "image_size": list(self.img_size), "solver": cfg.solver, **cfg.budget,
            "solver_kwargs": self.options, "sigma_min": src.sigma_min, "sigma_max": src.sigma_max, "rho": cfg.rho,
            "cfg": cfg.cfg, "guidance_interval": list(self.interval) if self.interval else None,
            "class_label": cfg.class_label, "network_batch": self.net_batch, "decode_batch": self.dec_batch,
        }


def prepare_job(cfg: SampleConfig, seeds: list[int], interval) -> SampleJob:
    """Load the model and the VAE and validate the solver settings (on every rank)."""
    device = ldist.device()
    src = load_source(cfg, device)
    options = cfg.solver_options()
    plan = solver_record(method=cfg.solver, **cfg.budget, sigma_min=src.sigma_min, sigma_max=src.sigma_max,
                         rho=cfg.rho, shape=src.shape, options=options)
    ae = load_vae_for(src.vae, device, path=cfg.vae)
    down = 1 if ae.is_pixel else ae.downsampling_factor
    return SampleJob(
        cfg=cfg, seeds=seeds, interval=interval, options=options, src=src, ae=ae, plan=plan,
        img_size=(src.shape[2] * down, src.shape[1] * down), net_batch=min(cfg.batch, len(seeds)),
        dec_batch=min(cfg.decode_batch, len(seeds)), rank=ldist.get_rank(), world=ldist.get_world_size(),
        device=device,
    )
