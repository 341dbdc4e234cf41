"""The VAE wrapper: a diffusers ``AutoencoderKL`` (hub id or local path) or the identity for pixel space.

Autoencoder
-----------
:class:`Autoencoder` wraps a diffusers ``AutoencoderKL`` loaded from a Hugging Face hub id (default
``stabilityai/sd-vae-ft-ema``) or a local directory (``save_pretrained`` layout: ``config.json`` +
``diffusion_pytorch_model.safetensors``, or a pipeline folder with a ``vae/`` subfolder), or is the
identity for pixel-space training (``"none"``).

* Images are (B, 3, H, W) in **[-1, 1]**.  ``encode`` returns the posterior ``(mean, std)`` in *raw*
  VAE space (no scaling/shift applied), float32.  ``decode`` maps raw latents back to images.
* The VAE runs in fp32 **outside autocast** (fp16 VAEs produce NaN/Inf on large images).
  A lower precision (``bf16``/``fp16``) is only used after :meth:`Autoencoder.validate_precision`
  compared it with fp32 on real images; the encoder does that on its first batch.
* Every encode and decode runs on the **whole image, whole batch**: tiling and slicing are switched
  off on the diffusers object before each call, even if a caller switched them on (tiled decoding
  changes the images and the FID).
* A hub id is loaded with ``local_files_only=True`` when ``HF_HUB_OFFLINE=1`` (or ``offline=True``);
  when it cannot be loaded, :class:`~latentdiff.utils.errors.EncodeError` says how to pass a local path.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from latentdiff.utils.errors import EncodeError
from latentdiff.utils.io import sha256_file

__all__ = [
    "DEFAULT_VAE",
    "PIXEL_RANGE",
    "PRECISIONS",
    "Autoencoder",
]

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
PIXEL_RANGE = (-1.0, 1.0)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _resolve_local_dir(path: Path) -> Path:
    """A ``save_pretrained`` folder, or a pipeline folder holding ``vae/``."""
    if (path / "config.json").is_file():
        return path
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    raise EncodeError(
        f"--vae {str(path)!r}: the directory has no config.json (nor vae/config.json); pass the folder "
        "written by AutoencoderKL.save_pretrained(), a diffusers pipeline folder, a hub id, or 'none'"
    )


def _autoencoder_kl():
    # diffusers is imported only when a VAE is loaded: it takes seconds, and pixel space needs none
    from diffusers import AutoencoderKL

    return AutoencoderKL


def _load_local(spec: str, path: Path):
    """(AutoencoderKL, its folder, its weights file) from a ``save_pretrained`` or pipeline folder."""
    if not path.is_dir():
        raise EncodeError(f"--vae {spec!r} is a file; pass the directory that holds config.json and the weights")
    local = _resolve_local_dir(path.resolve())
    weights = next((local / w for w in _WEIGHT_FILES if (local / w).is_file()), None)
    if weights is None:
        raise EncodeError(
            f"--vae {spec!r}: no weights in {local} (expected {' or '.join(_WEIGHT_FILES)}); "
            "re-save the model with save_pretrained()"
        )
    try:
        vae = _autoencoder_kl().from_pretrained(
            str(local), torch_dtype=torch.float32, local_files_only=True, low_cpu_mem_usage=False
        )
    except Exception as exn:  # noqa: BLE001 - any loader failure becomes one clear message
        raise EncodeError(f"--vae {spec!r}: cannot load an AutoencoderKL from {local}: {exn}") from exn
    return vae, local, weights


def _from_hub(spec: str, revision: str | None, local_only: bool):
    kl = _autoencoder_kl()
    _, commit = kl.load_config(
        spec, revision=revision, local_files_only=local_only, return_unused_kwargs=False, return_commit_hash=True
    )
    vae = kl.from_pretrained(
        spec, revision=revision, torch_dtype=torch.float32, local_files_only=local_only, low_cpu_mem_usage=False
    )
    return vae, commit


def _load_hub(spec: str, revision: str | None, offline: bool):
    """(AutoencoderKL, commit hash) of a hub id: the local cache first, then the hub unless ``offline``."""
    try:
        try:  # the local cache first: instant, and no network round trip when the model is there
            return _from_hub(spec, revision, True)
        except Exception:  # noqa: BLE001
            if offline:
                raise
            return _from_hub(spec, revision, False)
    except Exception as exn:  # noqa: BLE001
        how = (
            "HF_HUB_OFFLINE=1 is set and the model is not in the local Hugging Face cache"
            if offline
            else "the hub could not be reached or the id/revision does not exist"
        )
        raise EncodeError(
            f"--vae {spec!r}: cannot load the VAE ({how}: {type(exn).__name__}: {str(exn)[:200]}). "
            f"Download it on a machine with network access (AutoencoderKL.from_pretrained('{spec}')"
            ".save_pretrained('/path/vae')) and pass --vae /path/vae, or use --vae none for pixel space"
        ) from exn


class Autoencoder:
    """VAE (or identity) with fp32-by-default encode/decode and a manifest description.

    Use :meth:`Autoencoder.load` to build one from a spec string.
    """

    def __init__(
        self,
        vae: Any | None,
        *,
        spec: str = "none",
        source: str = "none",
        revision: str | None = None,
        weights_sha256: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.vae = vae
        self.spec = spec
        self.source = source
        self.revision = revision
        self.weights_sha256 = weights_sha256
        self.precision = "fp32"
        self._low = None  # reduced-precision copy, only after validate_precision
        self._decoded_in: str | None = None  # the precision of the last decode
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if vae is not None:
            vae.train(False).requires_grad_(False)
            if any(p.dtype != torch.float32 for p in vae.parameters()):
                vae.float()
            vae.to(self.device)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        spec: str = DEFAULT_VAE,
        *,
        revision: str | None = None,
        device: torch.device | str | None = None,
        offline: bool | None = None,
    ) -> "Autoencoder":
        """``spec``: ``"none"`` (pixel space), a local directory, or a hub id ``org/name``."""
        if spec is None or str(spec).strip() == "":
            raise EncodeError("--vae is empty: pass a hub id (e.g. stabilityai/sd-vae-ft-ema), a local directory, or 'none'")
        spec = str(spec)
        if spec.lower() == "none":
            return cls(None, spec="none", source="none", device=device)
        path = Path(spec).expanduser()
        if path.exists():
            vae, local, weights = _load_local(spec, path)
            return cls(vae, spec=str(local), source="local", revision=revision,
                       weights_sha256=sha256_file(weights), device=device)
        if not _HUB_ID.match(spec):
            raise EncodeError(
                f"--vae {spec!r} is neither an existing directory nor a hub id of the form org/name; "
                "pass a local folder (AutoencoderKL.save_pretrained layout), a hub id, or 'none'"
            )
        vae, commit = _load_hub(spec, revision, _offline() if offline is None else offline)
        return cls(vae, spec=spec, source="hub", revision=commit or revision, device=device)

    # properties -------------------------------------------------------------------------------
    @property
    def is_pixel(self) -> bool:
        return self.vae is None

    @property
    def latent_channels(self) -> int:
        return 3 if self.vae is None else int(self.vae.config.latent_channels)

    @property
    def downsampling_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return 1.0 if self.vae is None else float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float | None:
        if self.vae is None:
            return None
        s = getattr(self.vae.config, "shift_factor", None)
        return None if s is None else float(s)

    @property
    def decode_precision(self) -> str:
        """The precision of the most recent :meth:`decode` (before the first one: the default precision)."""
        return self._decoded_in or self.precision

    @property
    def tiling(self) -> bool:
        """Does the diffusers VAE have tiling or slicing switched on now?  Every encode and decode switches
        both off before it runs, so after a decode this is False."""
        return any(bool(getattr(m, flag, False)) for m in (self.vae, self._low) if m is not None
                   for flag in ("use_tiling", "use_slicing"))

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        f = self.downsampling_factor
        if resolution % f:
            raise EncodeError(
                f"--resolution {resolution} is not divisible by the VAE downsampling factor {f}; "
                f"use a multiple of {f} (e.g. {max(f, resolution // f * f)})"
            )
        return (self.latent_channels, resolution // f, resolution // f)

    def description(self) -> dict:
        """What the manifest records: enough to reload the same VAE and undo its scaling."""
        if self.vae is None:
            return {
                "kind": "none", "id": "none", "source": "none", "revision": None, "weights_sha256": None,
                "scaling_factor": 1.0, "shift_factor": None, "latent_channels": 3, "downsampling_factor": 1,
                "in_pixel_range": list(PIXEL_RANGE),
            }
        cfg = self.vae.config
        return {
            "kind": "AutoencoderKL",
            "id": self.spec,
            "source": self.source,
            "revision": self.revision,
            "weights_sha256": self.weights_sha256,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent_channels": self.latent_channels,
            "downsampling_factor": self.downsampling_factor,
            "in_pixel_range": list(PIXEL_RANGE),
            "config": {
                "block_out_channels": list(cfg.block_out_channels),
                "layers_per_block": int(cfg.layers_per_block),
                "sample_size": cfg.sample_size if isinstance(cfg.sample_size, int) else list(cfg.sample_size),
                "force_upcast": bool(getattr(cfg, "force_upcast", True)),
            },
        }

    # compute ----------------------------------------------------------------------------------
    def to(self, device) -> "Autoencoder":
        self.device = torch.device(device)
        if self.vae is not None:
            self.vae.to(self.device)
        if self._low is not None:
            self._low.to(self.device)
        return self

    def _no_autocast(self):
        # The VAE runs in its own precision whatever autocast context the caller is in.
        try:
            return torch.autocast(device_type=self.device.type, enabled=False)
        except RuntimeError:
            return contextlib.nullcontext()

    def _whole_image(self) -> None:
        """No tiled or sliced encode/decode (diffusers' switches, on every model we run)."""
        for model in (self.vae, self._low):
            for name in ("disable_tiling", "disable_slicing"):
                fn = getattr(model, name, None)
                if callable(fn):
                    fn()

    def _model(self, precision: str | None):
        p = self.precision if precision is None else precision
        if p == "fp32":
            return self.vae, torch.float32
        if self._low is None or p != self.precision:
            raise EncodeError(
                f"precision {p!r} was not validated for this VAE; call validate_precision() first or use fp32"
            )
        return self._low, PRECISIONS[p]

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] (B, 3, H, W) -> posterior (mean, std), raw VAE space, float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if self.vae is None:
            return x.clone(), torch.zeros_like(x)
        model, dtype = self._model(precision)
        self._whole_image()
        with self._no_autocast():
            dist = model.encode(x.to(dtype)).latent_dist
            mean = dist.mean.float()
            std = dist.std.float()
        return mean, std

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """Raw latents (B, C, h, w) -> images (B, 3, H, W), nominally in [-1, 1] (not clamped), float32."""
        z = latents.to(self.device, torch.float32)
        if self.vae is None:
            self._decoded_in = "fp32"
            return z.clone()
        model, dtype = self._model(precision)
        self._decoded_in = self.precision if precision is None else precision
        self._whole_image()
        with self._no_autocast():
            return model.decode(z.to(dtype)).sample.float()

    def validate_precision(self, precision: str, images: torch.Tensor, rtol: float = 0.02) -> dict:
        """Allow ``bf16``/``fp16`` only if it matches fp32 on ``images`` (no NaN/Inf, small error).

        The error is ``max|mean_low - mean_fp32| / std(mean_fp32)``; raises :class:`EncodeError` when
        it exceeds ``rtol`` or anything is non-finite.  Returns the measured numbers.
        """
        if precision not in PRECISIONS:
            raise EncodeError(f"--vae-precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if precision == "fp32" or self.vae is None:
            self.precision = "fp32"
            return {"precision": "fp32", "max_rel_error": 0.0}
        low = copy.deepcopy(self.vae).to(self.device)
        low.to(PRECISIONS[precision])
        ref_m, ref_s = self.encode(images, precision="fp32")
        with torch.inference_mode(), self._no_autocast():
            d = low.encode(images.to(self.device, PRECISIONS[precision])).latent_dist
            m, s = d.mean.float(), d.std.float()
        finite = bool(torch.isfinite(m).all() and torch.isfinite(s).all())
        err = float((m - ref_m).abs().max() / ref_m.std().clamp_min(1e-12)) if finite else math.inf
        if not finite or err > rtol:
            raise EncodeError(
                f"--vae-precision {precision}: the VAE is not accurate in {precision} on this data "
                f"(finite={finite}, max error {err:.3g} x latent std > {rtol}); use --vae-precision fp32"
            )
        self._low = low
        self.precision = precision
        return {"precision": precision, "max_rel_error": err}
