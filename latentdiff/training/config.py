"""``TrainConfig``: every training knob, loaded from YAML (or a named preset) plus CLI overrides,
validated before any process group starts.

Every field is also a command-line flag (``--lr 2e-4``, ``--ema-rates "[0.9996, 0.9999]"``; list and
dict values are parsed as YAML).  Presets ship as package data in ``latentdiff/configs/*.yaml`` and are
named by ``--config NAME`` (e.g. ``tiny-cpu``); ``--config path.yaml`` loads a file.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from latentdiff.utils.errors import ConfigError

__all__ = ["TrainConfig", "RESUME_SAFE_FIELDS", "config_diff"]

NORMALIZATIONS = ("sd", "channel")
NOISES = ("wsnr", "edm", "vp", "ve")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESUME_MODES = ("auto", "never", "must")


@dataclass
class TrainConfig:
    # common names users try, and the field each stands for (suggested in the unknown-field error)
    ALIASES: ClassVar[dict] = {"learning_rate": "lr", "batch_size": "micro_batch", "micro_batch_size": "micro_batch",
               "gradient_accumulation_steps": "grad_accum", "ema_decay": "ema_rates", "ema_rate": "ema_rates",
               "steps": "max_steps", "total_images": "duration_images", "warmup": "warmup_images",
               "output_dir": "run_dir", "data": "dataset"}

    # where -----------------------------------------------------------------------------------
    run_dir: str = "runs/run"  # checkpoints/, export/, tb/, samples/ and config.json go here
    dataset: str = ""  # an encoded dataset (tools/encode_latents.py output)
    # model -----------------------------------------------------------------------------------
    model: str = "uvit-s"  # registry name (latentdiff.models.build)
    model_overrides: dict = field(default_factory=dict)  # e.g. {grad_checkpointing: true}
    conditional: bool = True  # class-conditional when the dataset has labels
    label_dropout: float = 0.1  # p of replacing a label by the null class (classifier-free guidance)
    # data space and noise ----------------------------------------------------------------------
    normalization: str = "channel"  # sd: SD scaling_factor | channel: (z - mean_c) / std_c * sigma_target
    sigma_target: float = 0.5  # target std per channel for normalization=channel
    sigma_data: float = 0.0  # 0 = RMS of the model-space latents from stats.json
    noise: str = "wsnr"  # wsnr (EDM log-normal aligned by WSNR) | edm | vp | ve
    p_mean: float = -1.2  # EDM log-normal P_mean (on the WSNR reference for noise=wsnr)
    p_std: float = 1.2
    wsnr_reference: str = ""  # "" = this dataset's 64x64 RGB spectrum; or another encoded dataset dir
    wsnr_include_dc: bool = True  # Eq. 2 as written (DC included); False = the DC-free variant
    sigma_min: float = 0.002
    sigma_max_alpha: float = 2.0  # data-driven sigma_max = sqrt(mu_d + alpha sigma_d) (wsnr.txt Eq. 7-8)
    # optimization ----------------------------------------------------------------------------
    precision: str = "auto"  # auto = as the DeepSpeed config says | fp32 | bf16 | fp16
    lr: float = 1e-4
    warmup_images: int = 0  # linear LR warmup length in images
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    micro_batch: int = 32  # per rank per micro-step
    grad_accum: int = 1
    global_batch: int = 0  # 0 = micro_batch * grad_accum * world_size; otherwise checked against it
    duration_images: int = 1_000_000  # training length in images
    max_steps: int = 0  # stop this invocation after this many optimizer steps in total (0 = duration)
    ema_rates: list = field(default_factory=lambda: [0.9999])
    # bookkeeping -----------------------------------------------------------------------------
    checkpoint_every: int = 1000  # optimizer steps
    keep_last: int = 3  # checkpoints kept (most recent)
    keep_every: int = 0  # plus every checkpoint whose step is a multiple of this (0 = none)
    log_every: int = 50
    sample_every: int = 0  # tensorboard sample grid every K steps (0 = off)
    sample_count: int = 16
    sample_nfe: int = 35
    heldout_batch: int = 16  # fixed held-out batch for the EMA-vs-raw loss (0 = off)
    seed: int = 0
    num_workers: int = 2
    shuffle_buffer: int = 1000
    verify_shards: str = "size"  # sha256 | size | none (checked against dataset.json at start)
    resume: str = "auto"  # auto: resume from the latest checkpoint if any | never | must
    force_resume: bool = False  # resume even though fields that matter changed (the diff is logged)
    comm_timeout_minutes: float = 30.0
    fp16_max_min_scale_steps: int = 20  # stop after this many consecutive skipped steps at the minimum scale

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Check every value; raise ConfigError naming the field and the fix."""
        e = []
        if not self.dataset:
            e.append("dataset: required; point it at an encoded dataset (tools/encode_latents.py --output DIR)")
        elif not (Path(self.dataset) / "dataset.json").is_file():
            e.append(f"dataset: {self.dataset}/dataset.json not found; encode first with tools/encode_latents.py")
        if self.normalization not in NORMALIZATIONS:
            e.append(f"normalization: {self.normalization!r} is not one of {NORMALIZATIONS}")
        if self.noise not in NOISES:
            e.append(f"noise: {self.noise!r} is not one of {NOISES}")
        if self.precision not in PRECISIONS:
            e.append(f"precision: {self.precision!r} is not one of {PRECISIONS}")
        if self.resume not in RESUME_MODES:
            e.append(f"resume: {self.resume!r} is not one of {RESUME_MODES}")
        if self.verify_shards not in ("sha256", "size", "none"):
            e.append(f"verify_shards: {self.verify_shards!r} is not one of sha256/size/none")
        if not 0 <= self.label_dropout < 1:
            e.append(f"label_dropout: {self.label_dropout} must be in [0, 1)")
        for name in ("sigma_target", "p_std", "sigma_min", "lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                e.append(f"{name}: {v!r} must be a positive number")
        if not (isinstance(self.sigma_data, (int, float)) and self.sigma_data >= 0):
            e.append(f"sigma_data: {self.sigma_data!r} must be >= 0 (0 = from stats.json)")
        if self.sigma_max_alpha < 0:
            e.append(f"sigma_max_alpha: {self.sigma_max_alpha} must be >= 0")
        if not (isinstance(self.betas, (list, tuple)) and len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            e.append(f"betas: {self.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            e.append("eps must be > 0, weight_decay >= 0, grad_clip >= 0")
        for name in ("micro_batch", "grad_accum", "duration_images"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                e.append(f"{name}: {v!r} must be a positive integer")
        for name in ("warmup_images", "max_steps", "global_batch", "keep_every", "sample_every", "heldout_batch", "num_workers"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 0):
                e.append(f"{name}: {v!r} must be an integer >= 0")
        for name in ("checkpoint_every", "keep_last", "log_every", "sample_count", "sample_nfe", "fp16_max_min_scale_steps"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                e.append(f"{name}: {v!r} must be an integer >= 1")
        if not (isinstance(self.ema_rates, (list, tuple)) and self.ema_rates and all(0 <= r < 1 for r in self.ema_rates)):
            e.append(f"ema_rates: {self.ema_rates!r} must be a non-empty list of decays in [0, 1), e.g. [0.9999]")
        if not isinstance(self.model_overrides, dict):
            e.append(f"model_overrides: {self.model_overrides!r} must be a mapping")
        else:
            from latentdiff.models import MODEL_NAMES

            if self.model not in MODEL_NAMES:
                e.append(f"model: {self.model!r} is not one of {', '.join(MODEL_NAMES)}")
        if all(isinstance(getattr(self, n), int) and getattr(self, n) >= 1 for n in ("micro_batch", "grad_accum")):
            implied = self.micro_batch * self.grad_accum * world_size
            if self.global_batch and self.global_batch != implied:
                e.append(
                    f"global_batch: {self.global_batch} != micro_batch {self.micro_batch} x grad_accum "
                    f"{self.grad_accum} x world size {world_size} = {implied}; set grad_accum = "
                    f"{self.global_batch / (self.micro_batch * world_size):g} or global_batch = {implied} "
                    "(or 0 to derive it)"
                )
        if e:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(e))
        return self

    def resolved_global_batch(self, world_size: int) -> int:
        return self.micro_batch * self.grad_accum * world_size

    def total_steps(self, world_size: int) -> int:
        return math.ceil(self.duration_images / self.resolved_global_batch(world_size))


# fields that may change between a checkpoint and its resume without changing what is trained
RESUME_SAFE_FIELDS = frozenset(
    {
        "run_dir", "duration_images", "max_steps", "checkpoint_every", "keep_last", "keep_every", "log_every",
        "sample_every", "sample_count", "sample_nfe", "heldout_batch", "resume", "force_resume",
        "comm_timeout_minutes", "verify_shards", "fp16_max_min_scale_steps", "dataset",
    }
)


def config_diff(old: dict, new: dict, ignore=RESUME_SAFE_FIELDS) -> list[str]:
    """Fields that differ between two resolved configs, excluding ``ignore``."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k in ignore:
            continue
        if old.get(k) != new.get(k):
            out.append(f"{k}: {json.dumps(old.get(k))} (checkpoint) -> {json.dumps(new.get(k))} (now)")
    return out
