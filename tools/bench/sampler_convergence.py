#!/usr/bin/env python
"""Convergence-order benchmark of the ODE samplers.

Every solver integrates the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (wsnr.txt
Eq. 1) from x = noise * sigma_max down to sigma_min; the error is the RMS difference of the state at
sigma_min (the input of the final Euler evaluation, as in ``sampler_accuracy.py``) from the exact or
converged solution of the *same* noise.  The measured order is the slope p of
log(error) = c - p log(NFE): a method of order p with a fixed number of evaluations per step has
error ~ h^p ~ NFE^-p.

Problems (both smooth, so every method reaches its asymptotic order):

* ``gaussian`` — data N(mu, s^2 I): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) and the exact
  solution x(sigma) = mu + (x_0 - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)).
* ``gmm`` — an isotropic Gaussian mixture sum_k pi_k N(mu_k, s_k^2 I).  Its denoiser is closed form,
  D(x; sigma) = sum_k w_k(x, sigma) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)] with
  w_k proportional to pi_k N(x; mu_k, (s_k^2 + sigma^2) I) (computed with a max-subtracted softmax);
  the reference is classical Ode3 (3rd order) with many steps, checked against half its steps.

``convergence_study(denoise, noise, ...)`` takes any ``denoise(x, sigma)`` and is what the
trained-model benchmark reuses (pass the network's denoiser and a long-run reference, or let it
compute the classical-Ode3 reference).

Usage:  python tools/bench/sampler_convergence.py [--out DIR] [--problem gaussian gmm]
Writes DIR/table.md, DIR/results.json and DIR/sampler_convergence.png.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from latentdiff.diffusion.grids import karras_sigmas
from latentdiff.solvers.exp_adams import exp_adams_sampler
from latentdiff.solvers.registry import sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_accuracy import LastCall, reference, rms, solver_table  # noqa: E402

# NFE = 12 * 2^k + 1: every fixed-step method (1, 2 or 3 evaluations per step, plus the final
# Euler evaluation) spends the whole budget, so its steps halve exactly from one NFE to the next.
DEFAULT_NFES = (25, 49, 97, 193, 385)
EXPECTED = {  # textbook orders; "measured" rows are reported as found
    "Euler": "1",
    "EDM Heun": "2",
    "Midpoint": "2",
    "Ode3 (log)": "measured",
    "Ode3 (classical)": "3",
    "NFE-guided": "hybrid (measured)",
    "DPM-Solver++ 2M": "2",
    "DPM-Solver++ 3M": "3 (claimed)",
    "auto": "measured (grid changes with NFE)",
    "exp-Adams 2 (PEC)": "3 (AB2 + AM3 corrector)",
    "exp-Adams 3": "3",
    "exp-Adams 3 (PEC)": "4 (AB3 + AM4 corrector)",
    "iPNDM": "2 (constant-step AB4 weights on a non-uniform grid)",
    "UniPC-bh2 3": "3-4 (UniP-3 + UniC)",
    "DEIS-tAB3": "3",
}


def _exp_adams(order: int, corrector: bool):
    """auto's integrator (``latentdiff.solvers.exp_adams``) on the Eq. 5 grid (rho 7)."""

    def run(denoise, noise, nfe, smin, smax):
        x = exp_adams_sampler(denoise, noise * smax, karras_sigmas(nfe, smin, smax), order=order, corrector=corrector)
        return denoise(x, torch.full((x.shape[0],), smin, dtype=x.dtype))

    return run


def default_methods() -> dict:
    """Every solver of the accuracy benchmark plus auto's integrator on a fixed grid (its order)."""
    methods = solver_table()
    methods["exp-Adams 2 (PEC)"] = _exp_adams(2, True)
    methods["exp-Adams 3"] = _exp_adams(3, False)
    methods["exp-Adams 3 (PEC)"] = _exp_adams(3, True)
    for label, name in (("iPNDM", "ipndm"), ("UniPC-bh2 3", "unipc"), ("DEIS-tAB3", "deis-tab3")):
        methods[label] = _registry(name)
    return methods


