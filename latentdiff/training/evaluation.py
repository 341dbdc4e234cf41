"""The fixed-batch loss curve (raw weights vs EMA) and the EMA denoiser the evaluations use.

The fixed batch is not split across ranks: every rank reads the same first ``n`` samples (in manifest
order, as one reader of a world of size 1) and draws the same latents, sigmas and noise from one
seed, so every rank runs the same forwards -- the ZeRO-3 parameter gathers inside them are matched one
for one whatever ``n``, the shard sizes or the number of ranks.  Rank 0 logs.
"""
from __future__ import annotations

import torch

from latentdiff.data.reader import LatentShardDataset, sample_latent
from latentdiff.diffusion.precond import EDMPrecond, edm_loss
from latentdiff.models import from_config
from latentdiff.training.ema import EMA
from latentdiff.training.tb import TBWriter
from latentdiff.utils.errors import TrainError
from latentdiff.utils.seeds import step_seed
from latentdiff.vae.normalization import Normalization

__all__ = ["fixed_batch", "ema_denoiser", "log_fixed_batch"]


def fixed_batch(dataset, n: int, seed: int, norm: Normalization, sigma_dist, device, null_label: int | None):
    """The fixed batch of the raw-vs-EMA loss curve: ``(y, labels, sigma, noise)``, identical on every rank."""
    ds = LatentShardDataset(dataset, n, rank=0, world_size=1, num_workers=0, shuffle=False, verify="none")
    mean, std, labels, _ = next(iter(ds))
    g = torch.Generator(device).manual_seed(step_seed(seed, -1 % (1 << 31), 0, 0))
    y = norm.to_model(sample_latent(mean.to(device), std.to(device), g))
    lab = None
    if null_label is not None:
        labels = labels.to(device)
        lab = torch.where(labels < 0, torch.full_like(labels, null_label), labels)
    sigma = sigma_dist.sample(y.shape[0], g, device)
    noise = torch.randn(y.shape, generator=g, device=device)
    return y, lab, sigma, noise


def ema_denoiser(ema: EMA, rate: float, model_config: dict, sigma_data: float, device, is_main: bool):
    """A plain (non-engine) EDM denoiser with the EMA weights of ``rate`` on rank 0; None elsewhere.

    Collective under ZeRO-3 (every rank calls: the EMA shards are gathered).
    """
    state = ema.full_state(rate, dst=0)
    if not is_main:
        return None
    d = EDMPrecond(from_config(model_config), sigma_data)
    missing, unexpected = d.load_state_dict(state, strict=False)
    params = {n for n, _ in d.named_parameters()}
    if unexpected or [k for k in missing if k in params]:
        raise TrainError(f"EMA state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return d.to(device).eval()


@torch.no_grad()
def log_fixed_batch(tb: TBWriter, step: int, engine, heldout, ema_denoisers) -> None:
    """EDM loss of the live engine and of every EMA (``ema_denoisers``: (rate, denoiser or None) pairs,
    None off rank 0) on the fixed batch; every rank runs the engine's forward (ZeRO-3 gathers)."""
    y, lab, sigma, noise = heldout
    engine.eval()
    raw, _ = edm_loss(engine, y, labels=lab, sigma=sigma, noise=noise)  # same on every rank
    engine.train()
    for rate, d in ema_denoisers:
        if d is not None:
            ema_loss, _ = edm_loss(d, y, labels=lab, sigma=sigma, noise=noise)
            tb.scalar(f"loss_fixed_batch/ema_{rate:g}", ema_loss.mean(), step)
    tb.scalar("loss_fixed_batch/raw", raw.mean(), step)
