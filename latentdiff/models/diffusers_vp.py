"""A pretrained diffusers ``UNet2DModel`` (epsilon-prediction DDPM) as an EDM denoiser through VP preconditioning.

D(x; sigma) = x - sigma eps(x / sqrt(1 + sigma^2), 999 sigma^-1(sigma)) (edm.txt Table 1, wsnr.txt A.4),
sampled with the same solvers as a latentdiff export.  Only the DDPM linear beta schedule
(1e-4 .. 0.02, 1000 steps) is the VP schedule of edm.txt; other schedules or prediction types are refused.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from latentdiff.diffusion.precond import VPPrecond
from latentdiff.utils.errors import SampleError
from latentdiff.utils.io import sha256_files

__all__ = ["DiffusersEpsNet", "load_diffusers_unet"]

# the DDPM schedule that is the VP schedule of edm.txt (beta_min = 0.1, beta_d = 19.9, M = 1000)
_DDPM_LINEAR = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000}


class DiffusersEpsNet(torch.nn.Module):
    """``F(x, c_noise, labels)`` for :class:`~latentdiff.precond.VPPrecond` around a diffusers
    ``UNet2DModel`` trained as a DDPM epsilon predictor.

    The DDPM linear beta schedule (1e-4 .. 0.02 over 1000 steps) is the discretization of the VP
    schedule with beta_min = 0.1, beta_d = 19.9 (edm.txt Table 1 / Appendix C.1), so
    c_noise = (M - 1) sigma^-1(sigma) is the (continuous) DDPM timestep the model expects, and
    c_in = 1/sqrt(1 + sigma^2) maps x = y + sigma n to the model's input sqrt(abar) y + sqrt(1 - abar) n.
    A model with learned variances (``out_channels = 2 in_channels``, iDDPM/ADM style) returns
    [eps, v]; the first half is epsilon.
    """

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        cin, cout = int(unet.config.in_channels), int(unet.config.out_channels)
        if cout not in (cin, 2 * cin):
            raise SampleError(
                f"UNet2DModel has in_channels {cin} and out_channels {cout}: an epsilon predictor has out_channels = "
                "in_channels (or 2x with learned variances)"
            )
        self.in_channels = cin

    def forward(self, x, c_noise, labels=None):
        kw = {"class_labels": labels} if labels is not None and getattr(self.unet.config, "num_class_embeds", None) else {}
        out = self.unet(x, c_noise.to(x.dtype), **kw).sample
        return out[:, : self.in_channels]


def _scheduler_record(path: Path, unet_dir: Path) -> dict:
    """The scheduler config beside the UNet, which must be the DDPM linear schedule with epsilon
    prediction; without one that schedule is assumed (and recorded as assumed)."""
    sched_file = next((p for p in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                                   unet_dir / "scheduler_config.json") if p.is_file()), None)
    scheduler = {"assumed": dict(_DDPM_LINEAR, prediction_type="epsilon")}
    if sched_file is not None:
        sc = json.loads(sched_file.read_text())
        bad = []
        if sc.get("prediction_type", "epsilon") != "epsilon":
            bad.append(f"prediction_type {sc.get('prediction_type')!r} (need 'epsilon')")
        if sc.get("beta_schedule", "linear") != "linear":
            bad.append(f"beta_schedule {sc.get('beta_schedule')!r} (need 'linear')")
        for k in ("beta_start", "beta_end", "num_train_timesteps"):
            if k in sc and not math.isclose(float(sc[k]), float(_DDPM_LINEAR[k]), rel_tol=1e-6):
                bad.append(f"{k} {sc[k]} (need {_DDPM_LINEAR[k]})")
        if sc.get("trained_betas"):
            bad.append("trained_betas (need the linear schedule)")
        if bad:
            raise SampleError(
                f"--diffusers-unet {path}: {sched_file.name} has " + ", ".join(bad) + "; the VP bridge is exact only for "
                "DDPM epsilon models with the linear beta schedule 1e-4..0.02 over 1000 steps (edm.txt Table 1, VP)"
            )
        scheduler = {"file": str(sched_file), **{k: sc.get(k) for k in ("prediction_type", *_DDPM_LINEAR)}}
    return scheduler


def load_diffusers_unet(path: str | Path, device="cpu"):
    """(VPPrecond denoiser, meta) for a local diffusers UNet2DModel directory (pixel space in [-1, 1]).

    ``path``: a ``UNet2DModel.save_pretrained`` folder, or a pipeline folder with ``unet/`` (and
    ``scheduler/``).  A scheduler config beside it (``scheduler/scheduler_config.json`` or
    ``scheduler_config.json``) must describe the DDPM linear schedule with epsilon prediction;
    without one that schedule is assumed (and recorded as assumed).
    """
    # diffusers is imported only to load a UNet: it takes seconds, and an export needs none
    from diffusers import UNet2DModel

    path = Path(path)
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (unet_dir / "config.json").is_file():
        raise SampleError(
            f"--diffusers-unet {path}: no config.json (nor unet/config.json); pass a UNet2DModel.save_pretrained() "
            "directory or a diffusers pipeline folder"
        )
    scheduler = _scheduler_record(path, unet_dir)
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, torch_dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise SampleError(f"--diffusers-unet {path}: cannot load a UNet2DModel from {unet_dir}: {e}") from e
    cfg = unet.config
    c = int(cfg.in_channels)
    size = cfg.sample_size
    h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    weights = sorted(p for p in unet_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    meta = {
        "source": "diffusers-unet",
        "path": str(path),
        "shape": [c, h, w],
        "num_classes": int(cfg.num_class_embeds or 0),
        "normalization": {"kind": "identity", "shift": [0.0] * c, "scale": [1.0] * c},
        "vae": "none",
        "precond": {"kind": "vp", "beta_d": 19.9, "beta_min": 0.1, "M": 1000},
        "scheduler": scheduler,
        "schedule": {"sigma_min": 0.002},
        "hash": sha256_files([unet_dir / "config.json", *weights]),
    }
    return VPPrecond(DiffusersEpsNet(unet)).to(device).eval(), meta
