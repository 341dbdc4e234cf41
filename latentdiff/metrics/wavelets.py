"""The 2-D Haar wavelet packet transform in torch (float64), the transform of FWD and the wavelet features.

One level splits every sub-band ``x`` (even height and width) into four orthonormal sub-bands built
from its 2x2 blocks ``[[x00, x01], [x10, x11]]``::

    a = (x00 + x01 + x10 + x11) / 2        (low-pass in both directions)
    h = (x00 + x01 - x10 - x11) / 2        (high-pass along the height)
    v = (x00 - x01 + x10 - x11) / 2        (high-pass along the width)
    d = (x00 - x01 - x10 + x11) / 2        (high-pass in both directions)

(the separable Haar filters ``[1, 1] / sqrt 2`` and ``[1, -1] / sqrt 2`` along both axes; Mallat,
*A Wavelet Tour of Signal Processing*, 3rd ed., Sec. 7.7.3 and 8.1, the 2-D wavelet packet).  A
packet transform to level ``L`` applies the split to *all* sub-bands ``L`` times, giving ``4**L``
packets of ``H / 2**L x W / 2**L`` coefficients, listed in the natural order (``a, h, v, d`` per
level, the first letter the outermost split) - the order of ``pywt.WaveletPacket2D`` /
``ptwt.WaveletPacket2D(..., "haar").get_natural_order(L)``.  The transform is orthonormal, so
``sum of squared coefficients == sum of squared pixels``; for Haar on even sizes no boundary mode
enters (the filters never leave the 2x2 block).  ``tests/test_quality_metrics.py`` checks every
packet against ``ptwt`` (up to the sign convention of the detail filters).
"""
from __future__ import annotations

import torch

__all__ = ["haar_split", "haar_packets", "max_packet_level", "packet_names"]


def haar_split(x: torch.Tensor) -> torch.Tensor:
    """``(..., H, W)`` with even H, W -> ``(..., 4, H/2, W/2)``: the sub-bands a, h, v, d (module docstring)."""
    x00, x01 = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    x10, x11 = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    s0, d0 = x00 + x01, x00 - x01
    s1, d1 = x10 + x11, x10 - x11
    return torch.stack([s0 + s1, s0 - s1, d0 + d1, d0 - d1], dim=-3) * 0.5


def max_packet_level(height: int, width: int) -> int:
    """The deepest level ``L`` with ``2**L`` dividing both sides (every packet at least 1x1)."""
    level = 0
    while height % 2 == 0 and width % 2 == 0 and height > 1 and width > 1:
        height, width, level = height // 2, width // 2, level + 1
    return level


def haar_packets(images: torch.Tensor, level: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, 4**level, C, H / 2**level, W / 2**level)`` float64, natural order.

    ``H`` and ``W`` must be divisible by ``2**level``; the input is converted to float64 first.
    """
    if images.ndim != 4:
        raise ValueError(f"haar_packets takes (B, C, H, W) images, got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if level < 0 or h % (1 << level) or w % (1 << level):
        raise ValueError(f"a level-{level} Haar packet transform needs sides divisible by {1 << level}, got {h}x{w}")
    x = images.to(torch.float64).reshape(b, 1, c, h, w)
    for _ in range(level):
        p, hh, ww = x.shape[1], x.shape[3], x.shape[4]
        x = haar_split(x)  # (B, P, C, 4, h/2, w/2): child index after the channel
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, 4 * p, c, hh // 2, ww // 2)  # parent-major, child-minor
    return x


def packet_names(level: int) -> list[str]:
    """The natural-order packet paths, e.g. level 2 -> ``["aa", "ah", ..., "dd"]``."""
    names = [""]
    for _ in range(level):
        names = [n + s for n in names for s in "ahvd"]
    return names
