"""Denoiser backbones by name: U-ViT (``uvit.py``) and a DDPM++-like diffusers U-Net (``unet.py``).

``build(name, in_channels=..., resolution=..., num_classes=..., **overrides)`` returns a network
``F(x, c_noise, labels)`` for :class:`latentdiff.precond.Precond`.  Every model carries
``model.config``, a JSON-serializable dict holding the registry name, the architecture and every
hyper-parameter; :func:`from_config` / :func:`to_json` / :func:`from_json` rebuild it exactly (the
export stores it as ``model.json`` next to the weights).

Named sizes (U-ViT: Bao et al. 2023, Table 1; depth counts in + mid + out blocks, MLP ratio 4,
patch 2 unless overridden):

=============  =====  =====  =====
name           depth  width  heads
=============  =====  =====  =====
uvit-s          13     512     8
uvit-s-deep     17     512     8
uvit-m          17     768    12
uvit-l          21    1024    16
uvit-h          29    1152    16
uvit-tiny        5      64     4
unet            DDPM++-like preset for resolution 32 or 64
unet-tiny       two levels (32, 64 channels), one block per level
=============  =====  =====  =====
"""
from __future__ import annotations

import json
from typing import Callable

from torch import nn

from latentdiff.utils.errors import ConfigError
from latentdiff.models.unet import UNet, UNetConfig, ddpmpp_preset, tiny_preset
from latentdiff.models.uvit import UViT, UViTConfig

__all__ = ["MODEL_NAMES", "build", "from_config", "to_json", "from_json", "UViT", "UViTConfig", "UNet", "UNetConfig"]

_ARCHS = {"uvit": (UViT, UViTConfig), "unet": (UNet, UNetConfig)}


def _uvit(depth: int, width: int, heads: int) -> Callable[[int], dict]:
    return lambda resolution: dict(depth=depth, width=width, num_heads=heads)


# name -> (arch, preset(resolution) -> default fields)
_PRESETS: dict[str, tuple[str, Callable[[int], dict]]] = {
    "uvit-s": ("uvit", _uvit(13, 512, 8)),
    "uvit-s-deep": ("uvit", _uvit(17, 512, 8)),
    "uvit-m": ("uvit", _uvit(17, 768, 12)),
    "uvit-l": ("uvit", _uvit(21, 1024, 16)),
    "uvit-h": ("uvit", _uvit(29, 1152, 16)),
    "uvit-tiny": ("uvit", lambda resolution: dict(depth=5, width=64, num_heads=4, time_freq_dim=64)),
    "unet": ("unet", ddpmpp_preset),
    "unet-tiny": ("unet", tiny_preset),
}
MODEL_NAMES = tuple(_PRESETS)


def _check_name(name) -> str:
    if name not in _PRESETS:
        raise ConfigError(f"model name {name!r} is unknown; valid choices: {', '.join(MODEL_NAMES)}")
    return _PRESETS[name][0]


def _make(arch: str, name: str, values: dict) -> nn.Module:
    model_cls, config_cls = _ARCHS[arch]
    valid = config_cls.field_names()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"model {name!r} ({arch}) has no field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}"
        )
    try:
        config = config_cls(**values)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"model {name!r}: {e}; valid fields: {', '.join(valid)}") from None
    return model_cls(config, name=name)


def build(name: str, *, in_channels: int, resolution: int, num_classes: int = 0, **overrides) -> nn.Module:
    """Build the named backbone for (in_channels, resolution, resolution) inputs.

    ``overrides`` replace fields of the preset (e.g. ``width=64``, ``patch_size=4``,
    ``grad_checkpointing=True``, ``block_out_channels=(64, 128)``); unknown names or fields and
    invalid values raise :class:`ConfigError` naming the field and the valid choices.
    """
    arch = _check_name(name)
    values = dict(in_channels=in_channels, resolution=resolution, num_classes=num_classes)
    try:
        values.update(_PRESETS[name][1](resolution))
    except ConfigError:
        if "block_out_channels" not in overrides:  # no preset for this resolution and no custom levels
            raise
    values.update(overrides)
    return _make(arch, name, values)


def from_config(config: dict) -> nn.Module:
    """Rebuild a model from ``model.config`` (freshly initialized; load its state_dict separately)."""
    if not isinstance(config, dict):
        raise ConfigError(f"a model config must be a dict (model.config / model.json), got {type(config).__name__}")
    values = dict(config)
    name, arch = values.pop("name", None), values.pop("arch", None)
    expected = _check_name(name)
    if arch != expected:
        raise ConfigError(f"model config: 'arch' is {arch!r} but model {name!r} is a {expected!r}; fix the 'arch' field")
    return _make(arch, name, values)


def to_json(model: nn.Module, **json_kwargs) -> str:
    """``model.config`` as JSON text (sorted keys)."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "arch" not in config:
        raise ConfigError(f"{type(model).__name__} carries no latentdiff model config; build it with latentdiff.models.build")
    return json.dumps(config, sort_keys=True, **json_kwargs)


def from_json(text: str) -> nn.Module:
    """Inverse of :func:`to_json`."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.json is not valid JSON: {e}") from None
    return from_config(config)
