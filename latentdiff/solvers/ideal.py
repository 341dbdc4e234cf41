"""The ideal denoiser of a finite dataset (wsnr.txt Eq. 4 / Eq. 14): the exact minimizer of the
denoising loss, used to benchmark solvers against a known ODE."""
from __future__ import annotations

import math

import torch

from latentdiff.solvers.base import Denoise

__all__ = ["ideal_denoiser"]


def ideal_denoiser(data: torch.Tensor, *, chunk: int = 8192) -> Denoise:
    """The exact minimizer of the denoising loss for the finite dataset ``data`` (N, ...).

    D(x; sigma) = sum_i softmax_i(-||x - y_i||^2 / (2 sigma^2)) y_i (wsnr.txt Eq. 14).  Computed in
    float64 with a max-subtracted softmax; squared distances use the expansion
    ||x||^2 - 2 x.y + ||y||^2 on mean-centred data (less cancellation), clamped at 0.  Batched over
    x and chunked over the data with a streaming (online) log-sum-exp, so memory is O(B * chunk).
    """
    y = data.detach().reshape(data.shape[0], -1).to(torch.float64)
    center = y.mean(dim=0)
    yc = y - center
    yy = yc.square().sum(dim=1)

    def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
        xf = x.detach().reshape(x.shape[0], -1).to(torch.float64).to(y.device) - center
        s = torch.as_tensor(sigma, dtype=torch.float64, device=y.device).reshape(-1)
        if s.numel() == 1:
            s = s.expand(xf.shape[0])
        inv = 1.0 / (2.0 * s.square())[:, None]
        xx = xf.square().sum(dim=1, keepdim=True)
        run_max = torch.full((xf.shape[0], 1), -math.inf, dtype=torch.float64, device=y.device)
        run_sum = torch.zeros((xf.shape[0], 1), dtype=torch.float64, device=y.device)
        acc = torch.zeros_like(xf)
        for start in range(0, yc.shape[0], chunk):
            yb = yc[start : start + chunk]
            d2 = (xx - 2.0 * xf @ yb.T + yy[start : start + chunk][None, :]).clamp_min_(0.0)
            logits = -d2 * inv
            new_max = torch.maximum(run_max, logits.max(dim=1, keepdim=True).values)
            rescale = torch.exp(run_max - new_max)
            w = torch.exp(logits - new_max)
            run_sum = run_sum * rescale + w.sum(dim=1, keepdim=True)
            acc = acc * rescale + w @ yb
            run_max = new_max
        out = acc / run_sum + center
        return out.reshape(x.shape).to(x.dtype).to(x.device)

    return denoise
