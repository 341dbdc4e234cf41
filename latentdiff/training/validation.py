"""The held-out validation loss: EDM-weighted denoising loss on a fixed set of (image, sigma, noise) triples.

The triples are fixed so that the value is comparable across runs, noise schedules and resumes:

* images: the first ``n`` samples of the validation dataset (manifest order, read as one reader of a
  world of size 1), one latent drawn from each stored posterior;
* sigma: the stratified quantiles ``sigma_i = exp(P_mean + P_std * Phi^-1((i + 1/2) / n))`` of EDM's
  log-normal with ``P_mean = -1.2``, ``P_std = 1.2`` (Karras et al. 2022, Table 1) - fixed, *not* the
  run's training distribution (which a WSNR shift or another schedule changes) - dealt to the images by
  a fixed permutation;
* noise and the posterior draws: generators seeded by ``VALIDATION_SEED``, not the run's seed.

The loss is :func:`latentdiff.diffusion.precond.edm_loss`, ``lambda(sigma) * mean ||D(y + sigma n) - y||^2``
with ``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` (Karras et al. 2022, Eq. 8 and
Table 1), averaged overall and per log-sigma bin of :mod:`latentdiff.training.tb`.  Runs are
comparable when they share the validation data and the latent normalization (the loss is computed on
model-space latents).  Every rank evaluates all triples with the same forwards (so that ZeRO-3
parameter gathers match); rank 0 logs ``val/raw``, ``val/ema_<rate>`` and ``val_per_sigma/...``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from latentdiff.contracts.manifest import MANIFEST_NAME, load_manifest
from latentdiff.data.reader import LatentShardDataset, sample_latent
from latentdiff.data.split import SPLIT_JSON
from latentdiff.diffusion.precond import edm_loss
from latentdiff.training.tb import NUM_BINS, TBWriter, sigma_bin
from latentdiff.utils.errors import TrainError
from latentdiff.utils.io import read_json

__all__ = ["VALIDATION_SEED", "EVAL_P_MEAN", "EVAL_P_STD", "resolve_validation_dataset", "evaluation_sigmas",
           "fixed_triples", "validation_loss", "log_validation"]

VALIDATION_SEED = 271828
EVAL_P_MEAN, EVAL_P_STD = -1.2, 1.2


def resolve_validation_dataset(spec: str, dataset: str | Path) -> Path | None:
    """``auto``: the ``validation_dataset`` of DATASET/split.json, else DATASET/val when it holds a
    dataset, else none; ``none``: off; otherwise the path (which must hold a dataset)."""
    if spec in ("none", ""):
        return None
    if spec == "auto":
        split = Path(dataset) / SPLIT_JSON
        if split.is_file():
            rec = read_json(split, TrainError, missing="", invalid="; re-run the encoder or set val_dataset")
            other = rec.get("validation_dataset")
            if other and (Path(other) / MANIFEST_NAME).is_file():
                return Path(other)
        val = Path(dataset) / "val"
        return val if (val / MANIFEST_NAME).is_file() else None
    path = Path(spec)
    if not (path / MANIFEST_NAME).is_file():
        raise TrainError(f"val_dataset {path} holds no {MANIFEST_NAME}; encode one (latentdiff-encode --val-fraction "
                         "or --val-input) or set val_dataset none")
    return path


def evaluation_sigmas(n: int) -> torch.Tensor:
    """The ``n`` stratified quantiles of the fixed evaluation log-normal (module docstring), float64."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
    return torch.exp(EVAL_P_MEAN + EVAL_P_STD * z)


def fixed_triples(root: str | Path, n: int, norm, device, null_label: int | None, train_manifest=None):
    """``(y, labels, sigma, noise)`` of the first ``n`` validation samples, identical in every run and rank."""
    manifest = load_manifest(root)
    if train_manifest is not None:
        if tuple(manifest.sample_shape) != tuple(train_manifest.sample_shape) or manifest.vae != train_manifest.vae:
            raise TrainError(f"the validation dataset {root} was encoded with another VAE or resolution than the "
                             "training data (dataset.json 'vae' / 'sample_shape' differ); encode it with the same options")
    n = min(int(n), manifest.num_samples)
    ds = LatentShardDataset(root, n, rank=0, world_size=1, num_workers=0, shuffle=False, verify="none")
    mean, std, labels, _ = next(iter(ds))
    g = torch.Generator("cpu").manual_seed(VALIDATION_SEED)
    y = norm.to_model(sample_latent(mean, std, g)).to(device)
    perm = torch.randperm(n, generator=g)
    sigma = evaluation_sigmas(n)[perm].to(device=device, dtype=torch.float32)
    noise = torch.randn(y.shape, generator=g).to(device)
    lab = None
    if null_label is not None:
        lab = torch.where(labels < 0, torch.full_like(labels, null_label), labels).to(device)
    return y, lab, sigma, noise


@torch.no_grad()
def validation_loss(net, triples, chunk: int) -> dict:
    """Mean loss overall and per sigma bin (None for an empty bin) of ``net`` on the triples."""
    y, lab, sigma, noise = triples
    losses = []
    for i in range(0, y.shape[0], chunk):
        sl = slice(i, i + chunk)
        loss, _ = edm_loss(net, y[sl], labels=None if lab is None else lab[sl], sigma=sigma[sl], noise=noise[sl])
        losses.append(loss.detach().double().cpu())
    loss = torch.cat(losses)
    b = sigma_bin(sigma).cpu()
    sums = torch.zeros(NUM_BINS, dtype=torch.float64).index_add_(0, b, loss)
    counts = torch.zeros(NUM_BINS, dtype=torch.float64).index_add_(0, b, torch.ones_like(loss))
    return {"loss": float(loss.mean()), "n": int(loss.numel()),
            "bins": [float(s / c) if c > 0 else None for s, c in zip(sums, counts)]}


def log_validation(tb: TBWriter, step: int, engine, triples, ema_denoisers, chunk: int) -> dict:
    """The raw engine's (every rank) and every EMA's (rank 0) validation loss, written to tensorboard."""
    engine.eval()
    try:
        out = {"raw": validation_loss(engine, triples, chunk)}
    finally:
        engine.train()
    for rate, d in ema_denoisers:
        if d is not None:
            out[f"ema_{rate:g}"] = validation_loss(d, triples, chunk)
    for name, r in out.items():
        tb.scalar(f"val/{name}", r["loss"], step)
        for i, v in enumerate(r["bins"]):
            tb.scalar(f"val_per_sigma/{name}_bin{i}", v, step)
    tb.flush()
    return out
