"""ODE/SDE samplers for dx/dsigma = (x - D(x; sigma)) / sigma (wsnr.txt Eq. 1; edm.txt Eq. 4 with
sigma(t) = t, s(t) = 1), each a plain function of ``(denoise, x, sigmas)``, and one ``sample()`` entry
point that dispatches by name (``SOLVERS``) and counts every denoiser call.

Modules: ``base`` (call convention, counting, the run record), ``runge_kutta`` (wsnr.txt Alg. 3 /
Table 5, edm.txt Alg. 1-2), ``nfe_guided`` (wsnr.txt Alg. 1-2), ``auto`` (the default; its integrator
``exp_adams`` and its grid ``auto_grid``), ``dpm`` (DPM-Solver++ through diffusers), ``registry``
(``sample``), ``ideal`` (wsnr.txt Eq. 4/14), ``generate`` (latents from seeds).
"""
from latentdiff.solvers.auto import auto_sample
from latentdiff.solvers.base import CountingDenoiser, Denoise, SampleInfo
from latentdiff.solvers.dpm import dpm_solver_pp
from latentdiff.solvers.ideal import ideal_denoiser
from latentdiff.solvers.nfe_guided import H_TAU, NFEPlan, hybrid_sampler, nfe_guided_sampler, plan_nfe
from latentdiff.solvers.registry import (
    DEFAULT_SAMPLER,
    FIXED_GRID_SAMPLERS,
    SAMPLERS,
    SOLVERS,
    Solver,
    check_options,
    nfe_for_steps,
    sample,
    steps_for_nfe,
)
from latentdiff.solvers.runge_kutta import (
    TABLEAUX,
    Tableau,
    heun_sampler,
    ode_step,
    rk_sampler,
    stage_sigma,
    stochastic_sampler,
)

__all__ = [
    "auto_sample", "CountingDenoiser", "Denoise", "SampleInfo", "dpm_solver_pp", "ideal_denoiser", "H_TAU",
    "NFEPlan", "hybrid_sampler", "nfe_guided_sampler", "plan_nfe", "DEFAULT_SAMPLER", "FIXED_GRID_SAMPLERS",
    "SAMPLERS", "SOLVERS", "Solver", "check_options", "nfe_for_steps", "sample", "steps_for_nfe", "TABLEAUX",
    "Tableau", "heun_sampler", "ode_step", "rk_sampler", "stage_sigma", "stochastic_sampler",
]
