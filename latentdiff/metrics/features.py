"""Pluggable feature extractors for KID and precision/recall: pixels, wavelet packets, Inception.

Every extractor maps uint8 RGB images ``(B, 3, H, W)`` to float64 features ``(B, D)`` and
describes itself (``describe()``, copied into every result computed on its features):

* ``pixels`` - the image in ``[0, 1]``, area-averaged (``adaptive_avg_pool2d``) to at most
  ``size x size`` (32) so that ``D = 3 * 32 * 32`` stays small at any resolution; no network.
* ``wavelet`` - the log energy of every Haar packet of every channel at level ``L``
  (:mod:`latentdiff.metrics.wavelets`, images in ``[0, 1]``):
  ``phi_{p,c} = log(mean_{i,j} w_{p,c,i,j}^2 + eps) / log(1 / eps)`` with ``eps = 1e-10`` (the
  division maps energies in ``[eps, 1]`` to ``[-1, 0]``, the scale the cubic KID kernel
  ``(x . y / D + 1)^3`` expects), ``D = 3 * 4**L``; a spectrum descriptor
  that sees blur (less high-frequency energy), noise and quantization (more), colour (the ``a...a``
  packet); no network.
* ``inception`` - torch-fidelity's 2048-d Inception pool features (weights needed: the FID path).

Pixel and wavelet features measure low-level statistics; their numbers are not comparable with
published Inception-based KID or precision/recall.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from latentdiff.metrics.wavelets import haar_packets, max_packet_level
from latentdiff.utils.errors import FIDError

__all__ = ["PixelFeatures", "WaveletFeatures", "InceptionFeatureSet", "FEATURE_KINDS", "check_uint8"]

FEATURE_KINDS = ("pixels", "wavelet", "inception")
LOG_EPS = 1e-10


def check_uint8(images) -> torch.Tensor:
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise FIDError(f"feature extractors take uint8 RGB images (B, 3, H, W), got {got}")
    return images


class PixelFeatures:
    name = "pixels"

    def __init__(self, size: int = 32):
        if size < 1:
            raise FIDError(f"pixel features: size must be >= 1, got {size}")
        self.size = int(size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = check_uint8(images).to(torch.float64) / 255.0
        h, w = x.shape[2:]
        if h > self.size or w > self.size:
            x = F.adaptive_avg_pool2d(x, (min(h, self.size), min(w, self.size)))
        return x.reshape(x.shape[0], -1)

    def describe(self) -> dict:
        return {"name": self.name, "definition": f"uint8 / 255, area-averaged to at most {self.size}x{self.size}, "
                "flattened (C, H, W)", "size": self.size}


class WaveletFeatures:
    name = "wavelet"

    def __init__(self, level: int = 4):
        self.level = int(level)

    def level_for(self, h: int, w: int) -> int:
        return min(self.level, max_packet_level(h, w))

    def from_packets(self, packets: torch.Tensor) -> torch.Tensor:
        """Features from already computed packets ``(B, P, C, h, w)`` (the FWD pass reuses its transform)."""
        energy = packets.square().mean(dim=(-2, -1))
        return (torch.log(energy + LOG_EPS) / math.log(1.0 / LOG_EPS)).reshape(packets.shape[0], -1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = check_uint8(images).to(torch.float64) / 255.0
        return self.from_packets(haar_packets(x, self.level_for(*x.shape[2:])))

    def describe(self) -> dict:
        return {"name": self.name, "definition": "log(mean of squared Haar packet coefficients + 1e-10) / log(1e10) "
                "per packet and channel of uint8 / 255 images", "wavelet": "haar", "level": self.level}


class InceptionFeatureSet:
    """The FID Inception extractor (:class:`latentdiff.metrics.inception.InceptionFeatures`) as float64."""

    name = "inception"

    def __init__(self, extractor):
        self.extractor = extractor

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(check_uint8(images)).to("cpu", torch.float64)

    def describe(self) -> dict:
        d = self.extractor.describe() if hasattr(self.extractor, "describe") else {"name": repr(self.extractor)}
        return {"name": self.name, "network": d}

    @property
    def official(self) -> bool:
        return bool(getattr(self.extractor, "official", False))
