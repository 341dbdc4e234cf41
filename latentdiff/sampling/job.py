"""One sampling run's settled inputs: the configuration, the seeds, the model source, the VAE, the
dry-run record of the solver and the fixed forward shapes, shared by the loop and the record.

Fixed shapes: every solver run, network forward and VAE decode has exactly ``micro_batch`` rows (the
last micro-batch padded), whatever ``--batch``, ``--decode-batch``, the seed count or the rank count.
BLAS/oneDNN kernels choose their blocking and reduction order from the shapes (measured: on one CPU a
network forward of 3, 4 or 7 rows differs from 1 row by up to 1.8e-7, a VAE decode of 2, 5 or 8 rows by
one uint8 level), so only fixed shapes make the images a function of the seed alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latentdiff.sampling.config import SampleConfig
from latentdiff.sampling.gits_cache import build_gits_table, gits_key, load_or_build_gits
from latentdiff.sampling.options import solver_record
from latentdiff.sampling.source import ModelSource, load_source
from latentdiff.solvers.base import SampleInfo
from latentdiff.solvers.generate import generate_latents
from latentdiff.solvers.registry import FIXED_GRID_SAMPLERS
from latentdiff.utils import dist as ldist
from latentdiff.utils.io import sha256_file
from latentdiff.vae.autoencoder import Autoencoder
from latentdiff.vae.decode import decode_to_uint8, load_vae_for

__all__ = ["SampleJob", "kernel_settings", "prepare_job"]


def kernel_settings() -> dict:
    """What else picks the CPU kernels' reduction order: the intra-op thread count and torch's SIMD level
    (``ATEN_CPU_CAPABILITY``); recorded, and a resume with other values warns."""
    return {"intra_op_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


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
    net_batch: int  # seeds sampled per step (grouping only)
    dec_batch: int  # latents per VAE call (grouping only)
    micro: int  # rows of every solver run, network forward and VAE decode (the fixed shapes)
    rank: int
    world: int
    device: object
    gits: object | None = None  # the GITSTable of --schedule gits (its meta: cache file, key)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def solver_kwargs(self) -> dict:
        """The recorded options plus the GITS table the solver reads (never recorded itself)."""
        return {**self.options, "gits": self.gits} if self.gits is not None else self.options

    @property
    def per_image_grid(self) -> bool:
        """Does the solver place its own noise levels for each image (``auto``)?"""
        return self.cfg.solver not in FIXED_GRID_SAMPLERS

    def generate(self, seeds: list[int]) -> tuple[torch.Tensor, list[SampleInfo]]:
        """Model-space latents of ``seeds`` and one ``SampleInfo`` per micro-batch: the solver runs on
        micro-batches of exactly ``micro`` rows (the last one padded)."""
        cfg, src = self.cfg, self.src
        zs, infos = [], []
        for i in range(0, len(seeds), self.micro):
            part = seeds[i : i + self.micro]
            labels = None if cfg.class_label is None else torch.full((len(part),), cfg.class_label)
            z, info = generate_latents(
                src.denoiser, part, src.shape, labels=labels, num_classes=src.num_classes, method=cfg.solver,
                **cfg.budget, sigma_min=src.sigma_min, sigma_max=src.sigma_max, rho=cfg.rho, cfg_scale=cfg.cfg,
                guidance_interval=self.interval, null_label=src.null_label, device=self.device,
                solver_kwargs=self.solver_kwargs, pad_to=self.micro,
            )
            zs.append(z)
            infos.append(info)
        return torch.cat(zs), infos

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """uint8 images of latents ``z``: ``dec_batch`` latents per call, each decode of exactly ``micro`` rows."""
        return torch.cat([decode_to_uint8(z[i : i + self.dec_batch], self.src.normalization, autoencoder=self.ae,
                                          batch_size=self.micro) for i in range(0, z.shape[0], self.dec_batch)])

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
            "class_label": cfg.class_label, "micro_batch": self.micro, **kernel_settings(),
            **({"gits": self.gits.meta["key"]} if self.gits is not None else {}),
        }


def prepare_job(cfg: SampleConfig, seeds: list[int], interval) -> SampleJob:
    """Load the model and the VAE and validate the solver settings (on every rank)."""
    device = ldist.device()
    src = load_source(cfg, device)
    options = cfg.solver_options()
    gits = _gits_table(cfg, src, interval, device) if options.get("schedule") == "gits" else None
    plan = solver_record(method=cfg.solver, **cfg.budget, sigma_min=src.sigma_min, sigma_max=src.sigma_max,
                         rho=cfg.rho, shape=src.shape, options={**options, "gits": gits} if gits else options)
    ae = load_vae_for(src.vae, device, path=cfg.vae)
    down = 1 if ae.is_pixel else ae.downsampling_factor
    return SampleJob(
        cfg=cfg, seeds=seeds, interval=interval, options=options, src=src, ae=ae, plan=plan,
        img_size=(src.shape[2] * down, src.shape[1] * down), net_batch=min(cfg.batch, len(seeds)),
        dec_batch=min(cfg.decode_batch, len(seeds)), micro=cfg.micro_batch, rank=ldist.get_rank(), world=ldist.get_world_size(),
        device=device, gits=gits,
    )


def _gits_table(cfg: SampleConfig, src, interval, device):
    """--schedule gits: the model's GITS table from EXPORT/gits/ (or OUT/gits/), computed once when missing."""
    params = cfg.gits_params()
    if src.kind == "export":
        weights_sha = sha256_file(Path(src.path) / src.weights_file)
        dirs = [src.path, cfg.out]
    else:
        weights_sha, dirs = src.files_hash, [cfg.out]
    key = gits_key(weights_sha, params, sigma_min=src.sigma_min, sigma_max=src.sigma_max, shape=list(src.shape),
                   cfg=cfg.cfg, guidance_interval=list(interval) if interval else None, class_label=cfg.class_label,
                   dtype="float32")

    def build():
        return build_gits_table(src.denoiser, src.shape, params, sigma_min=src.sigma_min, sigma_max=src.sigma_max,
                                num_classes=src.num_classes, class_label=cfg.class_label, cfg_scale=cfg.cfg,
                                guidance_interval=interval, null_label=src.null_label, device=device,
                                batch=cfg.micro_batch)

    return load_or_build_gits(dirs, key, build)
