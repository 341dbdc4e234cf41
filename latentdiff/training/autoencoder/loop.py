"""The autoencoder training loop: L1 + SSIM + KL, EMA, held-out PSNR/SSIM, checkpoints, export.

Multi-rank: plain torch DDP (gloo on CPU, nccl on GPUs) under ``torchrun``; a model of a few hundred
thousand parameters needs no ZeRO sharding, so DeepSpeed is not used here.  Every rank draws its own
crops (seeded by seed, rank and step, so a resumed run draws what the killed one would have).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from latentdiff.training.autoencoder.checkpoint import load_checkpoint, save_checkpoint
from latentdiff.training.autoencoder.config import AutoencoderConfig
from latentdiff.training.autoencoder.images import ImageSet, load_images
from latentdiff.training.autoencoder.losses import psnr, reconstruction_loss, ssim
from latentdiff.training.autoencoder.model import (
    ModelEMA,
    build_autoencoder,
    latent_statistics,
)
from latentdiff.training.tb import TBWriter
from latentdiff.utils import dist
from latentdiff.utils.io import atomic_dir, atomic_write_json

__all__ = ["evaluate", "train_autoencoder"]


class _Forward(torch.nn.Module):
    """encode -> posterior sample -> decode, returning (reconstruction, per-sample KL); DDP wraps this."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, generator=None):
        post = self.vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator, device=x.device)
        return self.vae.decode(z).sample, post.kl()


@torch.no_grad()
def evaluate(vae, crops: torch.Tensor, batch: int = 32) -> dict:
    """Mean held-out PSNR (dB) and SSIM of the posterior-mean reconstructions, in float32."""
    ps, ss = [], []
    for i in range(0, len(crops), batch):
        x = crops[i:i + batch]
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        ps.append(psnr(rec, x))
        ss.append(ssim(rec, x))
    return {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean())}


