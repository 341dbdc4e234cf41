"""ODE samplers for ``dx/dsigma = (x - D(x; sigma)) / sigma`` (wsnr.txt Eq. 1; edm.txt Eq. 4 with
sigma(t) = t, s(t) = 1).

Everything here is a plain function of ``(denoise, x, sigmas)``.  ``denoise(x, sigma)`` returns
D(x; sigma); the solvers call it with ``sigma`` as a (B,) tensor of ``x``'s dtype and device.

Contents
--------
* ``TABLEAUX`` — Butcher tableaux of wsnr.txt Table 5 (Euler, Midpoint, Heun, Ode3).
* ``ode_step`` — one Runge-Kutta step with the stage noise levels placed in log sigma exactly as
  wsnr.txt Algorithm 3 (``placement="log"``) or linearly in sigma (``placement="classical"``, the
  textbook RK method) so both can be compared.
* ``rk_sampler`` — one fixed method for every step, the final step to sigma = 0 in Euler.
* ``hybrid_sampler`` — wsnr.txt Algorithm 2; ``plan_nfe`` + ``nfe_guided_sampler`` — Algorithm 1.
* ``heun_sampler`` / ``stochastic_sampler`` — edm.txt Algorithms 1 and 2.
* ``sample`` — one entry point choosing any of the above by name and NFE budget.
* ``ideal_denoiser`` — the closed-form denoiser of a finite dataset (wsnr.txt Eq. 4 / Eq. 14).
* ``CountingDenoiser`` — counts real denoiser calls; every sampler reports the NFE it used.

Ambiguities of the papers' algorithms and how they are resolved here
------------------------------------------------------------------
1. Table 5, Ode3: the extracted table lost the entry A_21 of the row c_2 = 1.  Every explicit RK
   tableau satisfies the row-sum condition sum_v A_uv = c_u, which forces A_21 = 1; the result
   is the third-order Shu-Osher (SSPRK3) tableau c = (0, 1, 1/2), A_21 = 1, A_31 = A_32 = 1/4,
   b = (1/6, 1/6, 2/3).
2. Algorithm 3 computes stage u's noise level as exp(lambda_i + c_u (lambda_{i-1} - lambda_i)).
   For c_u = 0 and c_u = 1 we return sigma_i and sigma_{i-1} *exactly* (exp(log(s)) can differ
   from s by one ulp), so a log-placed Heun step is bitwise EDM's Heun step.
3. Algorithm 3 divides A_uv by c_u; the first stage has c_1 = 0 and no A entries, so no division
   by zero occurs; tableaux with c_u = 0 for u > 1 are rejected.
4. Stepping to sigma = 0 is only defined for Euler (log 0 and the 1/sigma of the slope are
   undefined); ``ode_step`` refuses other methods there.  Every sampler's last step, sigma_min -> 0,
   is Euler and counts as one evaluation (Alg. 2 line 5; edm.txt Alg. 1 "revert to Euler").
5. Algorithm 2 uses both T and N for the number of noise levels; they are the same number.  Its
   step index i runs T..1 with sigma_T = sigma_max and sigma_1 = sigma_min; "i < N - numOde3 + 1"
   selects Heun, so Ode3 steps are the numOde3 steps with the largest sigma ("large sigma first").
6. Algorithm 2's grid is edm.txt Eq. 5 (``karras_sigmas``) listed in the opposite order.  With
   T = 1 the formula divides by zero; we use the single level sigma_max and one Euler step to 0.
7. Algorithm 1 needs h_tau, which the paper does not state.  Default ``H_TAU`` = 1.335: on the
   EDM CIFAR-10 grid (sigma in [0.002, 80], Delta lambda = 10.6) Table 4 prefers Midpoint at
   NFE 15 (h = 1.514) and the third-order method at NFE 19 (h = 1.177); 1.335 is the geometric
   mean of the two bracketing step sizes.
8. Algorithm 1 with an even NFE can leave one evaluation unused (2T - 1 <= NFE); in pure
   third-order mode up to two.  The plan reports the evaluations actually spent; it never exceeds
   the budget.
9. Algorithm 1 line 7 can give T = 1 (when the whole log-sigma range is below h_tau); the hybrid
   then degenerates to pure third order (line 9-11) and possibly to the single Euler step of (6).

NFE accounting: one "evaluation" is one call of ``denoise`` on the whole batch, i.e. one network
evaluation per image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .noise import karras_sigmas

__all__ = [
    "Tableau",
    "TABLEAUX",
    "H_TAU",
    "CountingDenoiser",
    "stage_sigma",
    "ode_step",
    "rk_sampler",
    "heun_sampler",
    "stochastic_sampler",
    "NFEPlan",
    "plan_nfe",
    "hybrid_sampler",
    "nfe_guided_sampler",
    "SampleInfo",
    "sample",
    "steps_for_nfe",
    "nfe_for_steps",
    "ideal_denoiser",
    "SAMPLERS",
    "PEER_SAMPLERS",
    "FIXED_GRID_SAMPLERS",
]

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

H_TAU = 1.335  # step-size threshold of Algorithm 1, see ambiguity 7 in the module docstring


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta Butcher tableau: nodes ``c``, strictly lower ``A`` rows, weights ``b``."""

    c: tuple[float, ...]
    A: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]

    def __post_init__(self):
        s = len(self.c)
        if len(self.A) != s or len(self.b) != s:
            raise ValueError("c, A and b must describe the same number of stages")
        if self.c[0] != 0:
            raise ValueError("an explicit tableau starts with c_1 = 0")
        for u, row in enumerate(self.A):
            if len(row) != u:
                raise ValueError(f"row {u + 1} of A must have {u} entries (explicit method)")
            if u > 0 and self.c[u] <= 0:
                raise ValueError("Algorithm 3 divides by c_u: every stage after the first needs c_u > 0")
            if abs(sum(row) - self.c[u]) > 1e-12:
                raise ValueError(f"row {u + 1} of A does not sum to c_{u + 1} (row-sum condition)")
        if abs(sum(self.b) - 1) > 1e-12:
            raise ValueError("the weights b must sum to 1 (consistency)")

    @property
    def stages(self) -> int:
        return len(self.c)


