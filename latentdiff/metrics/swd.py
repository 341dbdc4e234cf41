"""Multi-scale sliced Wasserstein distance of ProGAN (Karras et al., "Progressive Growing of GANs for
Improved Quality, Stability, and Variation", ICLR 2018, Sec. 5 and Appendix D).

Per image (uint8 as float, 0..255):

1. a Laplacian pyramid (Burt & Adelson 1983) from the full resolution down to 16x16: ``G_0 = x``,
   ``G_{l+1} = down(G_l)``, ``L_l = G_l - up(G_{l+1})``, the last level is ``G``; ``down`` is the
   5x5 binomial filter ``[1 4 6 4 1]^T [1 4 6 4 1] / 256`` then every second pixel, ``up`` inserts
   zeros and filters with 4x that kernel (both with mirror boundaries: ``cv2.pyrDown``/``pyrUp``);
   levels: ``R, R/2, ...`` while ``>= 16``;
2. ``patches_per_image`` (128) random 7x7 neighbourhoods per level, centres uniform over the
   positions where the patch fits, drawn from ``numpy.random.default_rng([seed, image index])``
   so that they do not depend on how images are split over ranks;
3. per set and level, every descriptor component is normalized by the mean and standard deviation
   of its colour channel over all descriptors of that set (float64);
4. the sliced Wasserstein distance between the two sets' descriptors (Rabin et al. 2011):
   ``dir_repeats x dirs_per_repeat`` (4 x 128) random unit directions ``u`` (the same for both
   sets), the 1-D Wasserstein-1 distance between the projections ``<a, u>`` and ``<b, u>``
   ``W1 = integral |F_a(t) - F_b(t)| dt`` (for equal counts the mean of ``|sort(a) - sort(b)|``,
   ProGAN's formula; unequal counts are handled exactly by the CDF integral), averaged over
   directions;
5. reported ``x 1e3`` per level (``swd_x1e3_<R>``) and the mean over levels (``swd_x1e3_avg``).

At most ``max_images`` images per set (the first ones by index; ProGAN's 16384) contribute, since
every descriptor is kept in memory: ``max_images * 128 * 147 * 4`` bytes per level (1.2 GB at 16384).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from latentdiff.utils.errors import FIDError

__all__ = ["SWDSettings", "MIN_IMAGES", "pyramid_resolutions", "laplacian_pyramid", "patch_descriptors",
           "normalize_descriptors", "wasserstein1", "sliced_wasserstein", "swd_from_descriptors"]

MIN_IMAGES = 128  # 16384 descriptors per level of 147 components
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16.0


@dataclass(frozen=True)
class SWDSettings:
    patch_size: int = 7
    patches_per_image: int = 128
    dir_repeats: int = 4
    dirs_per_repeat: int = 128
    min_resolution: int = 16
    max_images: int = 16384
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def pyramid_resolutions(resolution, min_resolution: int = 16) -> list[tuple[int, int]]:
    """``[(H, W), (H/2, W/2), ...]`` while the short side is ``>= min_resolution`` (ProGAN)."""
    h, w = int(resolution[0]), int(resolution[1])
    if min(h, w) < min_resolution:
        raise FIDError(f"SWD needs images of at least {min_resolution}x{min_resolution}, got {h}x{w}")
    out = []
    while min(h, w) >= min_resolution:
        out.append((h, w))
        if h % 2 or w % 2:
            break
        h, w = h // 2, w // 2
    return out


def _blur(x: torch.Tensor, gain: float) -> torch.Tensor:
    """Separable 5x5 binomial filter (times ``gain``) with mirror boundaries, per channel."""
    b, c, h, w = x.shape
    k = _BINOMIAL.to(x.device, x.dtype)
    y = F.pad(x.reshape(b * c, 1, h, w), (2, 2, 2, 2), mode="reflect")
    y = F.conv2d(y, (k * gain).view(1, 1, 1, 5))
    y = F.conv2d(y, k.view(1, 1, 5, 1))
    return y.reshape(b, c, h, w)


def _down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x, 1.0)[:, :, ::2, ::2]


def _up(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    z = torch.zeros(b, c, 2 * h, 2 * w, dtype=x.dtype, device=x.device)
    z[:, :, ::2, ::2] = x
    return _blur(z, 4.0)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``levels`` Laplacian levels of float images ``(B, C, H, W)`` (step 1 of the module docstring)."""
    g = [x.to(torch.float64)]
    for _ in range(1, levels):
        g.append(_down(g[-1]))
    return [g[i] - _up(g[i + 1]) for i in range(levels - 1)] + [g[-1]]


