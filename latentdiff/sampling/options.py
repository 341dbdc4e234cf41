"""The sampling stage's choices that are not the solver's own: sigma_max, the guidance interval, the
dry-run record of what the solver will do, and the network evaluations per image."""
from __future__ import annotations

import math

import torch

from latentdiff.diffusion.grids import EDM_SIGMA_MAX, VP_SIGMA_MAX
from latentdiff.solvers.registry import FIXED_GRID_SAMPLERS, budget_kwargs, sample
from latentdiff.utils.errors import SampleError

__all__ = ["resolve_sigma_max", "parse_guidance_interval", "solver_record", "network_evals_per_image"]


def resolve_sigma_max(choice, data_value: float | None) -> float:
    """``data`` (``data_value``: the export's data-driven sigma_max, wsnr.txt Eq. 7-8), ``edm`` (80,
    edm.txt Table 1), ``vp`` (sigma(t=1) ~ 152 of the VP schedule) or a positive number."""
    choice = str(choice).strip()
    if choice == "edm":
        return float(EDM_SIGMA_MAX)
    if choice == "vp":
        return float(VP_SIGMA_MAX)
    if choice == "data":
        if data_value is None:
            raise SampleError("--sigma-max data needs the export's data-driven schedule.sigma_max, which this model "
                              "does not have; pass --sigma-max edm, vp or a number")
        return float(data_value)
    try:
        v = float(choice)
    except ValueError:
        raise SampleError(f"--sigma-max {choice!r}: use data, edm, vp or a positive number") from None
    if not (v > 0 and math.isfinite(v)):
        raise SampleError(f"--sigma-max {choice!r} must be a positive finite number")
    return v


def parse_guidance_interval(spec):
    """``"lo,hi"`` or a pair -> ``(lo, hi)`` with 0 <= lo <= hi < inf (None or "" -> None)."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, (list, tuple)):
        vals = list(spec)
    else:
        vals = str(spec).split(",")
    try:
        lo, hi = (float(v) for v in vals)
    except ValueError:
        raise SampleError(f"--guidance-interval {spec!r}: use sigma_lo,sigma_hi (e.g. 0.28,2.9)") from None
    if not (0 <= lo <= hi and math.isfinite(hi)):
        raise SampleError(f"--guidance-interval {spec!r}: need 0 <= sigma_lo <= sigma_hi < inf")
    return (lo, hi)


def solver_record(
    *,
    method: str,
    nfe: int | None,
    steps: int | None,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    shape=(1, 1, 1),
    options: dict | None = None,
):
    """What the solver will do, without a network: the ``SampleInfo`` of a run on a zero denoiser.

    The sigma grid, the plan and the number of denoiser calls do not depend on the denoiser's
    output, so this validates the settings (a :class:`SampleError` names the problem) and gives the
    record ``sampling.json`` stores even when every image already existed.
    """
    kw = dict(options or {})
    if method == "edm-stochastic":
        kw.setdefault("generator", [torch.Generator().manual_seed(0)])
    try:
        _, info = sample(lambda x, s: torch.zeros_like(x), torch.zeros((1, *shape)), method=method,
                         **budget_kwargs(nfe, steps), sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                         return_info=True, **kw)
    except (ValueError, TypeError) as e:
        raise SampleError(f"--solver {method}: {e}") from None
    return info


def network_evals_per_image(eval_sigmas, cfg_scale: float, interval, method: str = "nfe-guided") -> int:
    """Network evaluations per image: one per denoiser call, two where guidance runs the conditional
    and the unconditional model (``guidance.guided_denoiser``: w not in {0, 1}, sigma inside the
    interval; an adaptive solver with an interval always runs both: ``guided_denoiser(..., fixed_shape=True)``)."""
    if cfg_scale == 1.0 or (cfg_scale == 0.0 and interval is None):
        return len(eval_sigmas)
    if interval is None or method not in FIXED_GRID_SAMPLERS:
        return 2 * len(eval_sigmas)
    if cfg_scale == 0.0:
        return len(eval_sigmas)
    lo, hi = interval
    return sum(2 if lo <= s <= hi else 1 for s in eval_sigmas)
