"""The raw <-> model-space latent normalization (a per-channel affine map and its exact inverse).

The diffusion model never sees raw latents: ``model = (raw - shift) * scale`` per channel, with the
exact inverse ``raw = model / scale + shift`` applied before decoding.  Two recipes:

* ``sd``: ``shift = shift_factor or 0``, ``scale = scaling_factor`` from the VAE config (Stable
  Diffusion).  **Every** ``AutoencoderKL`` reports ``scaling_factor = 0.18215`` unless its config says
  otherwise -- that constant was fitted to the SD VAE only.  For any other VAE use ``channel``.
  In pixel space ``sd`` is the identity.
* ``channel`` (EDM2 style): ``shift = mean_c``, ``scale = sigma_target / std_c`` from the dataset
  statistics (``stats.json``; ``std_c`` is the std of the *sampled* latents ``mean + std * eps``, which
  is what the model is trained on), so every channel has mean 0 and std ``sigma_target`` (0.5 default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["Normalization"]


def _floats(name: str, values) -> tuple[float, ...]:
    if torch.is_tensor(values):
        values = values.detach().cpu().double().flatten().tolist()
    out = tuple(float(v) for v in values)
    if not out or not all(math.isfinite(v) for v in out):
        raise ValueError(f"Normalization.{name} must be a non-empty list of finite numbers, got {values!r}")
    return out


@dataclass(frozen=True)
class Normalization:
    """Per-channel affine map raw latent -> model space: ``model = (raw - shift) * scale``.

    ``raw = model / scale + shift`` is its exact inverse (apply it before ``Autoencoder.decode``).
    ``kind`` names the recipe (``sd``, ``channel`` or ``identity``); ``target_std`` is the std the
    recipe aims for in model space (checked against the dataset statistics when the data is loaded).
    """

    kind: str
    shift: tuple[float, ...]
    scale: tuple[float, ...]
    target_std: float = 1.0
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "shift", _floats("shift", self.shift))
        object.__setattr__(self, "scale", _floats("scale", self.scale))
        if len(self.shift) != len(self.scale):
            raise ValueError(f"Normalization: shift has {len(self.shift)} channels but scale has {len(self.scale)}")
        if any(s == 0 for s in self.scale):
            raise ValueError(f"Normalization: every scale must be non-zero, got {self.scale}")
        if not (math.isfinite(self.target_std) and self.target_std > 0):
            raise ValueError(f"Normalization.target_std must be > 0, got {self.target_std}")

    @property
    def channels(self) -> int:
        return len(self.scale)

    def _params(self, x: torch.Tensor):
        c = x.shape[-3] if x.ndim >= 3 else None
        if c != self.channels:
            raise ValueError(
                f"Normalization has {self.channels} channels but the tensor has shape {tuple(x.shape)} "
                "(channels are dimension -3)"
            )
        dtype = x.dtype if x.is_floating_point() else torch.float32
        shift = torch.tensor(self.shift, dtype=torch.float64).to(x.device, dtype).view(-1, 1, 1)
        scale = torch.tensor(self.scale, dtype=torch.float64).to(x.device, dtype).view(-1, 1, 1)
        return shift, scale

    def to_model(self, raw: torch.Tensor) -> torch.Tensor:
        shift, scale = self._params(raw)
        return (raw - shift) * scale

    def to_raw(self, model: torch.Tensor) -> torch.Tensor:
        shift, scale = self._params(model)
        return model / scale + shift

    # constructors -----------------------------------------------------------------------------
    @classmethod
    def identity(cls, channels: int) -> "Normalization":
        return cls("identity", (0.0,) * channels, (1.0,) * channels, 1.0)

    @classmethod
    def sd(cls, vae, channels: int | None = None) -> "Normalization":
        """``(shift_factor or 0, scaling_factor)`` from the VAE (an Autoencoder, its description, or "none").

        Pixel space gives the identity (kind ``sd`` with shift 0, scale 1).  Beware: AutoencoderKL
        reports 0.18215 for *any* VAE whose config does not set it; use :meth:`channel` for non-SD VAEs.
        """
        desc = vae.description() if hasattr(vae, "description") else vae
        if desc == "none" or (isinstance(desc, dict) and desc.get("kind") == "none"):
            c = 3 if channels is None else channels
            # pixels in [-1, 1]: identity; EDM's sigma_data = 0.5 is the expected std (edm.txt Table 1)
            return cls("sd", (0.0,) * c, (1.0,) * c, 0.5, {"vae": "none"})
        if not isinstance(desc, dict) or "scaling_factor" not in desc:
            raise ValueError(f"Normalization.sd needs a VAE description with scaling_factor, got {desc!r}")
        c = int(desc.get("latent_channels") or channels)
        shift = desc.get("shift_factor") or 0.0
        return cls("sd", (float(shift),) * c, (float(desc["scaling_factor"]),) * c, 1.0,
                   {"vae": desc.get("id"), "scaling_factor": desc["scaling_factor"], "shift_factor": desc.get("shift_factor")})

    @classmethod
    def channel(cls, stats, sigma_target: float = 0.5, *, std_field: str = "std") -> "Normalization":
        """EDM2 style: ``shift = mean_c``, ``scale = sigma_target / std_c`` from the dataset statistics.

        ``stats`` is a :class:`latentdiff.data.stats.DatasetStats` or its ``stats.json`` dict (fields
        ``mean``, ``std``, ``std_mean_only``).  ``std_field`` = ``"std"`` (sampled latents, default) or
        ``"std_mean_only"``.
        """
        d = stats.to_json() if hasattr(stats, "to_json") else stats
        if std_field not in ("std", "std_mean_only"):
            raise ValueError(f"std_field must be 'std' or 'std_mean_only', got {std_field!r}")
        mean = _floats("shift", d["mean"])
        std = _floats("scale", d[std_field])
        if any(s <= 0 for s in std):
            raise ValueError(f"stats field {std_field!r} has a non-positive channel std {std}; cannot normalize")
        return cls("channel", mean, tuple(sigma_target / s for s in std), float(sigma_target),
                   {"std_field": std_field, "n": d.get("n"), "shards_hash": d.get("shards_hash")})

    # (de)serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": self.kind, "shift": list(self.shift), "scale": list(self.scale),
                "target_std": self.target_std, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        missing = [k for k in ("kind", "shift", "scale") if k not in d]
        if missing:
            raise ValueError(f"normalization record lacks {missing}; expected kind/shift/scale (see Normalization.to_dict)")
        return cls(str(d["kind"]), d["shift"], d["scale"], float(d.get("target_std", 1.0)), dict(d.get("meta") or {}))

    def normalized_moments(self, mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
        """Per-channel (mean, std) in model space of data with raw per-channel ``mean``/``std``."""
        m = [(float(mu) - s) * k for mu, s, k in zip(mean, self.shift, self.scale)]
        sd = [float(sg) * abs(k) for sg, k in zip(std, self.scale)]
        return m, sd
