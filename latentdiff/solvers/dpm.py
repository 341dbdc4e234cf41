"""Peer samplers users pick today, driven with any ``denoise(x, sigma)``, for side-by-side comparison.

``dpm_solver_pp`` runs diffusers' ``EDMDPMSolverMultistepScheduler`` (multistep DPM-Solver++ 2M/3M
on the Karras grid) with our denoiser.  The scheduler expects the raw network output ``F`` of EDM
preconditioning and rebuilds ``D = c_skip x + c_out F`` itself; we hand it
``F = (D(x; sigma) - c_skip x) / c_out`` with the scheduler's own sigma_data, so it sees exactly
our D.  All solvers start from the same point ``x_T = sigma_max * noise`` (diffusers'
``init_noise_sigma`` is sqrt(sigma_max^2 + 1), a convention difference we do not copy).
"""
from __future__ import annotations

import torch

from latentdiff.solvers.base import CountingDenoiser, SampleInfo

__all__ = ["dpm_solver_pp"]


def dpm_solver_pp(
    denoise,
    noise: torch.Tensor,
    *,
    nfe: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    order: int = 2,
    sigmas=None,
    return_info: bool = False,
):
    """DPM-Solver++ (2M or 3M) through diffusers with ``nfe`` evaluations (one per step, the last to 0).

    ``sigmas``: the ``nfe`` positive levels to use instead of the scheduler's Eq. 5 grid (any schedule;
    an appended 0 allowed): they replace the scheduler's ``sigmas`` and ``timesteps`` after
    ``set_timesteps``, which is all its ``step`` reads (diffusers keeps them in float32)."""
    # diffusers is imported when this solver runs: it takes seconds, and every other solver needs none
    from diffusers import EDMDPMSolverMultistepScheduler

    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    sd = 0.5
    sched = EDMDPMSolverMultistepScheduler(
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        sigma_data=sd,
        rho=rho,
        solver_order=order,
        algorithm_type="dpmsolver++",
        final_sigmas_type="zero",
    )
    sched.set_timesteps(nfe, device=noise.device)
    if sigmas is not None:
        pos = torch.as_tensor([float(v) for v in sigmas if float(v) > 0], dtype=torch.float32, device=noise.device)
        if pos.numel() != nfe:
            raise ValueError(f"dpm_solver_pp: {pos.numel()} positive levels given for nfe={nfe}")
        sched.timesteps = sched.precondition_noise(pos)
        sched.sigmas = torch.cat([pos, pos.new_zeros(1)])
    counter = CountingDenoiser(denoise)
    x = noise * float(sched.sigmas[0] if sigmas is not None else sigma_max)
    for i, t in enumerate(sched.timesteps):
        sigma = float(sched.sigmas[i])
        d = counter(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device))
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2) ** 0.5
        f = (d - c_skip * x) / c_out
        x = sched.step(f, t, x).prev_sample
    if not return_info:
        return x
    sig = [float(s) for s in sched.sigmas]
    return x, SampleInfo(method=f"dpm-{order}m", nfe=counter.calls, sigmas=sig, eval_sigmas=counter.sigmas)
