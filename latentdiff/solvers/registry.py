"""One entry point for every sampler: ``sample(denoise, noise, method=..., nfe=... | steps=...)``.

Each sampler is registered once in ``SOLVERS`` with the budget it takes (``steps``: a fixed method,
``nfe``: it plans its own noise levels for a budget), the options it accepts, and whether its grid is
one for all images or one per image.  An option a sampler does not use is an error, never ignored,
so a record of the options always lists what took effect.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from latentdiff.solvers.auto import auto_sample
from latentdiff.solvers.base import CountingDenoiser, Denoise, SampleInfo
from latentdiff.solvers.dpm import dpm_solver_pp
from latentdiff.solvers.multistep import deis_sampler, ipndm_sampler, unipc_sampler
from latentdiff.solvers.nfe_guided import H_TAU, hybrid_sampler, plan_nfe
from latentdiff.solvers.runge_kutta import heun_sampler, rk_sampler, stochastic_sampler
from latentdiff.solvers.schedules import DEFAULT_SCHEDULE, schedule_sigmas

__all__ = [
    "Solver",
    "SOLVERS",
    "SAMPLERS",
    "FIXED_GRID_SAMPLERS",
    "DEFAULT_SAMPLER",
    "check_options",
    "budget_kwargs",
    "nfe_for_steps",
    "steps_for_nfe",
    "sample",
]


@dataclass(frozen=True)
class Solver:
    """A registered sampler: ``cost`` evaluations per non-final step (fixed methods; the final step to 0
    is one Euler evaluation), ``budget`` the inputs it takes, ``options`` the keyword options it uses."""

    name: str
    summary: str
    budget: tuple[str, ...]  # ("nfe", "steps"): either; ("nfe",): a budget only; ("steps",): levels only
    options: frozenset[str] = frozenset()
    cost: int | None = None
    per_sample_grid: bool = False


_SCHED = frozenset({"schedule", "gits"})  # the time schedule (solvers/schedules.py) and GITS' table
_CHURN = frozenset({"s_churn", "s_tmin", "s_tmax", "s_noise", "generator"}) | _SCHED
SOLVERS: dict[str, Solver] = {s.name: s for s in (
    Solver("auto", "exponential-Adams multistep on a per-image grid placed from a data-scale estimate",
           ("nfe",), per_sample_grid=True),
    Solver("euler", "Euler steps (Table 5)", ("nfe", "steps"), _SCHED, cost=1),
    Solver("heun", "EDM's deterministic 2nd-order sampler (edm.txt Alg. 1)", ("nfe", "steps"), _SCHED, cost=2),
    Solver("midpoint", "Midpoint steps, stages in log sigma (wsnr.txt Alg. 3, Table 5)", ("nfe", "steps"),
           frozenset({"placement"}) | _SCHED, cost=2),
    Solver("ode3", "third-order steps (wsnr.txt Alg. 3, Table 5)", ("nfe", "steps"), frozenset({"placement"}) | _SCHED,
           cost=3),
    Solver("edm-stochastic", "Heun with churn (edm.txt Alg. 2)", ("nfe", "steps"), _CHURN, cost=2),
    Solver("hybrid", "Midpoint or Heun + Ode3 steps (wsnr.txt Alg. 2)", ("steps",),
           frozenset({"is_midpoint", "num_ode3", "placement"}) | _SCHED),
    Solver("nfe-guided", "plans steps and methods for an NFE budget (wsnr.txt Alg. 1)", ("nfe",),
           frozenset({"h_tau", "placement"})),
    Solver("ipndm", "iPNDM: 4th-order Adams-Bashforth on the slope, lower orders as warm start", ("nfe", "steps"), _SCHED,
           cost=1),
    Solver("unipc", "UniPC-bh2 of order 3, data prediction, corrector on every step but the last", ("nfe", "steps"),
           _SCHED, cost=1),
    Solver("deis-tab3", "DEIS-tAB: 3-node Lagrange extrapolation in VP time, integrated exactly", ("nfe", "steps"),
           _SCHED, cost=1),
    Solver("dpm-2m", "multistep DPM-Solver++(2M) through diffusers", ("nfe", "steps"), _SCHED),
    Solver("dpm-3m", "multistep DPM-Solver++(3M) through diffusers", ("nfe", "steps"), _SCHED),
)}
SAMPLERS = tuple(SOLVERS)
# samplers whose noise levels do not depend on the denoiser: one grid for every image
FIXED_GRID_SAMPLERS = frozenset(n for n, s in SOLVERS.items() if not s.per_sample_grid)
# the default of sample() and of ``latentdiff-sample --solver`` (tools/bench/README.md has the evidence)
DEFAULT_SAMPLER = "auto"


def check_options(method: str, options: dict) -> Solver:
    """The registered sampler ``method``; raises ValueError for an unknown sampler or an unused option."""
    if method not in SOLVERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {', '.join(SAMPLERS)}")
    spec = SOLVERS[method]
    unused = sorted(set(options) - spec.options)
    if unused:
        takes = ", ".join(sorted(spec.options)) or "no options"
        raise ValueError(f"sampler {method!r} does not use {', '.join(unused)} (it takes {takes})")
    return spec


def nfe_for_steps(method: str, steps: int) -> int:
    """Evaluations of a fixed-method sampler with ``steps`` noise levels (last step Euler)."""
    return SOLVERS[method].cost * (steps - 1) + 1


def steps_for_nfe(method: str, nfe: int) -> int:
    """The most noise levels a fixed-method sampler can afford within ``nfe`` evaluations."""
    cost = SOLVERS[method].cost if method in SOLVERS else None
    if cost is None:
        raise ValueError(f"steps_for_nfe: {method!r} is not a fixed-method sampler")
    if nfe < 1:
        raise ValueError(f"an NFE budget of {nfe} is too small for {method}")
    return (nfe - 1) // cost + 1


def budget_kwargs(nfe, steps) -> dict:
    """``{"steps": steps}`` when noise levels are given, else ``{"nfe": nfe}`` (the keywords of ``sample``)."""
    return {"steps": int(steps)} if steps is not None else {"nfe": None if nfe is None else int(nfe)}


def _check_budget(spec: Solver, nfe, steps) -> None:
    if nfe is None and steps is None and len(spec.budget) == 1:
        need = "an NFE budget (nfe=)" if spec.budget == ("nfe",) else "its noise levels (steps=)"
        raise ValueError(f"sampler {spec.name!r} needs {need}")
    if (nfe is None) == (steps is None):
        raise ValueError(f"sampler {spec.name!r}: give exactly one of nfe= or steps=")
    given = "nfe" if nfe is not None else "steps"
    if given not in spec.budget:
        other = {"nfe": "steps", "steps": "nfe"}[given]
        hint = " (use nfe-guided for a budget)" if spec.name == "hybrid" else ""
        raise ValueError(f"sampler {spec.name!r} takes {other}=, not {given}={nfe if given == 'nfe' else steps}{hint}")


_MULTISTEP = {"ipndm": ipndm_sampler, "unipc": unipc_sampler, "deis-tab3": deis_sampler}


def _fixed_grid(spec, counter, noise, nfe, steps, sigma_min, sigma_max, rho, options):
    """Fixed methods, hybrid and nfe-guided: one Eq. 5 grid for every image."""
    plan = None
    if spec.name == "nfe-guided":
        plan = plan_nfe(nfe, sigma_min, sigma_max, options.pop("h_tau", H_TAU))
        steps = plan.steps
        options.update(is_midpoint=plan.is_midpoint, num_ode3=plan.ode3_steps)
    elif steps is None:
        steps = steps_for_nfe(spec.name, nfe)
    sigmas = schedule_sigmas(options.pop("schedule", DEFAULT_SCHEDULE), steps, sigma_min, sigma_max, rho,
                             gits=options.pop("gits", None))
    x = noise * float(sigmas[0])
    if spec.name in ("euler", "midpoint", "ode3"):
        x = rk_sampler(counter, x, sigmas, spec.name, **options)
    elif spec.name == "heun":
        x = heun_sampler(counter, x, sigmas)
    elif spec.name == "edm-stochastic":
        x = stochastic_sampler(counter, x, sigmas, **options)
    elif spec.name in _MULTISTEP:
        x = _MULTISTEP[spec.name](counter, x, sigmas)
    else:  # hybrid / nfe-guided
        x = hybrid_sampler(counter, x, sigmas, **options)
    return x, [float(s) for s in sigmas], plan


def sample(
    denoise: Denoise,
    noise: torch.Tensor,
    *,
    method: str = DEFAULT_SAMPLER,
    nfe: int | None = None,
    steps: int | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    return_info: bool = False,
    **options,
):
    """Generate from standard-normal ``noise``: x_T = noise * sigma_max, then integrate to sigma = 0.

    ``method``: a name of ``SOLVERS`` (default ``DEFAULT_SAMPLER``).  Give ``nfe`` (a budget, never
    exceeded) or ``steps`` (noise levels), as the sampler takes.  ``rho`` is edm.txt Eq. 5's grid
    exponent.  ``options`` are the sampler's own (``SOLVERS[method].options``): ``schedule`` (karras |
    log-uniform | gits, ``solvers.schedules``; karras when not given) with ``gits`` (the model's
    ``GITSTable``, not recorded), ``placement`` (log |
    classical, Alg. 3), ``h_tau`` (Alg. 1), ``is_midpoint``/``num_ode3`` (Alg. 2), ``s_churn``,
    ``s_tmin``, ``s_tmax``, ``s_noise``, ``generator`` (edm.txt Alg. 2).  Returns x_0, or
    ``(x_0, SampleInfo)`` with ``return_info=True``; ``SampleInfo.nfe`` is the counted number of
    denoiser calls.
    """
    spec = check_options(method, options)
    _check_budget(spec, nfe, steps)
    options = dict(options)
    used = {k: v for k, v in options.items() if k not in ("generator", "gits")}
    if spec.name == "auto":
        x, info = auto_sample(denoise, noise, nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                              return_info=True)
    elif spec.name in ("dpm-2m", "dpm-3m"):
        n = int(nfe if nfe is not None else steps)
        name = options.pop("schedule", DEFAULT_SCHEDULE)
        grid = None if name == "karras" else schedule_sigmas(name, n, sigma_min, sigma_max, rho, gits=options.pop("gits", None))
        x, info = dpm_solver_pp(denoise, noise, nfe=n, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                                order=int(spec.name[4]), sigmas=grid, return_info=True)
    else:
        counter = CountingDenoiser(denoise)
        x, sigmas, plan = _fixed_grid(spec, counter, noise, nfe, steps, sigma_min, sigma_max, rho, options)
        if nfe is not None and counter.calls > nfe:  # a guard on the planners, never expected to fire
            raise RuntimeError(f"{method} used {counter.calls} evaluations for a budget of {nfe}")
        info = SampleInfo(method=method, nfe=counter.calls, sigmas=sigmas, plan=plan, eval_sigmas=counter.sigmas)
    info.extra.update({"rho": rho, "sigma_min": sigma_min, "sigma_max": sigma_max, "options": used})
    return (x, info) if return_info else x
