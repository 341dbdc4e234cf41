"""Power-function EMA profiles and their post-hoc reconstruction (EDM2: Karras et al. 2024,
*Analyzing and Improving the Training Dynamics of Diffusion Models*, arXiv 2312.02696, Sec. 3.1 and
Appendix C).  Pure float64 math, no I/O.

A power-function EMA at time t (here: images seen) averages the training trajectory θ(τ), τ ∈ [0, t],
with the density

    p_{t,γ}(τ) = (γ + 1) τ^γ / t^(γ+1)                                    (EDM2 Sec. 3.1, normalized)

whose standard deviation relative to t is the profile's width (App. C)

    σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3))).

Inverting it is the cubic γ³ + 7γ² + (16 − σ_rel⁻²) γ + (12 − σ_rel⁻²) = 0 (the identity multiplied
out); its largest real root is the profile.  σ_rel(γ) rises from 0 at γ = −1 to its maximum
``SIGMA_REL_MAX`` ≈ 0.3003 at γ = φ − 2 ≈ −0.382 and falls to 0 as γ → ∞; the largest root is the
branch γ > φ − 2 on which σ_rel decreases monotonically.

Discrete update (App. C, image-count form): after an optimizer step that brings the image count
from t − Δt to t,

    θ̂_t = β θ̂_{t−Δt} + (1 − β) θ_t,   β = (1 − Δt / t)^(γ+1).           (EDM2 Sec. 3.1, t in images)

The weight this puts on the step that ended at image count s_k is
(s_k/t)^(γ+1) − (s_{k−1}/t)^(γ+1): exactly p_{t,γ} integrated over (s_{k−1}, s_k], so the discrete
EMA is the continuous profile applied to the piecewise-constant trajectory, with no further
approximation.

Inner product of two profiles (App. C): for t_a ≤ t_b,

    ⟨p_a, p_b⟩ = ∫₀^{t_a} p_a p_b dτ = (γ_a + 1)(γ_b + 1) / ((γ_a + γ_b + 1) t_b) · (t_a / t_b)^{γ_b}

(and symmetrically).  Reconstruction: snapshots i with profiles p_i, a target p*; the weights x that
minimise ‖Σ_i x_i p_i − p*‖² solve A x = b with A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p*⟩ (App. C).  The
fit error reported is that residual relative to ‖p*‖² = (γ + 1)² / ((2γ + 1) t).

The EDM2 text is not among the project's stored papers, so sections are cited, not equation numbers;
every formula above is derived from the profile's definition and checked against numerical integration
in ``tests/test_power_ema.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GAMMA_AT_MAX",
    "SIGMA_REL_MAX",
    "Fit",
    "gamma_to_sigma_rel",
    "power_beta",
    "profile_inner",
    "sigma_rel_to_gamma",
    "solve_weights",
]

GAMMA_AT_MAX = (math.sqrt(5.0) - 1.0) / 2.0 - 1.0  # φ − 2: where dσ_rel/dγ = 0
SIGMA_REL_MAX = math.sqrt((GAMMA_AT_MAX + 1) / ((GAMMA_AT_MAX + 2) ** 2 * (GAMMA_AT_MAX + 3)))


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel of the profile with exponent γ (EDM2 App. C)."""
    g = float(gamma)
    if not g > -1.0:
        raise ValueError(f"gamma {gamma!r} must be > -1")
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ (on the branch γ > φ − 2) whose profile has relative width ``sigma_rel``."""
    s = float(sigma_rel)
    if not 0.0 < s < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel {sigma_rel!r} must be in (0, {SIGMA_REL_MAX:.6f}) (EDM2 App. C)")
    k = s ** -2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    g = float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))))
    # one Newton step on f(γ) = (γ+2)²(γ+3) − k(γ+1) removes the root finder's rounding
    f, df = (g + 2) ** 2 * (g + 3) - k * (g + 1), 3 * g * g + 14 * g + 16 - k
    return g - f / df if df != 0 else g


def power_beta(gamma: float, t: float, dt: float) -> float:
    """β = (1 − Δt/t)^(γ+1) for the step that brings the image count to ``t`` (EDM2 Sec. 3.1)."""
    if not (t > 0 and 0 < dt <= t):
        raise ValueError(f"need 0 < dt <= t, got t={t}, dt={dt}")
    return (1.0 - dt / t) ** (gamma + 1.0)


def profile_inner(t_a, g_a, t_b, g_b):
    """⟨p_{t_a,γ_a}, p_{t_b,γ_b}⟩ over τ ∈ [0, ∞) (EDM2 App. C); broadcasts over numpy arrays."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    lo, hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_hi = np.where(t_a <= t_b, g_b, g_a)  # the exponent of the longer profile
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * hi) * (lo / hi) ** g_hi


@dataclass(frozen=True)
class Fit:
    """Combination weights of the snapshots for one target and the fit's relative L2 error."""

    weights: np.ndarray
    rel_error: float  # ‖Σ x_i p_i − p*‖ / ‖p*‖


def solve_weights(snap_t, snap_gamma, target_t: float, target_gamma: float) -> Fit:
    """Least-squares weights of the snapshot profiles (t_i, γ_i) for the target (t*, γ*) (App. C)."""
    t = np.asarray(snap_t, dtype=np.float64).reshape(-1)
    g = np.asarray(snap_gamma, dtype=np.float64).reshape(-1)
    if t.size == 0 or t.shape != g.shape:
        raise ValueError("need one gamma per snapshot time and at least one snapshot")
    a = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, target_t, target_gamma)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    norm2 = float(profile_inner(target_t, target_gamma, target_t, target_gamma))
    resid2 = max(norm2 - 2.0 * float(x @ b) + float(x @ a @ x), 0.0)
    return Fit(weights=x, rel_error=math.sqrt(resid2 / norm2))
