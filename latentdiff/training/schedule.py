"""What the trainer derives from a dataset's ``stats.json``/``stats.npz`` before training.

* the normalization raw latent -> model space (``sd`` or ``channel``),
* sigma_data = RMS of the model-space (sampled) latents (EDM's c_skip/c_out/c_in assume
  E[y^2] = sigma_data^2, edm.txt Appendix B.6),
* the training sigma distribution = base x shift: a base (EDM log-normal, SD3 logit-normal, simple-diffusion
  cosine) moved by a shift rule of :mod:`latentdiff.diffusion.shift` (``edm`` = none; ``wsnr``
  (wsnr.txt Sec. 4): p(WSNR) on the model-space latents equals p(WSNR) of the base on the 64x64 RGB
  reference spectrum; ``resolution``: ln sigma + ln(side / resolution_ref)); or VP / VE (edm.txt Table 1),
* the data-driven sigma_max = sqrt(mu_d + alpha sigma_d) of the model-space data (Eq. 7-8).

The result is a :class:`~latentdiff.contracts.schedule.TrainingSchedule`, stored in every checkpoint
and export, so the sampler reuses exactly these values.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from latentdiff.contracts.manifest import load_manifest
from latentdiff.contracts.schedule import SCHEDULE_VERSION, SigmaMaxRule, TrainingSchedule, WSNRAlignment
from latentdiff.data.stats import DatasetStats
from latentdiff.diffusion.noise import CosineSigma, LogitNormalSigma, LogNormalSigma, VESigma, VPSigma
from latentdiff.diffusion.shift import ShiftRule
from latentdiff.diffusion.spectral import affine_power_spectrum, wsnr_constant
from latentdiff.utils.errors import ConfigError
from latentdiff.vae.normalization import Normalization

__all__ = ["resolve_schedule", "model_space_power", "make_normalization", "SCHEDULE_VERSION"]


def make_normalization(kind: str, manifest: dict, stats: DatasetStats, sigma_target: float) -> Normalization:
    if kind == "sd":
        return Normalization.sd(manifest.vae, channels=stats.sample_shape[0])
    if kind == "channel":
        return Normalization.channel(stats, sigma_target)
    raise ConfigError(f"normalization: {kind!r} is not one of sd/channel")


def model_space_power(stats: DatasetStats, norm: Normalization) -> torch.Tensor:
    """Mean power spectrum of the model-space *sampled* latents (exact, from the raw statistics)."""
    return affine_power_spectrum(stats.sampled_latent_power, stats.channel_mean, norm.shift, norm.scale)


def model_space_rms(stats: DatasetStats, norm: Normalization) -> float:
    """sqrt(E[y^2]) over channels of the model-space sampled latents."""
    shift = torch.tensor(norm.shift, dtype=torch.float64)
    scale = torch.tensor(norm.scale, dtype=torch.float64)
    second = scale.square() * (stats.channel_std.square() + (stats.channel_mean - shift).square())
    return math.sqrt(float(second.mean()))


def _base_distribution(cfg, sigma_data: float):
    """(base distribution, record) for ``cfg.noise_base``.

    SD3's logit-normal is defined on latents normalized to unit variance (Esser et al. 2024, Sec. 3.1 with
    ``x_t = (1-t) x_0 + t eps``, ``sigma = t/(1-t)``): at data scale ``sigma_data`` the same noise-to-signal
    ratios are ``sigma * sigma_data``, i.e. ``m + ln(sigma_data)`` (the record keeps ``data_scale_log_factor``).
    EDM's log-normal (edm.txt Table 1) and simple diffusion's cosine (pixels in [-1, 1]) are used as given.
    """
    if cfg.noise_base == "lognormal":
        return LogNormalSigma(cfg.p_mean, cfg.p_std), {}
    if cfg.noise_base == "logit_normal":
        c = math.log(sigma_data)
        return LogitNormalSigma(cfg.logit_m, cfg.logit_s).shift(c), {"data_scale_log_factor": c}
    if cfg.noise_base == "cosine":
        return CosineSigma(), {}
    raise ConfigError(f"noise_base: {cfg.noise_base!r} is not one of lognormal/logit_normal/cosine")


def _wsnr_shift(cfg, root: Path, stats: DatasetStats, norm: Normalization, base):
    ref_root = Path(cfg.wsnr_reference) if cfg.wsnr_reference else root
    ref_stats = stats if ref_root == root else DatasetStats.load(ref_root)
    if ref_stats.rgb64_power is None:
        raise ConfigError(
            f"noise=wsnr needs the 64x64 RGB reference spectrum, but {ref_root}/stats.npz has none "
            "(re-run tools/dataset_stats.py with the images, or set wsnr_reference to another dataset, or noise=edm)"
        )
    target = model_space_power(stats, norm)
    rule = ShiftRule("wsnr", include_dc=bool(cfg.wsnr_include_dc), reference=str(ref_root))
    dist, record = rule.apply(base, power_target=target, power_ref=ref_stats.rgb64_power)
    k_ref0 = float(wsnr_constant(ref_stats.rgb64_power, include_dc=False))
    k_tgt0 = float(wsnr_constant(target, include_dc=False))
    alignment = WSNRAlignment(
        reference=str(ref_root), include_dc=cfg.wsnr_include_dc, k_reference=record["k_reference"],
        k_target=record["k_target"], sigma_factor_dc_free=math.sqrt(k_tgt0 / k_ref0),
    )
    return dist, record, alignment


def _sigma_distribution(cfg, root: Path, stats: DatasetStats, norm: Normalization, sigma_data: float):
    """(training sigma distribution, shift record or None, WSNR alignment record or None) for
    ``cfg.noise`` (the shift rule, :mod:`latentdiff.diffusion.shift`) applied to ``cfg.noise_base``."""
    if cfg.noise == "vp":
        return VPSigma(), None, None
    if cfg.noise == "ve":
        return VESigma(), None, None
    if cfg.noise not in ("edm", "wsnr", "resolution"):
        raise ConfigError(f"noise: {cfg.noise!r} is not one of wsnr/edm/resolution/vp/ve")
    base, base_record = _base_distribution(cfg, sigma_data)
    alignment = None
    if cfg.noise == "edm":
        dist, record = ShiftRule("none").apply(base)
    elif cfg.noise == "resolution":
        dist, record = ShiftRule("resolution", side_ref=int(cfg.resolution_ref)).apply(
            base, side=int(stats.sample_shape[-1]))
    else:
        dist, record, alignment = _wsnr_shift(cfg, root, stats, norm, base)
    return dist, {**record, "base": base.to_dict(), **base_record}, alignment


def resolve_schedule(cfg, dataset_dir: str | Path | None = None) -> TrainingSchedule:
    """The normalization, sigma_data, training sigma distribution and sigma_max for ``cfg``."""
    root = Path(dataset_dir or cfg.dataset)
    manifest = load_manifest(root)
    stats = DatasetStats.load(root)
    norm = make_normalization(cfg.normalization, manifest, stats, cfg.sigma_target)
    rms = model_space_rms(stats, norm)
    mu_d, sd_d = stats.distance_stats().moments(norm.scale)
    rule = SigmaMaxRule(alpha=float(cfg.sigma_max_alpha), mu_d=float(mu_d), sigma_d=float(sd_d))
    sigma_data = float(cfg.sigma_data) if cfg.sigma_data > 0 else rms
    dist, shift, alignment = _sigma_distribution(cfg, root, stats, norm, sigma_data)
    return TrainingSchedule(
        normalization=norm, sigma_data=sigma_data, shift=shift,
        sigma_min=float(cfg.sigma_min), sigma_max=rule.value(), sigma_dist=dist.to_dict(), noise=cfg.noise,
        sigma_max_rule=rule, wsnr=alignment, model_space_rms=rms, stats_shards_hash=stats.shards_hash,
    ).validate("the resolved schedule")
