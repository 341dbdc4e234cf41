"""Corruptions of uint8 photo crops (N, 3, H, W) for the quality-metric tests, each with a strength 0 = identity.

* ``blur``: Gaussian blur of standard deviation ``s`` pixels (separable, reflect boundaries);
* ``noise``: additive Gaussian noise of standard deviation ``s`` grey levels (fixed seed);
* ``jpeg``: JPEG-like quantization - the orthonormal 8x8 block DCT-II of every channel, coefficient
  ``(u, v)`` rounded to a multiple of ``s * (1 + u + v)`` (coarser for higher frequencies, like the JPEG
  tables), inverse DCT;
* ``hue``: colour shift ``(1 - s) x + s x[G, B, R]`` (a blend with the channel-rotated image);
* ``offset``: a global colour cast ``+s`` on R, ``-s`` on B;
* ``collapse``: the first ``round(s * N)`` images replaced by image 0 (mode collapse; ``s = 1``: one image).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def blur(img: torch.Tensor, s: float) -> torch.Tensor:
    if s == 0:
        return img.clone()
    r = int(math.ceil(3 * s))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-t**2 / (2 * s * s))
    k /= k.sum()
    b, c, h, w = img.shape
    y = F.pad(img.double().reshape(b * c, 1, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return _u8(y.reshape(b, c, h, w))


def noise(img: torch.Tensor, s: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return _u8(img.double() + s * torch.randn(img.shape, generator=g, dtype=torch.float64))


def _dct_matrix(n: int = 8) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m  # orthonormal DCT-II: rows are the basis vectors


def jpeg(img: torch.Tensor, s: float) -> torch.Tensor:
    if s == 0:
        return img.clone()
    b, c, h, w = img.shape
    d = _dct_matrix()
    x = img.double().reshape(b, c, h // 8, 8, w // 8, 8).transpose(3, 4)  # (..., 8, 8) blocks
    coef = d @ x @ d.T
    u = torch.arange(8, dtype=torch.float64)
    step = s * (1 + u[:, None] + u[None, :])
    back = d.T @ ((coef / step).round() * step) @ d
    return _u8(back.transpose(3, 4).reshape(b, c, h, w))


def hue(img: torch.Tensor, s: float) -> torch.Tensor:
    x = img.double()
    return _u8((1 - s) * x + s * x[:, [1, 2, 0]])


def offset(img: torch.Tensor, s: float) -> torch.Tensor:
    return _u8(img.double() + torch.tensor([s, 0.0, -s], dtype=torch.float64).view(1, 3, 1, 1))


def collapse(img: torch.Tensor, s: float) -> torch.Tensor:
    out = img.clone()
    out[: int(round(s * len(img)))] = img[0]
    return out


# the strength ladders the tests walk (each step is a clearly stronger corruption)
LADDERS = {
    "blur": (blur, (0.0, 1.0, 2.0, 4.0)),
    "noise": (noise, (0.0, 8.0, 24.0, 64.0)),
    "jpeg": (jpeg, (0.0, 4.0, 12.0, 32.0)),
    "hue": (hue, (0.0, 0.15, 0.4, 1.0)),
    "collapse": (collapse, (0.0, 0.3, 0.6, 1.0)),
}