def patch_positions(index: int, shapes: list[tuple[int, int]], s: SWDSettings) -> list[np.ndarray]:
    """Per level, the ``(K, 2)`` top-left corners of image ``index``'s patches (step 2)."""
    rng = np.random.default_rng([int(s.seed), int(index)])
    out = []
    for h, w in shapes:
        ys = rng.integers(0, h - s.patch_size + 1, size=s.patches_per_image)
        xs = rng.integers(0, w - s.patch_size + 1, size=s.patches_per_image)
        out.append(np.stack([ys, xs], 1))
    return out


def patch_descriptors(level: torch.Tensor, corners: np.ndarray, patch: int) -> torch.Tensor:
    """``level`` (B, C, h, w), ``corners`` (B, K, 2) -> float32 descriptors (B * K, C * patch**2)."""
    b, c = level.shape[:2]
    off = torch.arange(patch)
    cor = torch.as_tensor(corners, dtype=torch.int64)
    rows = (cor[..., 0:1] + off)[..., :, None]  # (B, K, p, 1)
    cols = (cor[..., 1:2] + off)[..., None, :]  # (B, K, 1, p)
    bi = torch.arange(b)[:, None, None, None]
    pts = level.permute(0, 2, 3, 1)[bi, rows, cols]  # (B, K, p, p, C)
    return pts.permute(0, 1, 4, 2, 3).reshape(b * cor.shape[1], c * patch * patch).to(torch.float32)


def normalize_descriptors(desc: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Step 3: per colour channel, zero mean and unit standard deviation over all descriptors (float64)."""
    d = desc.to(torch.float64).reshape(desc.shape[0], channels, -1)
    mean = d.mean(dim=(0, 2), keepdim=True)
    std = (d - mean).square().mean(dim=(0, 2), keepdim=True).sqrt()
    if not torch.all(std > 0):
        std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel stays 0 after centring
    return ((d - mean) / std).reshape(desc.shape[0], -1)


def wasserstein1(pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
    """Per row, the 1-D Wasserstein-1 distance between the empirical distributions of ``pa`` (k, n)
    and ``pb`` (k, m): ``integral |F_a - F_b| dt`` (exact for any n, m)."""
    a, _ = torch.sort(pa, dim=1)
    b, _ = torch.sort(pb, dim=1)
    if a.shape[1] == b.shape[1]:
        return (a - b).abs().mean(1)
    grid, _ = torch.sort(torch.cat([a, b], dim=1), dim=1)
    dx = grid[:, 1:] - grid[:, :-1]
    at = grid[:, :-1].contiguous()
    fa = torch.searchsorted(a, at, right=True).to(torch.float64) / a.shape[1]
    fb = torch.searchsorted(b, at, right=True).to(torch.float64) / b.shape[1]
    return ((fa - fb).abs() * dx).sum(1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, s: SWDSettings, stream: int) -> float:
    """Step 4 for normalized descriptors ``a`` (n, D), ``b`` (m, D); directions from ``[seed, stream]``."""
    ndir = s.dir_repeats * s.dirs_per_repeat
    rng = np.random.default_rng([int(s.seed), 1_000_003, int(stream)])
    dirs = torch.from_numpy(rng.standard_normal((ndir, a.shape[1])))
    dirs /= dirs.norm(dim=1, keepdim=True)
    step = max(1, min(ndir, (1 << 24) // max(1, a.shape[0] + b.shape[0])))
    total = 0.0
    for j in range(0, ndir, step):
        u = dirs[j : j + step]
        total += float(wasserstein1(u @ a.T, u @ b.T).sum())
    return total / ndir


def swd_from_descriptors(desc_g: list[torch.Tensor], desc_r: list[torch.Tensor], shapes, s: SWDSettings) -> dict:
    """Step 5: ``{"swd_x1e3_<H>": ..., "swd_x1e3_avg": ...}`` from per-level raw descriptors."""
    if len(desc_g) != len(desc_r):
        raise FIDError(f"SWD: {len(desc_g)} pyramid levels vs {len(desc_r)}; the two sets need one resolution")
    out = {}
    for lvl, (g, r) in enumerate(zip(desc_g, desc_r)):
        val = sliced_wasserstein(normalize_descriptors(g), normalize_descriptors(r), s, lvl)
        h, w = shapes[lvl]
        out[f"swd_x1e3_{h}" if h == w else f"swd_x1e3_{h}x{w}"] = 1e3 * val
    out["swd_x1e3_avg"] = float(np.mean(list(out.values())))
    return out