def _registry(method: str):
    def run(denoise, noise, nfe, smin, smax):
        return sample(denoise, noise, method=method, nfe=nfe, sigma_min=smin, sigma_max=smax, return_info=True)

    return run


# ----------------------------------------------------------------------------------------------
# problems


def gaussian_problem(mu: float = 0.3, s: float = 0.5):
    """Denoiser and exact solution map for data N(mu, s^2 I)."""

    def denoise(x, sigma):
        sg = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return mu + s**2 / (s**2 + sg**2) * (x - mu)

    def exact(noise, sigma_min, sigma_max):
        x0 = noise * sigma_max
        return mu + (x0 - mu) * math.sqrt((s**2 + sigma_min**2) / (s**2 + sigma_max**2))

    return denoise, exact


def gmm_denoiser(means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor):
    """Closed-form denoiser of the isotropic mixture sum_k weights_k N(means_k, stds_k^2 I) (float64)."""
    means = means.to(torch.float64)
    stds = stds.to(torch.float64)
    logw = torch.log(weights.to(torch.float64) / weights.sum())
    k, dim = means.shape

    def denoise(x, sigma):
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        sg = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)  # (B, 1)
        var = stds[None, :] ** 2 + sg**2  # (B, K)
        d2 = torch.cdist(xf, means).square()  # (B, K)
        logits = logw[None, :] - 0.5 * d2 / var - 0.5 * dim * torch.log(var)
        w = torch.softmax(logits, dim=1)  # (B, K)
        gain = stds[None, :] ** 2 / var  # (B, K)
        # sum_k w_k [mu_k + gain_k (x - mu_k)] = sum_k w_k (1 - gain_k) mu_k + (sum_k w_k gain_k) x
        out = (w * (1 - gain)) @ means + (w * gain).sum(dim=1, keepdim=True) * xf
        return out.reshape(x.shape).to(x.dtype)

    return denoise


