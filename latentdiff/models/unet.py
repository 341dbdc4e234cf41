"""U-Net denoiser backbone: a DDPM++-like diffusers ``UNet2DModel`` behind the ``F(x, c_noise, labels)`` API.

The network itself is diffusers' ``UNet2DModel``; this module only chooses its configuration and
adapts the calling convention of :class:`latentdiff.precond.Precond`.

DDPM++-like presets (edm.txt Table 1 "Architecture of F": DDPM++; Sec. 5, config C: "removing the
lowest-resolution layers and doubling the capacity of the highest-resolution layers"):

* 32x32: three levels of 256 channels (32, 16, 8), 4 residual blocks per level, self-attention
  at 16x16, dropout 0.10.
* 64x64: four levels of 128, 256, 256, 256 channels (64 .. 8), 4 residual blocks per level,
  self-attention at 16x16, dropout 0.05.

Both use BigGAN-style residual down/up-sampling (``downsample_type = upsample_type = "resnet"``),
single-head attention, GroupNorm(32, eps 1e-6), SiLU and a 512-wide noise embedding.

Noise conditioning: EDM's ``c_noise = ln(sigma)/4`` (edm.txt Table 1) is a small float, while the
diffusers ``"positional"`` time projection is the DDPM sinusoidal embedding with frequencies
1 ... 1e-4 designed for timesteps in [0, 1000].  The network therefore receives the float timestep
``t = time_scale * c_noise`` (default ``time_scale = 1000``): EDM's range [-1.55, 1.10] then spans
~2650 units, so both the fastest and the slowest frequencies vary across noise levels.  Use
``time_scale = 1`` with VP/iDDPM preconditioning, whose ``c_noise`` already is a timestep in
[0, 999].  (diffusers' ``"fourier"`` time embedding is not used: ``UNet2DModel`` divides its output
by the timestep in that mode, which is NCSN++'s output scaling, not EDM's.)

Class conditioning uses diffusers' class embedding with ``num_class_embeds = num_classes + 1``
rows: the real classes and the learned null class at ``null_label`` (default ``num_classes``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from diffusers import UNet2DModel
from torch import nn

from latentdiff.utils.errors import ConfigError
from latentdiff.diffusion.guidance import resolve_null_label
from latentdiff.models.common import DenoiserNetMixin

__all__ = ["UNetConfig", "UNet", "ddpmpp_preset", "tiny_preset"]


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"U-Net config field {field!r}: {message}")


def ddpmpp_preset(resolution: int) -> dict:
    """DDPM++-like defaults for a 32x32 or 64x64 input (see the module docstring)."""
    if resolution == 32:
        return dict(block_out_channels=(256, 256, 256), attn_resolutions=(16,), dropout=0.10)
    if resolution == 64:
        return dict(block_out_channels=(128, 256, 256, 256), attn_resolutions=(16,), dropout=0.05)
    raise ConfigError(
        f"model 'unet' has DDPM++ presets for resolution 32 and 64, got {resolution}; "
        "pass block_out_channels=... (and attn_resolutions=...) to configure another resolution"
    )


def tiny_preset(resolution: int) -> dict:
    """A two-level test size: 32 and 64 channels, one residual block per level, attention at level 2."""
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        attn_resolutions=(resolution // 2,),
        dropout=0.0,
        norm_num_groups=8,
        time_embedding_dim=64,
    )


@dataclass(frozen=True)
class UNetConfig:
    """Every hyper-parameter of a :class:`UNet`; JSON-serializable through ``dataclasses.asdict``."""

    in_channels: int
    resolution: int
    num_classes: int = 0
    null_label: int | None = None  # None -> num_classes
    block_out_channels: tuple[int, ...] = (256, 256, 256)
    layers_per_block: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.10
    time_embedding_dim: int = 512
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    time_scale: float = 1000.0
    grad_checkpointing: bool = False

    def __post_init__(self):
        for f in ("block_out_channels", "attn_resolutions"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        for f in ("in_channels", "resolution", "layers_per_block", "time_embedding_dim", "norm_num_groups"):
            v = getattr(self, f)
            _require(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, f"must be a positive integer, got {v!r}")
        object.__setattr__(self, "null_label", resolve_null_label(self.num_classes, self.null_label, "U-Net"))
        ch = self.block_out_channels
        _require(
            len(ch) >= 1 and all(isinstance(v, int) and v > 0 for v in ch),
            "block_out_channels",
            f"must be a non-empty list of positive integers (one per resolution level), got {list(ch)}",
        )
        _require(
            all(v % self.norm_num_groups == 0 for v in ch),
            "norm_num_groups",
            f"{self.norm_num_groups} must divide every entry of block_out_channels {list(ch)}",
        )
        down = 2 ** (len(ch) - 1)
        _require(
            self.resolution % down == 0,
            "resolution",
            f"{self.resolution} is not divisible by 2^{len(ch) - 1} = {down} ({len(ch)} levels); "
            "use fewer levels in block_out_channels or another resolution",
        )
        levels = self.level_resolutions()
        _require(
            all(r in levels for r in self.attn_resolutions),
            "attn_resolutions",
            f"{list(self.attn_resolutions)} must be level resolutions, i.e. among {list(levels)}",
        )
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must lie in [0, 1), got {self.dropout!r}")
        _require(
            isinstance(self.time_scale, (int, float)) and math.isfinite(self.time_scale) and self.time_scale > 0,
            "time_scale",
            f"must be a positive finite number (1000 for EDM c_noise, 1 for VP/iDDPM), got {self.time_scale!r}",
        )
        _require(isinstance(self.grad_checkpointing, bool), "grad_checkpointing", "must be true or false")

    def level_resolutions(self) -> tuple[int, ...]:
        return tuple(self.resolution // 2**i for i in range(len(self.block_out_channels)))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


class UNet(DenoiserNetMixin, nn.Module):
    """``F(x, c_noise, labels)`` around a diffusers ``UNet2DModel`` (``self.net``)."""

    arch = "unet"

    def __init__(self, config: UNetConfig, name: str = "unet"):
        super().__init__()
        self.cfg = c = config
        self.name = name
        attn = [r in c.attn_resolutions for r in c.level_resolutions()]
        self.net = UNet2DModel(
            sample_size=c.resolution,
            in_channels=c.in_channels,
            out_channels=c.in_channels,
            time_embedding_type="positional",
            time_embedding_dim=c.time_embedding_dim,
            flip_sin_to_cos=True,
            freq_shift=0,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            block_out_channels=c.block_out_channels,
            layers_per_block=c.layers_per_block,
            downsample_type="resnet",
            upsample_type="resnet",
            dropout=c.dropout,
            act_fn="silu",
            attention_head_dim=None,  # one head over all channels, as DDPM++
            norm_num_groups=c.norm_num_groups,
            norm_eps=c.norm_eps,
            num_class_embeds=c.num_classes + 1 if c.num_classes > 0 else None,
        )
        self.set_grad_checkpointing(c.grad_checkpointing)
        self.channels_last = False  # a way to run, not part of the config (exports do not record it)

    def set_channels_last(self, enabled: bool = True) -> None:
        """Convolution weights and inputs in channels-last memory format (NHWC strides; same values).

        The inputs are what matters: a convolution runs channels-last when its input is, so this holds
        also after DeepSpeed's ZeRO-1/2 flattening has given the weights standard strides again."""
        self.channels_last = bool(enabled)
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        if enabled:
            self.net.enable_gradient_checkpointing()
        else:
            self.net.disable_gradient_checkpointing()

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cfg
        want = (c.in_channels, c.resolution, c.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"{self.name}: expected x of shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        c_noise = torch.as_tensor(c_noise, device=x.device).reshape(-1)
        if c_noise.shape != (x.shape[0],):
            raise ValueError(f"{self.name}: c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}")
        self._check_labels(x, labels)
        tdtype = torch.float64 if c_noise.dtype == torch.float64 else torch.float32
        t = c.time_scale * c_noise.to(tdtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x, t, class_labels=labels, return_dict=False)[0]
