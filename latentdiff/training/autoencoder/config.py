"""``AutoencoderConfig``: every option of ``latentdiff-train-autoencoder``, validated before training."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from latentdiff.utils.errors import ConfigError

__all__ = ["PRESETS", "AutoencoderConfig"]

# architecture presets: downsampling factor = 2 ** (len(block_out_channels) - 1)
PRESETS = {
    "f4": {"block_out_channels": [32, 64, 64]},
    "f8": {"block_out_channels": [32, 64, 64, 64]},
    "f4-wide": {"block_out_channels": [64, 128, 128]},
}


def _help(text: str, **extra) -> dict:
    return {"metadata": {"help": text, **extra}}


@dataclass
class AutoencoderConfig:
    """Options of ``latentdiff-train-autoencoder`` / ``tools/train_autoencoder.py``."""

    ALIASES: ClassVar[dict] = {"input": "inputs", "output_dir": "output", "lr": "learning_rate",
                               "batch": "batch_size", "image_size": "resolution"}

    inputs: list[str] = field(default_factory=list, **_help(
        "image folder, .tar of images or list file (as latentdiff-encode); none = the photos bundled with "
        "scikit-image", flag="--input", repeat=True, metavar="PATH"))
    output: str = field(default="", **_help("output directory (re-running the same command resumes)"))
    resolution: int = field(default=512, **_help("ADM center-crop size every image is first brought to"))
    crop: int = field(default=64, **_help("square training crop size in pixels"))
    val_fraction: float = field(default=0.2, **_help(
        "the right-most fraction of every image's columns is held out (no training crop touches it)"))
    min_images: int = field(default=2, **_help("refuse to train on fewer usable images than this"))
    preset: str = field(default="f4", **_help(f"architecture: one of {', '.join(PRESETS)}"))
    block_out_channels: list = field(default_factory=list, **_help("override the preset's channels per level"))
    latent_channels: int = field(default=4, **_help("latent channels"))
    layers_per_block: int = field(default=1, **_help("resnet layers per level"))
    norm_num_groups: int = field(default=1, **_help("GroupNorm groups (must divide every channel count)"))
    mid_attention: bool = field(default=False, **_help("self-attention in the mid block"))
    steps: int = field(default=2400, **_help("optimizer steps"))
    batch_size: int = field(default=4, **_help("crops per step per rank"))
    learning_rate: float = field(default=2e-3, **_help("AdamW peak learning rate (cosine decay to 0)"))
    ssim_weight: float = field(default=0.5, **_help("weight of 1 - SSIM in the loss"))
    kl_weight: float = field(default=1e-6, **_help(
        "weight of the KL term (summed over the latent elements, averaged over the batch; 1e-4 leaves the "
        "posterior noise above the latent signal and costs ~4 dB, see README)"))
    ema_decay: float = field(default=0.995, **_help("EMA decay per step (exported weights are the EMA)"))
    precision: str = field(default="bf16", **_help("bf16 (autocast) or fp32"))
    eval_every: int = field(default=250, **_help("held-out PSNR/SSIM every N steps (0 = only at the end)"))
    checkpoint_every: int = field(default=250, **_help("resumable checkpoint every N steps"))
    stat_crops: int = field(default=256, **_help("training crops encoded to set scaling_factor/shift_factor"))
    seed: int = field(default=0, **_help("seed of the initialization and of the crop positions"))
    progress: bool = field(default=True, **_help("show a progress bar on rank 0"))
    command: list[str] | None = field(default=None, **_help("the command line recorded in training.json"))

    def architecture(self) -> dict:
        """The ``AutoencoderKL`` constructor arguments this config describes."""
        channels = list(self.block_out_channels or PRESETS[self.preset]["block_out_channels"])
        n = len(channels)
        return {
            "in_channels": 3, "out_channels": 3, "latent_channels": self.latent_channels,
            "block_out_channels": channels, "layers_per_block": self.layers_per_block,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "norm_num_groups": self.norm_num_groups, "mid_block_add_attention": self.mid_attention,
        }

    def validate(self) -> AutoencoderConfig:
        """Check every value; raises :class:`ConfigError` naming the flag and the fix."""
        if not self.output:
            raise ConfigError("--output is required: the directory that receives the checkpoints and the VAE")
        for raw in self.inputs:
            if not Path(raw).expanduser().exists():
                raise ConfigError(f"--input {raw!r} does not exist; pass an image folder, a .tar or a list file")
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        for name, lo in (("crop", 8), ("resolution", 8), ("min_images", 1), ("latent_channels", 1),
                         ("layers_per_block", 1), ("norm_num_groups", 1), ("steps", 1), ("batch_size", 1),
                         ("eval_every", 0), ("checkpoint_every", 0), ("stat_crops", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        arch = self.architecture()
        f = 2 ** (len(arch["block_out_channels"]) - 1)
        if self.crop % f:
            raise ConfigError(f"--crop {self.crop} is not divisible by the downsampling factor {f}; "
                              f"use a multiple of {f}")
        bad = [c for c in arch["block_out_channels"] if not isinstance(c, int) or c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"--norm-num-groups {self.norm_num_groups} must divide every block_out_channels "
                              f"entry; {bad} do not")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"--precision {self.precision!r}: choose bf16 or fp32")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema-decay must be in [0, 1), got {self.ema_decay!r}")
        for name in ("learning_rate", "ssim_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)!r}")
        return self