def _grid(vae, crops: torch.Tensor) -> torch.Tensor:
    """Originals (top row) over reconstructions (bottom row) as a uint8 CHW image."""
    with torch.no_grad():
        rec = vae.decode(vae.encode(crops).latent_dist.mean).sample.clamp(-1, 1)
    rows = [torch.cat(list(t), dim=2) for t in (crops, rec)]
    return ((torch.cat(rows, dim=1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _schedule(opt, steps: int):
    """Linear warm-up over min(50, steps/10) steps, then cosine decay to 0 (Loshchilov & Hutter 2017, Eq. 5)."""
    warm = max(1, min(50, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))


def _setup(cfg: AutoencoderConfig, images: ImageSet, device):
    arch = cfg.architecture()
    vae = build_autoencoder(arch, cfg.seed).to(device)
    ema = ModelEMA(vae, cfg.ema_decay)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate)
    sched = _schedule(opt, cfg.steps)
    state = load_checkpoint(Path(cfg.output), arch, images.sha256(), vae, ema.model, opt, sched)
    fresh = {"step": 0, "wall_seconds": 0.0, "cpu_seconds": 0.0, "history": [], "architecture": arch,
             "data_sha256": images.sha256()}
    return arch, vae, ema, opt, sched, state or fresh


def _step(cfg, fwd, images, opt, sched, step, device) -> dict:
    rank = dist.get_rank()
    x = images.train_crops(cfg.batch_size, np.random.default_rng([cfg.seed, rank, step])).to(device)
    gen = torch.Generator(device=device).manual_seed(hash((cfg.seed, rank, step)) & 0x7FFFFFFF)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        rec, kl = fwd(x, generator=gen)
    loss, parts = reconstruction_loss(x, rec, kl, ssim_weight=cfg.ssim_weight, kl_weight=cfg.kl_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return {**parts, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0]}


def _log_eval(tb, ema, heldout, state, step, t0, c0) -> dict:
    m = evaluate(ema.model, heldout)
    entry = {"step": step, "wall_seconds": round(state["wall_seconds"] + time.time() - t0, 2),
             "cpu_seconds": round(state["cpu_seconds"] + time.process_time() - c0, 2), **m}
    tb.scalar("heldout/psnr", m["psnr"], step)
    tb.scalar("heldout/ssim", m["ssim"], step)
    tb.image("heldout/reconstructions", _grid(ema.model, heldout[::max(1, len(heldout) // 8)][:8]), step)
    return entry


def _train(cfg, images, vae, ema, opt, sched, state, device) -> dict:
    heldout = images.heldout_crops().to(device)
    fwd = _Forward(vae)
    if dist.is_distributed():
        fwd = torch.nn.parallel.DistributedDataParallel(fwd)
    main = dist.is_main()
    tb = TBWriter(Path(cfg.output) / "tb", enabled=main, purge_step=state["step"])
    t0, c0 = time.time(), time.process_time()
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not (main and cfg.progress), desc="autoencoder")
    for step in range(state["step"], cfg.steps):
        parts = _step(cfg, fwd, images, opt, sched, step, device)
        if parts.get("nonfinite"):
            raise RuntimeError(f"step {step}: the loss is not finite ({parts}); lower --learning-rate or use --precision fp32")
        ema.update(vae)
        for k in ("loss", "l1", "ssim", "kl", "lr"):
            tb.scalar(f"train/{k}", parts[k], step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.4f}")
        done = step + 1
        if main and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            state["history"].append(_log_eval(tb, ema, heldout, state, done, t0, c0))
            bar.write(f"step {done}: held-out PSNR {state['history'][-1]['psnr']:.2f} dB "
                      f"SSIM {state['history'][-1]['ssim']:.4f}")
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            state.update(step=done, wall_seconds=state["wall_seconds"] + time.time() - t0,
                         cpu_seconds=state["cpu_seconds"] + time.process_time() - c0)
            t0, c0 = time.time(), time.process_time()
            if main:
                save_checkpoint(Path(cfg.output), vae, ema.model, opt, sched, state)
            dist.barrier()
    bar.close()
    tb.close()
    return state


def _export(cfg, images, ema, state, arch) -> dict:
    """Write ``OUT/vae`` (save_pretrained, EMA weights, scaling/shift from the data) and ``training.json``."""
    vae = ema.model.cpu()
    crops = images.train_crops(cfg.stat_crops, np.random.default_rng([cfg.seed, 1 << 20]))
    mean, std = latent_statistics(vae, crops)
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
    out = Path(cfg.output)
    with atomic_dir(out / "vae") as tmp:
        vae.save_pretrained(str(tmp), safe_serialization=True)
    final = state["history"][-1] if state["history"] else {"step": state["step"], **evaluate(vae, images.heldout_crops())}
    summary = {
        "command": cfg.command or [sys.argv[0], *sys.argv[1:]],
        "data_sha256": images.sha256(), "images": images.names, "resolution": int(images.images.shape[1]),
        "crop": cfg.crop, "val_fraction": cfg.val_fraction, "heldout_crops": len(images.heldout_crops()),
        "architecture": arch, "steps": state["step"], "world_size": dist.get_world_size(),
        "precision": cfg.precision, "latent_mean": mean, "latent_std": std,
        "scaling_factor": 1.0 / std, "shift_factor": mean,
        "heldout_psnr": final["psnr"], "heldout_ssim": final["ssim"],
        "wall_seconds": round(state["wall_seconds"], 2), "cpu_seconds": round(state["cpu_seconds"], 2),
        "history": state["history"], "vae": str(out / "vae"),
    }
    atomic_write_json(out / "training.json", summary)
    return summary


def train_autoencoder(cfg: AutoencoderConfig) -> dict:
    """Train (or resume) and export; returns the ``training.json`` summary (on rank 0; None elsewhere)."""
    cfg.validate()
    dist.init_distributed()
    device = dist.device()
    images = load_images(cfg.inputs, cfg.resolution, cfg.crop, cfg.val_fraction, cfg.min_images)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    arch, vae, ema, opt, sched, state = _setup(cfg, images, device)
    vae.train(True)
    state = _train(cfg, images, vae, ema, opt, sched, state, device)
    summary = _export(cfg, images, ema, state, arch) if dist.is_main() else None
    dist.barrier()
    return summary
