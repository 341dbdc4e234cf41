"""U-ViT denoiser backbone (Bao et al. 2023, "All are Worth Words: A ViT Backbone for Diffusion Models").

Everything is a token (Sec. 3 of the paper): the noise level, the class label and the
``patch_size`` x ``patch_size`` patches of the input.  The token sequence goes through
``depth = 2 k + 1`` pre-norm transformer blocks arranged as ``k`` *in* blocks, one *mid* block
and ``k`` *out* blocks; out block ``i`` first fuses the output of in block ``k - 1 - i`` through a
long skip connection, ``h <- Linear(concat(h, skip))`` (Sec. 3.1, "Long skip connection").  The
patch tokens are projected back to pixels, unpatchified and passed through a 3x3 convolution
(Sec. 3.1, "The way to add an extra convolutional block").

Conventions of this implementation:

* ``forward(x, c_noise, labels)`` follows :class:`latentdiff.precond.Precond`: ``c_noise`` is the
  (B,) conditioning value of edm.txt Table 1 (``ln(sigma)/4`` for EDM).  It is mapped to the noise
  token by the sinusoidal embedding of Vaswani et al. 2017 (Sec. 3.5) evaluated at
  ``time_scale * c_noise``, followed (``time_mlp=True``) by a two-layer SiLU MLP.  The default
  ``time_scale = 1000`` spreads EDM's ``c_noise`` range [ln(0.002)/4, ln(80)/4] = [-1.55, 1.10]
  over ~2650 units, the scale of DDPM's 1000 integer timesteps for which the embedding's
  frequencies (1 ... 1e-4) were designed; use ``time_scale = 1`` with VP/iDDPM preconditioning,
  whose ``c_noise`` already is a timestep in [0, 999].
* Class conditioning (``num_classes > 0``) embeds ``num_classes + 1`` labels: the real classes
  and one learned null class at index ``null_label`` (default ``num_classes``) used by label
  dropout and classifier-free guidance (:mod:`latentdiff.guidance`).
* The published parameter counts (U-ViT-M 131M, U-ViT-L 287M, Table 1 of the paper) are
  reproduced by ``time_mlp=False`` (the released ImageNet configs use ``mlp_time_embed=False``)
  with ``num_classes=1000`` (1001 label rows incl. the null class), patch 2 on 32x32x4 latents;
  the default ``time_mlp=True`` adds ``time_freq_dim * width + width**2 + 2 width`` parameters
  (+0.6% for M, +0.5% for L).  See ``tests/test_models.py::test_paper_parameter_counts``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import einops
import torch
import torch.utils.checkpoint
from timm.layers import Attention, Mlp, trunc_normal_
from torch import nn

from latentdiff.utils.errors import ConfigError
from latentdiff.diffusion.guidance import resolve_null_label
from latentdiff.models.common import DenoiserNetMixin

__all__ = ["UViTConfig", "UViT", "sinusoidal_embedding"]


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (B,) float tensor (Vaswani et al. 2017, Sec. 3.5).

    ``[cos(t f_0), ..., cos(t f_{h-1}), sin(t f_0), ..., sin(t f_{h-1})]`` with
    ``f_i = max_period^(-i/h)``, ``h = dim // 2`` (the DDPM/ADM layout); an odd ``dim`` gets a
    trailing zero.  Computed in float32 (float64 for float64 input) whatever the model dtype.
    """
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"U-ViT config field {field!r}: {message}")


