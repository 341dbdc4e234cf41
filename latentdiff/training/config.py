"""``TrainConfig``: every training knob, loaded by :mod:`latentdiff.utils.config` from YAML (or a named
preset) plus CLI overrides, validated before any process group starts.

Every field is also a command-line flag (``--lr 2e-4``, ``--ema-rates "[0.9996, 0.9999]"``; list and
dict values are parsed as YAML) whose ``--help`` text is the field's ``help`` metadata.  Presets ship as
package data in ``latentdiff/configs/*.yaml`` and are named by ``--config NAME`` (e.g. ``tiny-cpu``);
``--config path.yaml`` loads a file.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from latentdiff.models import MODEL_NAMES
from latentdiff.solvers.registry import DEFAULT_SAMPLER, SAMPLERS
from latentdiff.training.power_ema import SIGMA_REL_MAX
from latentdiff.utils.errors import ConfigError

__all__ = ["TrainConfig", "RESUME_SAFE_FIELDS", "config_diff"]

NORMALIZATIONS = ("sd", "channel")
NOISES = ("wsnr", "edm", "resolution", "vp", "ve")
NOISE_BASES = ("lognormal", "logit_normal", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESUME_MODES = ("auto", "never", "must")
VERIFY_MODES = ("sample", "sha256", "size", "none")
SNAPSHOT_DTYPES = ("fp16", "fp32")
ADAMW_IMPLS = ("auto", "fused", "default")
CONV_MODELS = ("unet", "unet-tiny")  # the models channels_last applies to


def _opt(default, help: str):
    """A config field with its ``--help`` text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # common names users try, and the field each stands for (suggested in the unknown-field error)
    ALIASES: ClassVar[dict] = {"learning_rate": "lr", "batch_size": "micro_batch", "micro_batch_size": "micro_batch",
                               "gradient_accumulation_steps": "grad_accum", "ema_decay": "ema_rates",
                               "ema_rate": "ema_rates", "steps": "max_steps", "total_images": "duration_images",
                               "warmup": "warmup_images", "output_dir": "run_dir", "data": "dataset",
                               "epochs": "duration_images", "num_epochs": "duration_images",
                               "max_epochs": "duration_images", "train_steps": "max_steps",
                               "warmup_steps": "warmup_images", "batch": "micro_batch",
                               "train_batch_size": "global_batch", "global_batch_size": "global_batch",
                               "max_grad_norm": "grad_clip", "gradient_clipping": "grad_clip",
                               "clip_grad_norm": "grad_clip", "save_every": "checkpoint_every",
                               "checkpoint_interval": "checkpoint_every", "log_interval": "log_every",
                               "workers": "num_workers", "dataloader_workers": "num_workers",
                               "mixed_precision": "precision", "dtype": "precision", "ema": "ema_rates",
                               "arch": "model", "architecture": "model", "output": "run_dir"}

    # where -----------------------------------------------------------------------------------
    run_dir: str = _opt("runs/run", "run directory: checkpoints/, export/, tb/, samples/ and config.json go here")
    dataset: str = _opt("", "an encoded dataset directory (the --output of tools/encode_latents.py)")
    # model -----------------------------------------------------------------------------------
    model: str = _opt("uvit-s", f"backbone preset: {', '.join(MODEL_NAMES)}")
    model_overrides: dict = _opt({}, "fields of the model preset to replace, e.g. {grad_checkpointing: true}")
    conditional: bool = _opt(True, "class-conditional when the dataset has labels")
    label_dropout: float = _opt(0.1, "probability of replacing a label by the null class (classifier-free guidance)")
    # data space and noise ----------------------------------------------------------------------
    normalization: str = _opt("channel", "raw latent -> model space: sd (the VAE's scaling_factor) | channel "
                                         "((z - mean_c) / std_c * sigma_target from stats.json)")
    sigma_target: float = _opt(0.5, "target std per channel for normalization=channel")
    sigma_data: float = _opt(0.0, "EDM sigma_data; 0 = the RMS of the model-space latents from stats.json")
    noise: str = _opt("wsnr", "shift rule applied to noise_base: wsnr (aligned by WSNR to the reference, wsnr.txt "
                              "Sec. 4) | resolution (ln sigma + ln(side/resolution_ref), SD3 / simple diffusion) | "
                              "edm (unshifted) | vp | ve (edm.txt Table 1; noise_base ignored)")
    noise_base: str = _opt("lognormal", "base sigma distribution: lognormal (EDM, p_mean/p_std) | logit_normal "
                                        "(SD3, logit_m/logit_s at unit data variance) | cosine (simple diffusion)")
    p_mean: float = _opt(-1.2, "EDM log-normal P_mean (on the WSNR reference spectrum for noise=wsnr)")
    p_std: float = _opt(1.2, "EDM log-normal P_std")
    logit_m: float = _opt(0.0, "SD3 logit-normal location m (noise_base=logit_normal; Esser et al. 2024 Sec. 3.1)")
    logit_s: float = _opt(1.0, "SD3 logit-normal scale s (noise_base=logit_normal)")
    resolution_ref: int = _opt(64, "reference side d_ref of noise=resolution (pixels of the array the denoiser sees)")
    wsnr_reference: str = _opt("", "WSNR reference: '' = this dataset's 64x64 RGB spectrum, or another encoded dataset")
    wsnr_include_dc: bool = _opt(True, "WSNR with the zero frequency (wsnr.txt Eq. 2 as written); false = DC-free")
    sigma_min: float = _opt(0.002, "smallest sigma of the sampling grid (edm.txt Eq. 5)")
    sigma_max_alpha: float = _opt(2.0, "data-driven sigma_max = sqrt(mu_d + alpha sigma_d) (wsnr.txt Eq. 7-8)")
    # optimization ----------------------------------------------------------------------------
    precision: str = _opt("auto", "auto (as the DeepSpeed config says) | fp32 | bf16 | fp16")
    lr: float = _opt(1e-4, "AdamW learning rate")
    warmup_images: int = _opt(0, "linear learning-rate warmup length in images (0 = none)")
    betas: list = _opt([0.9, 0.999], "AdamW betas")
    eps: float = _opt(1e-8, "AdamW epsilon")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "gradient norm clipping (0 disables)")
    adamw_impl: str = _opt("auto", "AdamW kernels: auto (fused on an accelerator torch has fused AdamW for, e.g. "
                                   "CUDA; torch's default elsewhere) | fused (also on CPU) | default")
    compile: bool = _opt(False, "torch.compile the denoiser (in place: parameter names, checkpoints and exports "
                                "unchanged); the first steps compile; on CPU it needs a C++ compiler")
    channels_last: bool = _opt(False, "U-Net only: run the convolutions in channels-last memory format (tensor "
                                      "cores on GPUs prefer it)")
    micro_batch: int = _opt(32, "samples per rank per micro-step")
    grad_accum: int = _opt(1, "micro-steps accumulated per optimizer step")
    global_batch: int = _opt(0, "samples per optimizer step; 0 = micro_batch x grad_accum x world size, "
                                "otherwise checked against it")
    duration_images: int = _opt(1_000_000, "training length in images")
    max_steps: int = _opt(0, "stop this invocation after this many optimizer steps in total (0 = the full "
                             "duration; no export is written when it stops early)")
    ema_rates: list = _opt([0.9999], "EMA decays per optimizer step, e.g. [0.999, 0.9999]")
    power_ema_sigma_rels: list = _opt([0.05, 0.10], "relative widths sigma_rel of the tracked power-function EMAs "
                                                    "(EDM2 post-hoc EMA); [] = none")
    snapshot_every_images: int = _opt(0, "save the power-function EMAs to RUN/ema_snapshots every K images, for "
                                         "latentdiff-reconstruct-ema (0 = no snapshots)")
    snapshot_dtype: str = _opt("fp16", "precision of the EMA snapshots: fp16 | fp32")
    snapshot_keep: int = _opt(0, "EMA snapshots kept: 0 = all (what the reconstruction wants), N = the N newest")
    # bookkeeping -----------------------------------------------------------------------------
    checkpoint_every: int = _opt(1000, "optimizer steps between checkpoints")
    keep_last: int = _opt(3, "most recent checkpoints kept")
    keep_every: int = _opt(0, "also keep every checkpoint whose step is a multiple of this (0 = none)")
    log_every: int = _opt(50, "optimizer steps between tensorboard scalars (the statistics stay on the device "
                                "in between and are reduced over ranks only then)")
    stop_check_every: int = _opt(10, "optimizer steps between the ranks' agreement on a stop signal (SIGTERM/"
                                     "SIGUSR1): a signal is acted on within this many steps (1 = every step)")
    sample_every: int = _opt(0, "tensorboard sample grid every K optimizer steps (0 = off)")
    sample_count: int = _opt(16, "images in the tensorboard sample grid")
    sample_nfe: int = _opt(35, "denoiser evaluations per sample-grid image")
    sample_solver: str = _opt(DEFAULT_SAMPLER, f"sampler of the sample grid: {', '.join(SAMPLERS)}")
    heldout_batch: int = _opt(16, "size of the fixed batch of the EMA-vs-raw loss curve (0 = off)")
    val_dataset: str = _opt("auto", "held-out validation dataset: auto (the encoder's split of the dataset, if any) "
                                    "| none | a dataset directory")
    val_samples: int = _opt(512, "fixed (image, sigma, noise) triples of the validation loss")
    val_every: int = _opt(1000, "optimizer steps between validation losses (0 = off; also at the end)")
    eval_every: int = _opt(0, "optimizer steps between sample-quality evaluations of the EMA model (FWD, SWD, KID, "
                              "precision/recall vs the validation data; RUN/eval.jsonl; 0 = off)")
    eval_samples: int = _opt(256, "images generated (seeds 0..N-1) and reference images per evaluation")
    seed: int = _opt(0, "seed of the initial weights, the data order and every random draw")
    num_workers: int = _opt(2, "DataLoader worker processes per rank")
    shuffle_buffer: int = _opt(1000, "samples in each reader's shuffle buffer")
    verify_shards: str = _opt("sample", "sample (sizes at start, every sample's checksum as it is read) | sha256 (whole "
                              "files at start) | size | none")
    resume: str = _opt("auto", "auto (from the latest checkpoint, if any) | never | must")
    force_resume: bool = _opt(False, "resume although fields that matter changed (the difference is logged)")
    comm_timeout_minutes: float = _opt(30.0, "timeout of the collectives, in minutes")
    fp16_max_min_scale_steps: int = _opt(20, "stop after this many consecutive skipped steps at the minimum "
                                             "fp16 loss scale")

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Check every value; raise ConfigError naming each bad field and its fix."""
        e = self._check_paths_and_choices() + self._check_numbers() + self._check_batch(world_size)
        if e:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(e))
        return self

    def _check_paths_and_choices(self) -> list[str]:
        e = []
        if not self.dataset:
            e.append("dataset: required; point it at an encoded dataset (tools/encode_latents.py --output DIR)")
        elif not (Path(self.dataset) / "dataset.json").is_file():
            e.append(f"dataset: {self.dataset}/dataset.json not found; encode first with tools/encode_latents.py")
        for name, choices in (("normalization", NORMALIZATIONS), ("noise", NOISES), ("noise_base", NOISE_BASES),
                              ("precision", PRECISIONS),
                              ("resume", RESUME_MODES), ("verify_shards", VERIFY_MODES), ("sample_solver", SAMPLERS),
                              ("snapshot_dtype", SNAPSHOT_DTYPES), ("adamw_impl", ADAMW_IMPLS)):
            if getattr(self, name) not in choices:
                e.append(f"{name}: {getattr(self, name)!r} is not one of {choices}")
        if not isinstance(self.model_overrides, dict):
            e.append(f"model_overrides: {self.model_overrides!r} must be a mapping")
        elif self.model not in MODEL_NAMES:
            e.append(f"model: {self.model!r} is not one of {', '.join(MODEL_NAMES)}")
        if self.channels_last and self.model not in CONV_MODELS:
            e.append(f"channels_last: applies to the convolutional models ({', '.join(CONV_MODELS)}), not {self.model!r} "
                     "(a U-ViT is a transformer); remove it")
        return e

    def _check_numbers(self) -> list[str]:
        e = []
        if not 0 <= self.label_dropout < 1:
            e.append(f"label_dropout: {self.label_dropout} must be in [0, 1)")
        for name in ("sigma_target", "p_std", "logit_s", "sigma_min", "lr"):
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
        for names, lo in ((("micro_batch", "grad_accum", "duration_images"), 1),
                          (("warmup_images", "max_steps", "global_batch", "keep_every", "sample_every",
                            "heldout_batch", "num_workers", "snapshot_every_images", "snapshot_keep",
                            "val_every", "eval_every"), 0),
                          (("checkpoint_every", "keep_last", "log_every", "stop_check_every", "sample_count", "sample_nfe",
                            "val_samples", "resolution_ref", "eval_samples",
                            "fp16_max_min_scale_steps"), 1)):
            for name in names:
                v = getattr(self, name)
                if not (isinstance(v, int) and v >= lo):
                    what = "a positive integer" if name in ("micro_batch", "grad_accum", "duration_images") else f"an integer >= {lo}"
                    e.append(f"{name}: {v!r} must be {what}")
        if not (isinstance(self.ema_rates, (list, tuple)) and self.ema_rates and all(0 <= r < 1 for r in self.ema_rates)):
            e.append(f"ema_rates: {self.ema_rates!r} must be a non-empty list of decays in [0, 1), e.g. [0.9999]")
        return e + self._check_power_ema()

    def _check_power_ema(self) -> list[str]:
        s = self.power_ema_sigma_rels
        if not (isinstance(s, (list, tuple)) and all(isinstance(v, (int, float)) and 0 < v < SIGMA_REL_MAX for v in s)
                and len(set(s)) == len(s)):
            return [f"power_ema_sigma_rels: {s!r} must be a list of distinct widths in (0, {SIGMA_REL_MAX:.4f}) "
                    "(EDM2 App. C), e.g. [0.05, 0.10], or [] for none"]
        if self.snapshot_every_images and not s:
            return ["snapshot_every_images: snapshots hold the power-function EMAs, but power_ema_sigma_rels is []; "
                    "set both or set snapshot_every_images 0"]
        return []

    def _check_batch(self, world_size: int) -> list[str]:
        """global = micro_batch x grad_accum x world size; a mismatch names the grad_accum that fits, if any."""
        if not all(isinstance(getattr(self, n), int) and getattr(self, n) >= 1 for n in ("micro_batch", "grad_accum")):
            return []
        implied = self.micro_batch * self.grad_accum * world_size
        if not self.global_batch or self.global_batch == implied:
            return []
        unit = self.micro_batch * world_size
        head = (f"global_batch: {self.global_batch} != micro_batch {self.micro_batch} x grad_accum {self.grad_accum} "
                f"x world size {world_size} = {implied}; ")
        if self.global_batch % unit == 0:
            return [head + f"set grad_accum = {self.global_batch // unit} or global_batch = {implied} (or 0 to derive it)"]
        below, above = (self.global_batch // unit) * unit, (self.global_batch // unit + 1) * unit
        near = ", ".join(f"{g} (grad_accum {g // unit})" for g in (below, above) if g > 0)
        return [head + f"no integer grad_accum fits: global_batch must be a multiple of micro_batch {self.micro_batch} "
                f"x world size {world_size} = {unit}; the nearest valid global batches are {near} "
                "(or change micro_batch, or set global_batch 0 to derive it)"]

    def resolved_global_batch(self, world_size: int) -> int:
        return self.micro_batch * self.grad_accum * world_size

    def total_steps(self, world_size: int) -> int:
        return math.ceil(self.duration_images / self.resolved_global_batch(world_size))


# fields that may change between a checkpoint and its resume without changing what is trained
RESUME_SAFE_FIELDS = frozenset(
    {
        "run_dir", "duration_images", "max_steps", "checkpoint_every", "keep_last", "keep_every", "log_every",
        "sample_every", "sample_count", "sample_nfe", "sample_solver", "heldout_batch", "resume", "force_resume",
        "comm_timeout_minutes", "verify_shards", "fp16_max_min_scale_steps", "dataset",
        "snapshot_every_images", "snapshot_dtype", "snapshot_keep", "val_dataset", "val_samples",
        "val_every", "eval_every", "eval_samples", "stop_check_every",
        # how the same arithmetic runs (kernels, memory layout): results differ by rounding only
        "adamw_impl", "compile", "channels_last",
    }
)


# what a checkpoint written before a field existed did, in that field's terms
LEGACY_VALUES = {"power_ema_sigma_rels": []}


def config_diff(old: dict, new: dict, ignore=RESUME_SAFE_FIELDS) -> list[str]:
    """Fields that differ between two resolved configs, excluding ``ignore``; a field an older checkpoint
    does not have counts as its ``LEGACY_VALUES`` entry (e.g. no power EMAs)."""
    out = []
    old, new = ({**LEGACY_VALUES, **d} for d in (old, new))
    for k in sorted(set(old) | set(new)):
        if k in ignore:
            continue
        if old.get(k) != new.get(k):
            out.append(f"{k}: {json.dumps(old.get(k))} (checkpoint) -> {json.dumps(new.get(k))} (now)")
    return out
