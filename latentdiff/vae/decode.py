"""From model-space latents to uint8 images: the exact inverse normalization, then the VAE the export names.

``raw = model / scale + shift`` (computed in float64), then an fp32 decode outside autocast on whole
images (no tiling, no slicing: enforced inside :class:`~latentdiff.vae.autoencoder.Autoencoder`),
then ``round((x + 1) * 127.5)``, the exact inverse of the encoder's ``p / 127.5 - 1``.
"""
from __future__ import annotations

import math

import torch

from latentdiff.utils.errors import SampleError
from latentdiff.vae.autoencoder import Autoencoder
from latentdiff.vae.normalization import Normalization

__all__ = ["is_pixel_vae", "load_vae_for", "to_uint8", "decode_to_uint8", "image_grid"]


def is_pixel_vae(vae_desc) -> bool:
    """Does the export describe a pixel-space model (no VAE)?"""
    return vae_desc == "none" or (isinstance(vae_desc, dict) and vae_desc.get("kind") == "none")


def load_vae_for(vae_desc, device="cpu", *, path=None):
    """The Autoencoder an export names (``path`` overrides where it is loaded from); refuses a VAE
    whose weights sha256, revision or scaling differ from what the export recorded."""
    if is_pixel_vae(vae_desc):
        if path is not None:
            raise SampleError(f"--vae {path}: this model is pixel-space (its export names no VAE)")
        return Autoencoder(None, device=device)
    if not isinstance(vae_desc, dict) or not vae_desc.get("id"):
        raise SampleError(f"the export's VAE description is incomplete: {vae_desc!r}; re-export the run")
    spec = str(path) if path is not None else vae_desc["id"]
    try:
        ae = Autoencoder.load(spec, revision=vae_desc.get("revision") if path is None else None, device=device)
    except Exception as e:  # noqa: BLE001 - one clear message
        raise SampleError(
            f"cannot load the VAE {spec!r} named in the export: {e}. Make it available at that path (or in the hub "
            "cache), or pass --vae DIR pointing at a copy of the same weights"
        ) from e
    want = vae_desc.get("weights_sha256")
    if want and ae.weights_sha256 != want:
        got = (ae.weights_sha256 or "unknown")[:12]
        raise SampleError(
            f"the VAE at {spec} has weights sha256 {got}... but the export was trained with {want[:12]}... "
            "(vae.weights_sha256): decoding with a different VAE gives wrong images; pass --vae with the right weights"
        )
    rev = vae_desc.get("revision")
    if path is None and rev and ae.revision and ae.revision != rev:
        raise SampleError(f"the VAE {spec} resolved to revision {ae.revision} but the export recorded {rev}")
    for k in ("scaling_factor", "shift_factor", "latent_channels", "downsampling_factor"):
        if k in vae_desc and getattr(ae, k) != vae_desc[k]:
            raise SampleError(f"the VAE's {k} is {getattr(ae, k)} but the export recorded vae.{k} = {vae_desc[k]}")
    return ae  # untiled, unsliced fp32 decode outside autocast: Autoencoder.decode


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 by round((x + 1) * 127.5), the exact inverse of the encoder's
    ``p / 127.5 - 1``; values outside [-1, 1] are clamped."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def decode_to_uint8(
    latents: torch.Tensor,
    normalization,
    vae_desc=None,
    *,
    device="cpu",
    autoencoder=None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Model-space latents -> uint8 NCHW images on the CPU.

    Exact inverse normalization ``raw = model / scale + shift`` (computed in float64), then an fp32,
    untiled VAE decode outside autocast.  ``batch_size``: decode in chunks of exactly this many latents
    (the last chunk padded with copies of its last latent), so the result does not depend on how many
    latents one call gets.
    """
    norm = normalization if isinstance(normalization, Normalization) else Normalization.from_dict(normalization)
    if latents.ndim != 4 or latents.shape[1] != norm.channels:
        raise SampleError(
            f"decode: latents of shape {tuple(latents.shape)} do not match the normalization's {norm.channels} channels"
        )
    ae = autoencoder if autoencoder is not None else load_vae_for(vae_desc, device)
    n = latents.shape[0]
    step = int(batch_size) if batch_size else max(n, 1)
    out = []
    for i in range(0, n, step):
        z = latents[i : i + step]
        k = z.shape[0]
        if k < step and batch_size:
            z = torch.cat([z, z[-1:].expand(step - k, *z.shape[1:])])
        raw = norm.to_raw(z.to(torch.float64)).to(torch.float32)
        img = raw if ae.is_pixel else ae.decode(raw.to(ae.device), precision="fp32")
        out.append(to_uint8(img[:k]).cpu())
    return torch.cat(out) if out else torch.zeros((0, 3, 0, 0), dtype=torch.uint8)


def image_grid(images: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> one (C, rows*H, cols*W) grid."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise SampleError(f"image_grid needs a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros((c, rows * h, cols * w), dtype=images.dtype)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i]
    return grid