@dataclass(frozen=True)
class UViTConfig:
    """Every hyper-parameter of a :class:`UViT`; JSON-serializable through ``dataclasses.asdict``."""

    in_channels: int
    resolution: int
    num_classes: int = 0
    null_label: int | None = None  # None -> num_classes
    patch_size: int = 2
    width: int = 512
    depth: int = 13  # in + mid + out blocks, odd
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    time_mlp: bool = True
    time_freq_dim: int = 256
    time_scale: float = 1000.0
    final_conv: bool = True
    grad_checkpointing: bool = False

    def __post_init__(self):
        for f in ("in_channels", "resolution", "patch_size", "width", "depth", "num_heads", "time_freq_dim"):
            v = getattr(self, f)
            _require(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, f"must be a positive integer, got {v!r}")
        object.__setattr__(self, "null_label", resolve_null_label(self.num_classes, self.null_label, "U-ViT"))
        _require(self.depth % 2 == 1, "depth", f"counts in + mid + out blocks and must be odd, got {self.depth}")
        _require(
            self.resolution % self.patch_size == 0,
            "patch_size",
            f"{self.patch_size} does not divide resolution {self.resolution}; choose a divisor",
        )
        _require(
            self.width % self.num_heads == 0,
            "num_heads",
            f"{self.num_heads} does not divide width {self.width}; choose a divisor",
        )
        _require(self.mlp_ratio > 0, "mlp_ratio", f"must be > 0, got {self.mlp_ratio!r}")
        _require(
            isinstance(self.time_scale, (int, float)) and math.isfinite(self.time_scale) and self.time_scale > 0,
            "time_scale",
            f"must be a positive finite number (1000 for EDM c_noise, 1 for VP/iDDPM), got {self.time_scale!r}",
        )
        for f in ("qkv_bias", "time_mlp", "final_conv", "grad_checkpointing"):
            _require(isinstance(getattr(self, f), bool), f, f"must be true or false, got {getattr(self, f)!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Attention`` with fused SDPA + timm ``Mlp``), optionally
    preceded by the long-skip fusion ``Linear(concat(h, skip))`` (U-ViT Sec. 3.1)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(DenoiserNetMixin, nn.Module):
    """U-ViT network ``F(x, c_noise, labels)``; ``x`` is (B, in_channels, resolution, resolution)."""

    arch = "uvit"

    def __init__(self, config: UViTConfig, name: str = "uvit"):
        super().__init__()
        self.cfg = config
        self.name = name
        c, d = config, config.width
        self.grid = c.resolution // c.patch_size
        self.patch_dim = c.patch_size**2 * c.in_channels
        self.extras = 2 if c.num_classes > 0 else 1  # noise token (+ class token)

        self.patch_embed = nn.Linear(self.patch_dim, d)
        if c.time_mlp:
            self.time_embed = nn.Sequential(nn.Linear(c.time_freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        else:
            self.time_embed = nn.Identity()
        self.label_emb = nn.Embedding(c.num_classes + 1, d) if c.num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.grid**2, d))

        k = c.depth // 2
        self.in_blocks = nn.ModuleList([self._block(skip=False) for _ in range(k)])
        self.mid_block = self._block(skip=False)
        self.out_blocks = nn.ModuleList([self._block(skip=True) for _ in range(k)])
        self.norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, self.patch_dim)
        self.final_layer = (
            nn.Conv2d(c.in_channels, c.in_channels, 3, padding=1) if c.final_conv else nn.Identity()
        )
        self.grad_checkpointing = c.grad_checkpointing
        self.reset_parameters()

    def _block(self, skip: bool) -> Block:
        c = self.cfg
        return Block(c.width, c.num_heads, c.mlp_ratio, c.qkv_bias, skip)

    # ------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """U-ViT initialization: truncated normal (std 0.02) for the transformer's linear layers and
        the position embedding, zero biases, unit LayerNorm.  The patch embedding (a strided conv in
        U-ViT, a linear map on einops patches here: the same function), the label embedding and the
        final conv keep PyTorch's default initialization, as in U-ViT."""
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.patch_embed:
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = bool(enabled)

    # ------------------------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, c_noise: torch.Tensor, labels) -> None:
        c = self.cfg
        want = (c.in_channels, c.resolution, c.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"{self.name}: expected x of shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        if c_noise.shape != (x.shape[0],):
            raise ValueError(f"{self.name}: c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}")
        self._check_labels(x, labels)

    def _run(self, blk: Block, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, skip, use_reentrant=False)
        return blk(x, skip)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c_noise = torch.as_tensor(c_noise, device=x.device).reshape(-1)
        self._check_inputs(x, c_noise, labels)
        c, dtype = self.cfg, self.pos_embed.dtype
        p = c.patch_size
        tokens = self.patch_embed(einops.rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p))
        freq_dim = c.time_freq_dim if c.time_mlp else c.width
        t = self.time_embed(sinusoidal_embedding(c.time_scale * c_noise, freq_dim).to(dtype))
        extra = [t[:, None]]
        if self.label_emb is not None:
            extra.insert(0, self.label_emb(labels)[:, None])
        h = torch.cat([*extra, tokens], dim=1) + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            h = self._run(blk, h, None)
            skips.append(h)
        h = self._run(self.mid_block, h, None)
        for blk in self.out_blocks:
            h = self._run(blk, h, skips.pop())

        out = self.decoder_pred(self.norm(h))[:, self.extras :]
        out = einops.rearrange(out, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=self.grid, p1=p, p2=p)
        return self.final_layer(out)
