"""Where the sample stage's denoiser comes from: a latentdiff export or a pretrained diffusers UNet.

Both become a :class:`ModelSource`: the denoiser, the model-space shape, the class conditioning, the
sigma range the solver integrates over, the normalization and VAE that turn latents into images, and
what identifies the weights in ``sampling.json`` and the resume fingerprint.
"""
from __future__ import annotations

from dataclasses import dataclass

from latentdiff.contracts.export import export_hash, load_export
from latentdiff.diffusion.grids import VP_SIGMA_MAX
from latentdiff.models.diffusers_vp import load_diffusers_unet
from latentdiff.sampling.config import SampleConfig
from latentdiff.sampling.options import resolve_sigma_max
from latentdiff.utils.errors import SampleError
from latentdiff.vae.normalization import Normalization

__all__ = ["ModelSource", "load_source"]


@dataclass(frozen=True)
class ModelSource:
    """A denoiser ready to sample and what the stage records about it."""

    kind: str  # "export" or "diffusers-unet"
    path: str
    denoiser: object
    shape: tuple  # (channels, height, width) in model space
    num_classes: int
    null_label: int | None
    sigma_min: float
    sigma_max: float
    normalization: Normalization
    vae: dict | str
    weights_file: str | None
    ema_profile: str
    scheduler: dict | None = None
    files_hash: str | None = None  # a diffusers UNet's (hashed when loaded); an export is hashed on request

    def model_hash(self) -> str:
        """sha256 of the export (model.json and weights) or of the diffusers UNet's files."""
        return export_hash(self.path) if self.kind == "export" else self.files_hash


def _from_export(cfg: SampleConfig, device) -> ModelSource:
    denoiser, loaded = load_export(cfg.export, weights=cfg.weights, device=device)
    meta = loaded.meta
    return ModelSource(
        kind="export", path=cfg.export, denoiser=denoiser, shape=meta.shape, num_classes=meta.num_classes,
        null_label=meta.null_label, normalization=meta.normalization, vae=meta.vae,
        sigma_min=float(cfg.sigma_min if cfg.sigma_min is not None else meta.schedule.sigma_min),
        sigma_max=resolve_sigma_max(cfg.sigma_max, meta.schedule.sigma_max),
        weights_file=loaded.weights_file, ema_profile=loaded.ema_profile,
    )


def _from_diffusers(cfg: SampleConfig, device) -> ModelSource:
    if cfg.weights != "ema":
        raise SampleError("--weights selects an EMA of a latentdiff export; a diffusers UNet has one set of weights")
    if cfg.cfg != 1.0:
        raise SampleError("--cfg needs a latentdiff export with a null class (a diffusers UNet2DModel has none)")
    denoiser, meta = load_diffusers_unet(cfg.diffusers_unet, device=device)
    # a pretrained DDPM model has no data-driven sigma_max: "data" means its own range
    sigma_max = float(VP_SIGMA_MAX) if cfg.sigma_max == "data" else resolve_sigma_max(cfg.sigma_max, None)
    return ModelSource(
        kind="diffusers-unet", path=cfg.diffusers_unet, denoiser=denoiser, shape=tuple(meta["shape"]),
        num_classes=meta["num_classes"], null_label=None, normalization=Normalization.from_dict(meta["normalization"]),
        vae=meta["vae"], sigma_min=float(cfg.sigma_min if cfg.sigma_min is not None else meta["schedule"]["sigma_min"]),
        sigma_max=sigma_max, weights_file=None, ema_profile="pretrained",
        scheduler=meta["scheduler"], files_hash=meta["hash"],
    )


def load_source(cfg: SampleConfig, device) -> ModelSource:
    """The model ``cfg`` names (``--export`` or ``--diffusers-unet``), checked against the settings."""
    src = _from_export(cfg, device) if cfg.export else _from_diffusers(cfg, device)
    if not src.sigma_min < src.sigma_max:
        raise SampleError(f"sigma_min {src.sigma_min} must be below sigma_max {src.sigma_max} (--sigma-max {cfg.sigma_max})")
    if cfg.cfg != 1.0 and src.num_classes == 0:
        raise SampleError("--cfg != 1 needs a class-conditional model; this one is unconditional")
    if cfg.class_label is not None and src.num_classes == 0:
        raise SampleError("--class-label needs a class-conditional model; this one is unconditional")
    if cfg.class_label is not None and not 0 <= cfg.class_label < src.num_classes:
        raise SampleError(f"--class-label {cfg.class_label} is outside [0, {src.num_classes})")
    return src
