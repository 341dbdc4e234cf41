"""Reconstruction metrics and loss of the autoencoder trainer: SSIM, PSNR, L1 + SSIM + KL.

SSIM follows Wang et al. 2004 ("Image quality assessment: from error visibility to structural
similarity"), Eq. 13: ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``
on images mapped to [0, 1], with local statistics under an 11x11 Gaussian window of sigma 1.5 (Sec. III-C), ``C1 =
(0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L`` the data range, population (not sample) covariances, averaged over
the *valid* window positions and the channels (as ``skimage.metrics.structural_similarity`` with
``gaussian_weights=True, use_sample_covariance=False, channel_axis``).
PSNR = ``10 log10(L^2 / MSE)`` per image, then averaged over the images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gaussian_window", "psnr", "reconstruction_loss", "ssim"]

DATA_RANGE = 2.0  # images are in [-1, 1]


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """The normalized separable 1-D Gaussian of ``size`` taps."""
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # contiguous input and materialized weights: a permuted (channels-last) input with stride-0
    # expanded weights gives wrong depthwise convolutions on some CPU backends
    c = x.shape[1]
    x = F.conv2d(x.contiguous(), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (B,) of (B, C, H, W) images in [-1, 1] (Eq. 13 of Wang et al. 2004), in float32.

    SSIM is not invariant to a shift of the intensities (the luminance term uses the means), so the
    images are first mapped to [0, 1] (data range L = 1), the convention of the paper and of scikit-image.
    """
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    data_range = 1.0
    if min(x.shape[-2:]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {tuple(x.shape[-2:])}")
    g = gaussian_window(size, sigma, device=x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _blur(x, g), _blur(y, g)
    sxx = _blur(x * x, g) - mx * mx
    syy = _blur(y * y, g) - my * my
    sxy = _blur(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-image PSNR in dB (B,): ``10 log10(L^2 / MSE)``."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return 10 * torch.log10(torch.as_tensor(data_range**2, device=mse.device) / mse)


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kl: torch.Tensor, *, ssim_weight: float,
                        kl_weight: float) -> tuple[torch.Tensor, dict]:
    """``L1 + w_s (1 - SSIM) + w_kl KL`` and its parts.

    ``kl`` is the per-sample KL of the diagonal Gaussian posterior to N(0, I), summed over the latent
    elements (Kingma & Welling 2014, Appendix B: ``0.5 sum(mu^2 + s^2 - 1 - log s^2)``); it is averaged
    over the batch here.
    """
    l1 = (recon.float() - x.float()).abs().mean()
    s = ssim(recon, x).mean()
    kl_mean = kl.float().mean()
    loss = l1 + ssim_weight * (1 - s) + kl_weight * kl_mean
    parts = {"l1": float(l1.detach()), "ssim": float(s.detach()), "kl": float(kl_mean.detach())}
    if not math.isfinite(float(loss.detach())):
        parts["nonfinite"] = True
    return loss, parts