# wsnr.txt Table 5 (Ode3: see ambiguity 1).
TABLEAUX: dict[str, Tableau] = {
    "euler": Tableau(c=(0.0,), A=((),), b=(1.0,)),
    "midpoint": Tableau(c=(0.0, 0.5), A=((), (0.5,)), b=(0.0, 1.0)),
    "heun": Tableau(c=(0.0, 1.0), A=((), (1.0,)), b=(0.5, 0.5)),
    "ode3": Tableau(c=(0.0, 1.0, 0.5), A=((), (1.0,), (0.25, 0.25)), b=(1 / 6, 1 / 6, 2 / 3)),
}


class CountingDenoiser:
    """Wraps ``denoise`` and counts its calls (one call = one network evaluation per image)."""

    def __init__(self, denoise: Denoise):
        self.denoise = denoise
        self.calls = 0
        self._sigmas: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        # keep the (device) tensor: reading it back here would wait for the GPU before every forward
        self._sigmas.append(sigma.detach().reshape(-1)[:1])
        return self.denoise(x, sigma)

    @property
    def sigmas(self) -> list[float]:
        """The noise level of the first batch item at every call (one device sync, when read)."""
        return torch.cat(self._sigmas).double().cpu().tolist() if self._sigmas else []


def _eval(denoise: Denoise, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """D(x; sigma) with sigma broadcast to a (B,) tensor of x's dtype."""
    s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    return denoise(x, s)


def _slope(denoise: Denoise, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """dx/dsigma = (x - D(x; sigma)) / sigma (wsnr.txt Eq. 1)."""
    return (x - _eval(denoise, x, sigma)) / sigma


def _tableau(method) -> Tableau:
    if isinstance(method, Tableau):
        return method
    if method not in TABLEAUX:
        raise ValueError(f"unknown ODE method {method!r}; expected one of {sorted(TABLEAUX)} or a Tableau")
    return TABLEAUX[method]


def stage_sigma(sigma: float, sigma_next: float, c: float, placement: str = "log") -> float:
    """Noise level of a stage with node ``c`` on the step sigma -> sigma_next.

    ``log``: exp(lambda_i + c (lambda_{i-1} - lambda_i)) (wsnr.txt Alg. 3 line 5);
    ``classical``: sigma + c (sigma_next - sigma) (textbook RK in sigma).
    """
    if c == 0:
        return float(sigma)
    if c == 1:
        return float(sigma_next)
    if placement == "log":
        return math.exp(math.log(sigma) + c * (math.log(sigma_next) - math.log(sigma)))
    if placement == "classical":
        return float(sigma) + c * (float(sigma_next) - float(sigma))
    raise ValueError(f"placement must be 'log' or 'classical', got {placement!r}")


def ode_step(
    denoise: Denoise,
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    method="heun",
    *,
    placement: str = "log",
) -> torch.Tensor:
    """One step x_i -> x_{i-1} from ``sigma`` to ``sigma_next`` (wsnr.txt Algorithm 3).

    Stage u is evaluated at sigma_u = ``stage_sigma(sigma, sigma_next, c_u, placement)`` and
    x_u = x_i + (sigma_u - sigma_i) * sum_v (A_uv / c_u) k_v; the step returns
    x_i + (sigma_{i-1} - sigma_i) * sum_u b_u k_u with k_u = (x_u - D(x_u; sigma_u)) / sigma_u.
    With ``placement="classical"`` this is exactly the textbook RK method of the tableau.
    """
    tab = _tableau(method)
    sigma, sigma_next = float(sigma), float(sigma_next)
    if sigma <= 0:
        raise ValueError(f"ode_step starts from sigma > 0, got {sigma}")
    if sigma_next == 0 and tab.stages > 1:
        raise ValueError("a step to sigma = 0 must be Euler: the stage slopes divide by sigma (Alg. 2 line 5)")
    ks: list[torch.Tensor] = []
    for u in range(tab.stages):
        s_u = stage_sigma(sigma, sigma_next, tab.c[u], placement)
        if u == 0:
            x_u = x
        else:
            k = sum(ks[v] * (tab.A[u][v] / tab.c[u]) for v in range(u) if tab.A[u][v] != 0)
            x_u = x + k * (s_u - sigma)
        ks.append(_slope(denoise, x_u, s_u))
    return x + (sigma_next - sigma) * sum(ks[u] * tab.b[u] for u in range(tab.stages) if tab.b[u] != 0)


def rk_sampler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, method="heun", *, placement="log") -> torch.Tensor:
    """Integrate from ``sigmas[0]`` down the grid with one method; the final step to 0 is Euler.

    ``x`` must already be at noise level ``sigmas[0]`` (i.e. noise * sigma_max).
    """
    sig = [float(s) for s in sigmas]
    for i in range(len(sig) - 1):
        m = "euler" if sig[i + 1] == 0 else method
        x = ode_step(denoise, x, sig[i], sig[i + 1], m, placement=placement)
    return x


def heun_sampler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """edm.txt Algorithm 1 with sigma(t) = t, s(t) = 1 (deterministic 2nd-order Heun)."""
    sig = [float(s) for s in sigmas]
    for i in range(len(sig) - 1):
        t_cur, t_next = sig[i], sig[i + 1]
        d = (x - _eval(denoise, x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d
        if t_next != 0:
            d_prime = (x_next - _eval(denoise, x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like x from one generator or one generator per batch item."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        draws = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
        if all(d.device == draws[0].device for d in draws):  # one host-to-device copy, not one per image
            return torch.stack(draws).to(x.device)
        return torch.stack([d.to(x.device) for d in draws])
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def stochastic_sampler(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator=None,
) -> torch.Tensor:
    """edm.txt Algorithm 2: Heun with Langevin-like "churn".

    gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in [S_tmin, S_tmax] else 0, with N the number
    of steps; t_hat = t_i + gamma_i t_i; x_hat = x_i + sqrt(t_hat^2 - t_i^2) eps,
    eps ~ N(0, S_noise^2 I).  With S_churn = 0 it is exactly ``heun_sampler``.
    ``generator`` may be a list with one generator per image (batch-size independent results).
    """
    sig = [float(s) for s in sigmas]
    n = len(sig) - 1
    for i in range(n):
        t_cur, t_next = sig[i], sig[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * _randn_like(x, generator)
        else:
            x_hat = x
        d = (x_hat - _eval(denoise, x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d
        if t_next != 0:
            d_prime = (x_next - _eval(denoise, x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


# ----------------------------------------------------------------------------------------------
# wsnr.txt Algorithms 1 and 2


@dataclass(frozen=True)
class NFEPlan:
    """The outcome of Algorithm 1 for one budget.

    ``steps`` = T noise levels (T steps, the last one Euler to 0), ``is_midpoint``, ``ode3_steps``
    (TOde3), ``h`` = the intended 2nd-order log step of line 3, ``evaluations`` = NFE actually spent.
    """

    nfe: int
    steps: int
    is_midpoint: bool
    ode3_steps: int
    h: float
    h_tau: float

    @property
    def heun_steps(self) -> int:
        return 0 if self.is_midpoint else self.steps - 1 - self.ode3_steps

    @property
    def midpoint_steps(self) -> int:
        return self.steps - 1 if self.is_midpoint else 0

    @property
    def evaluations(self) -> int:
        return 1 + 2 * self.midpoint_steps + 2 * self.heun_steps + 3 * self.ode3_steps

    def methods(self) -> list[str]:
        """Method of each step, largest sigma first (Algorithm 2)."""
        if self.is_midpoint:
            return ["midpoint"] * (self.steps - 1) + ["euler"]
        return ["ode3"] * self.ode3_steps + ["heun"] * self.heun_steps + ["euler"]


def plan_nfe(nfe: int, sigma_min: float, sigma_max: float, h_tau: float = H_TAU) -> NFEPlan:
    """wsnr.txt Algorithm 1 (lines 2-14): steps and methods for an NFE budget."""
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if not h_tau > 0:
        raise ValueError(f"h_tau must be positive, got {h_tau}")
    nfe = int(nfe)
    lam_max, lam_min = math.log(sigma_max), math.log(sigma_min)
    t = (nfe + 1) // 2  # line 2
    h = (lam_max - lam_min) / (t - 1) if t > 1 else math.inf  # line 3 (T = 1: no step, ambiguity 6)
    if h >= h_tau:  # lines 4-5
        is_midpoint, t_ode3 = True, 0
    else:
        t = math.floor((lam_max - lam_min) / h_tau + 1)  # line 7
        t_ode3 = nfe - 2 * t + 1  # line 8
        if t_ode3 > t - 1:  # lines 9-11
            t = (nfe + 2) // 3
            t_ode3 = t - 1
        is_midpoint = False  # line 13
    return NFEPlan(nfe=nfe, steps=t, is_midpoint=is_midpoint, ode3_steps=t_ode3, h=h, h_tau=h_tau)


def hybrid_sampler(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    is_midpoint: bool,
    num_ode3: int,
    placement: str = "log",
) -> torch.Tensor:
    """wsnr.txt Algorithm 2 on a given grid ``sigmas`` (T levels + the appended 0).

    Step i (T..1, i.e. grid position T - i): i = 1 -> Euler; ``is_midpoint`` -> Midpoint;
    i < T - numOde3 + 1 -> Heun; otherwise Ode3 (the numOde3 largest-sigma steps).
    """
    sig = [float(s) for s in sigmas]
    t = len(sig) - 1
    if not 0 <= num_ode3 <= max(t - 1, 0):
        raise ValueError(f"num_ode3 must be in [0, T-1] = [0, {t - 1}], got {num_ode3}")
    for pos in range(t):
        i = t - pos  # the paper's step index, T..1
        if i == 1:
            method = "euler"
        elif is_midpoint:
            method = "midpoint"
        elif i < t - num_ode3 + 1:
            method = "heun"
        else:
            method = "ode3"
        x = ode_step(denoise, x, sig[pos], sig[pos + 1], method, placement=placement)
    return x


def nfe_guided_sampler(
    denoise: Denoise,
    x: torch.Tensor,
    nfe: int,
    sigma_min: float,
    sigma_max: float,
    *,
    h_tau: float = H_TAU,
    rho: float = 7.0,
    placement: str = "log",
) -> torch.Tensor:
    """wsnr.txt Algorithm 1: plan for the budget, then Algorithm 2 on the Eq. 5 grid."""
    plan = plan_nfe(nfe, sigma_min, sigma_max, h_tau)
    sigmas = karras_sigmas(plan.steps, sigma_min, sigma_max, rho)
    return hybrid_sampler(denoise, x, sigmas, is_midpoint=plan.is_midpoint, num_ode3=plan.ode3_steps, placement=placement)


# ----------------------------------------------------------------------------------------------
# One entry point

# evaluations per non-final step of each fixed method
_COST = {"euler": 1, "heun": 2, "midpoint": 2, "ode3": 3, "edm-stochastic": 2}
SAMPLERS = ("auto", "euler", "heun", "midpoint", "ode3", "edm-stochastic", "hybrid", "nfe-guided", "dpm-2m", "dpm-3m")
# the peers of issue 5: multistep DPM-Solver++ through diffusers (latentdiff.peer_samplers)
PEER_SAMPLERS = {"dpm-2m": 2, "dpm-3m": 3}
# samplers whose noise levels do not depend on the denoiser (one grid for every image); ``auto``
# places a grid per image from its data-scale estimate
FIXED_GRID_SAMPLERS = frozenset(SAMPLERS) - {"auto"}
# the default of sample() and of ``latentdiff-sample --solver`` (issue 5): ``auto`` is at least as accurate
# as the best of EDM Heun / NFE-guided / DPM-Solver++ 2M/3M at every listed NFE on the default data of
# tools/bench/sampler_accuracy.py and on three other data sets, and more accurate than the paper's
# nfe-guided at every NFE on the trained model of tools/bench/sampler_trained.py (README "Samplers")
DEFAULT_SAMPLER = "auto"


def nfe_for_steps(method: str, steps: int) -> int:
    """Evaluations of a fixed-method sampler with ``steps`` noise levels (last step Euler)."""
    return _COST[method] * (steps - 1) + 1


def steps_for_nfe(method: str, nfe: int) -> int:
    """The most noise levels a fixed-method sampler can afford within ``nfe`` evaluations."""
    if method not in _COST:
        raise ValueError(f"steps_for_nfe: unknown fixed method {method!r}")
    steps = (nfe - 1) // _COST[method] + 1
    if steps < 1 or nfe < 1:
        raise ValueError(f"an NFE budget of {nfe} is too small for {method}")
    return steps


@dataclass
class SampleInfo:
    """What a sampler actually did: method, evaluations counted, grid, plan."""

    method: str
    nfe: int
    sigmas: list[float]
    plan: NFEPlan | None = None
    eval_sigmas: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"method": self.method, "nfe": self.nfe, "sigmas": self.sigmas, **self.extra}
        if self.plan is not None:
            d["plan"] = {
                "steps": self.plan.steps,
                "is_midpoint": self.plan.is_midpoint,
                "ode3_steps": self.plan.ode3_steps,
                "heun_steps": self.plan.heun_steps,
                "h": self.plan.h,
                "h_tau": self.plan.h_tau,
            }
        return d


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
    placement: str = "log",
    h_tau: float = H_TAU,
    num_ode3: int = 0,
    is_midpoint: bool = False,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator=None,
    return_info: bool = False,
):
    """Generate from standard-normal ``noise``: x_T = noise * sigma_max, then integrate to sigma = 0.

    ``method`` (default ``DEFAULT_SAMPLER``): auto (``latentdiff.auto_sampler.auto_sample``: multistep
    exponential integrator on a data-scale-aware per-sample grid; needs ``nfe``; uses only
    ``sigma_min``, ``sigma_max`` and ``rho``)
    | euler | heun (edm.txt Alg. 1) | midpoint | ode3 | edm-stochastic (edm.txt Alg. 2)
    | hybrid (wsnr.txt Alg. 2 with explicit ``steps``, ``is_midpoint``, ``num_ode3``)
    | nfe-guided (wsnr.txt Alg. 1; needs ``nfe``)
    | dpm-2m | dpm-3m (multistep DPM-Solver++ through diffusers' ``EDMDPMSolverMultistepScheduler`` on the
    Eq. 5 grid, ``latentdiff.peer_samplers``; one evaluation per noise level, so ``steps`` = ``nfe``).
    Give either ``nfe`` (a budget, never exceeded) or ``steps`` (noise levels).  Returns x_0, or
    ``(x_0, SampleInfo)`` with ``return_info=True``; ``SampleInfo.nfe`` is the counted number of
    denoiser calls.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {', '.join(SAMPLERS)}")
    if method == "auto":
        if steps is not None or nfe is None:
            raise ValueError("the auto sampler plans its own noise levels: give nfe=, not steps=")
        from .auto_sampler import auto_sample  # lazy: auto_sampler imports this module

        return auto_sample(denoise, noise, nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                           return_info=return_info)
    if method == "nfe-guided" and steps is not None:
        raise ValueError("the nfe-guided sampler chooses its own steps: give nfe=, not steps=")
    if method == "hybrid" and nfe is not None:
        raise ValueError("the hybrid sampler (Alg. 2) takes steps=, is_midpoint= and num_ode3=; use nfe-guided for a budget")
    if (nfe is None) == (steps is None) and method not in ("nfe-guided", "hybrid"):
        raise ValueError(f"sampler {method!r}: give exactly one of nfe= or steps=")
    if method in PEER_SAMPLERS:
        from .peer_samplers import dpm_solver_pp  # lazy: peer_samplers imports this module (and diffusers)

        return dpm_solver_pp(denoise, noise, nfe=int(nfe if nfe is not None else steps), sigma_min=sigma_min,
                             sigma_max=sigma_max, rho=rho, order=PEER_SAMPLERS[method], return_info=return_info)
    counter = CountingDenoiser(denoise)
    plan = None
    if method == "nfe-guided":
        if nfe is None:
            raise ValueError("the nfe-guided sampler needs an NFE budget (nfe=)")
        plan = plan_nfe(nfe, sigma_min, sigma_max, h_tau)
        steps, is_midpoint, num_ode3 = plan.steps, plan.is_midpoint, plan.ode3_steps
    elif method == "hybrid":
        if steps is None:
            raise ValueError("the hybrid sampler (Alg. 2) takes steps=, is_midpoint= and num_ode3=")
    elif steps is None:
        steps = steps_for_nfe(method, nfe)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    x = noise.to(noise.dtype) * float(sigmas[0])
    if method in ("euler", "midpoint", "ode3"):
        x = rk_sampler(counter, x, sigmas, method, placement=placement)
    elif method == "heun":
        x = heun_sampler(counter, x, sigmas)
    elif method == "edm-stochastic":
        x = stochastic_sampler(
            counter, x, sigmas, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, generator=generator
        )
    else:  # hybrid / nfe-guided
        x = hybrid_sampler(counter, x, sigmas, is_midpoint=is_midpoint, num_ode3=num_ode3, placement=placement)
    if nfe is not None and counter.calls > nfe:  # a guard on the planners above, never expected to fire
        raise RuntimeError(f"{method} used {counter.calls} evaluations for a budget of {nfe}")
    if not return_info:
        return x
    info = SampleInfo(
        method=method,
        nfe=counter.calls,
        sigmas=[float(s) for s in sigmas],
        plan=plan,
        eval_sigmas=counter.sigmas,
        extra={"placement": placement, "rho": rho, "sigma_min": sigma_min, "sigma_max": sigma_max},
    )
    return x, info


# ----------------------------------------------------------------------------------------------
# wsnr.txt Eq. 4 / Eq. 14


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