def make_gmm(dim: int = 48, components: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=torch.float64) * 0.6
    stds = 0.25 + 0.35 * torch.rand(components, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    return gmm_denoiser(means, stds, weights)


# ----------------------------------------------------------------------------------------------
# the study


def fit_order(nfes, errors, last: int = 3) -> float:
    """Least-squares slope p of log(err) = c - p log(NFE) over the ``last`` (asymptotic) points."""
    pts = [(math.log(n), math.log(e)) for n, e in zip(nfes, errors) if e > 0 and math.isfinite(e)][-last:]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return -sxy / sxx


def convergence_study(
    denoise,
    noise: torch.Tensor,
    *,
    methods: dict | None = None,
    nfes=DEFAULT_NFES,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    reference_x: torch.Tensor | None = None,
    ref_steps: int = 4096,
    last: int = 3,
) -> dict:
    """Errors at sigma_min and measured orders of ``methods`` for any ``denoise(x, sigma)``.

    ``methods``: name -> fn(denoise, noise, nfe, sigma_min, sigma_max) returning the final samples
    (default: ``default_methods()``: every solver of ``sampler_accuracy.solver_table()``, ``auto``
    included when present, and auto's exponential-Adams integrator on a fixed Eq. 5 grid).
    ``reference_x``: the exact/converged state at sigma_min for ``noise``; when None, classical
    Ode3 with ``ref_steps`` steps is used and checked against ``ref_steps // 2`` steps.
    Returns {"reference": {...}, "methods": {name: {"nfe": [...], "used": [...], "error": [...],
    "order": p, "pairwise": [...]}}}.
    """
    methods = default_methods() if methods is None else methods
    ref_info = {"kind": "given"}
    if reference_x is None:
        t0 = time.time()
        reference_x, _ = reference(denoise, noise, sigma_min, sigma_max, ref_steps)
        half, _ = reference(denoise, noise, sigma_min, sigma_max, ref_steps // 2)
        ref_info = {"kind": "classical Ode3", "steps": ref_steps, "rms_vs_half_steps": rms(reference_x, half),
                    "seconds": time.time() - t0}
    out = {"reference": ref_info, "methods": {}}
    for name, fn in methods.items():
        errs, used = [], []
        for n in nfes:
            rec = LastCall(denoise)
            fn(rec, noise, n, sigma_min, sigma_max)
            if rec.calls > n:
                raise RuntimeError(f"{name} used {rec.calls} evaluations for NFE {n}")
            used.append(rec.calls)
            errs.append(rms(rec.x, reference_x))
        pair = [math.log(errs[i] / errs[i + 1]) / math.log(nfes[i + 1] / nfes[i])
                if errs[i] > 0 and errs[i + 1] > 0 else float("nan") for i in range(len(nfes) - 1)]
        out["methods"][name] = {"nfe": list(nfes), "used": used, "error": errs,
                                "order": fit_order(nfes, errs, last), "pairwise": pair}
    return out


def markdown(results: dict, nfes) -> str:
    lines = []
    for prob, res in results.items():
        ref = res["reference"]
        extra = (f"reference: {ref['kind']}, {ref['steps']} steps (vs half: rms {ref['rms_vs_half_steps']:.1e})"
                 if ref["kind"] != "given" and ref["kind"] != "exact" else f"reference: {ref['kind']}")
        lines.append(f"\n**{prob}** ({extra}). RMS error at sigma_min, and the measured order "
                     f"(slope of log error vs log NFE over the last points):\n")
        lines.append("| solver | expected | " + " | ".join(f"NFE {n}" for n in nfes) + " | measured order |")
        lines.append("|---|---|" + "---|" * len(nfes) + "---|")
        for name, r in res["methods"].items():
            cells = " | ".join(f"{e:.2e}" for e in r["error"])
            lines.append(f"| {name} | {EXPECTED.get(name, '')} | {cells} | {r['order']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    # matplotlib only for the figure: a second of import time the measurement does not need
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, (prob, res) in zip(axes[0], results.items()):
        for name, r in res["methods"].items():
            ax.plot(r["nfe"], [max(e, 1e-17) for e in r["error"]], marker="o", label=f"{name} ({r['order']:.2f})")
        n = res["methods"][next(iter(res["methods"]))]["nfe"]
        for p, ls in ((1, ":"), (2, "--"), (3, "-.")):
            ax.plot(n, [1e-1 * (n[0] / v) ** p for v in n], color="gray", ls=ls, lw=0.8)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("NFE"), ax.set_ylabel("RMS error at sigma_min")
        ax.set_title(f"{prob} (gray: slopes 1, 2, 3)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/sampler_convergence")
    p.add_argument("--problem", nargs="+", default=["gaussian", "gmm"], choices=["gaussian", "gmm"])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--dim", type=int, default=48, help="data dimension")
    p.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_NFES))
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--ref-steps", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.samples, args.dim), generator=g, dtype=torch.float64)
    results = {}
    for prob in args.problem:
        if prob == "gaussian":
            denoise, exact = gaussian_problem()
            res = convergence_study(denoise, noise, nfes=args.nfe, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                                    reference_x=exact(noise, args.sigma_min, args.sigma_max))
            res["reference"] = {"kind": "exact"}
        else:
            denoise = make_gmm(args.dim, seed=args.seed)
            res = convergence_study(denoise, noise, nfes=args.nfe, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                                    ref_steps=args.ref_steps)
        results[prob] = res
        print(markdown({prob: res}, args.nfe), flush=True)
    md = markdown(results, args.nfe)
    (out / "table.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps({"config": vars(args), "results": results}, indent=1))
    plot(results, out / "sampler_convergence.png")
    print(f"\nwrote {out / 'table.md'}, {out / 'results.json'}, {out / 'sampler_convergence.png'}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
