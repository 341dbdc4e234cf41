#!/usr/bin/env python
"""Ideal-denoiser sampler benchmark (wsnr.txt Sec. 5).

The ideal denoiser of a finite dataset (wsnr.txt Eq. 4/14) makes the probability-flow ODE exactly
known, so every solver can be scored against a converged reference solution started from the
*same* noise:

* ``rms@sigma_min`` — RMS error of the state at sigma_min (just before the final Euler step) against
  the reference;
* ``match`` — fraction of final samples that land on the same training point as the reference
  (the ideal denoiser snaps to training points at small sigma).

Solvers: Euler, EDM Heun, Midpoint, Ode3 (log-placed stages, Alg. 3), Ode3 (classical stages), the
paper's NFE-guided hybrid (Alg. 1), and the peer a user would pick instead: DPM-Solver++ 2M / 3M
from diffusers' ``EDMDPMSolverMultistepScheduler`` on the same Karras grid and NFE.
It also reports the data-driven sigma_max (Eq. 7-8) for alpha in {1, 2, 3} next to EDM's 80, and
runs the NFE-guided sampler from each.

Usage:  python tools/bench/sampler_accuracy.py [--out DIR] [--num 500] [--resolution 32] ...
Writes DIR/table.md, DIR/results.json and DIR/sampler_accuracy.png.
Several datasets and the "auto vs best peer" verdict (DIR/verdict.md), e.g.
        python tools/bench/sampler_accuracy.py --samples 128 --skip-sigma-max \
            --datasets photos:32:0 photos:64:0 latentlike:16:0
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from latentdiff.data.photos import random_crops
from latentdiff.diffusion.distances import DistanceStats, data_driven_sigma_max
from latentdiff.diffusion.grids import karras_sigmas
from latentdiff.solvers.dpm import dpm_solver_pp
from latentdiff.solvers import ideal_denoiser, ode_step, sample

DEFAULT_NFES = (7, 11, 15, 19, 23, 27, 35, 51, 79)


# ----------------------------------------------------------------------------------------------
# datasets


def make_dataset(kind: str, num: int, resolution: int, seed: int) -> torch.Tensor:
    """Benchmark data in float64.

    ``photos``: random RGB crops in [-1, 1] from scikit-image's bundled photographs.
    ``latentlike``: 4-channel data at ``resolution`` made from photo crops at 8x the resolution by
    a fixed random 8x8-patch linear encoder (a stand-in for VAE latents: spatially correlated,
    4 channels), scaled to unit standard deviation.
    """
    if kind == "photos":
        return random_crops(num, resolution, seed=seed, dtype=torch.float64)[0]
    if kind == "latentlike":
        x = random_crops(num, resolution * 8, seed=seed, dtype=torch.float64)[0]
        g = torch.Generator().manual_seed(1234)
        w = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) / math.sqrt(3 * 64)
        z = torch.nn.functional.conv2d(x, w, stride=8)
        return (z - z.mean()) / z.std()
    raise SystemExit(f"unknown --data {kind!r}: choose photos or latentlike")


# ----------------------------------------------------------------------------------------------
# solvers: name -> fn(denoise, noise, nfe, sigma_min, sigma_max) -> final samples


def _ours(method, **kw):
    def run(denoise, noise, nfe, smin, smax):
        return sample(denoise, noise, method=method, nfe=nfe, sigma_min=smin, sigma_max=smax, **kw)

    return run


def _dpm(order):
    def run(denoise, noise, nfe, smin, smax):
        return dpm_solver_pp(denoise, noise, nfe=nfe, sigma_min=smin, sigma_max=smax, order=order)

    return run


def solver_table() -> dict:
    table = {
        "Euler": _ours("euler"),
        "EDM Heun": _ours("heun"),
        "Midpoint": _ours("midpoint"),
        "Ode3 (log)": _ours("ode3", placement="log"),
        "Ode3 (classical)": _ours("ode3", placement="classical"),
        "NFE-guided": _ours("nfe-guided"),
        "DPM-Solver++ 2M": _dpm(2),
        "DPM-Solver++ 3M": _dpm(3),
    }
    table["auto"] = _ours("auto")
    return table


class LastCall:
    """Records the input of the last denoiser call: the state at sigma_min before the final Euler step."""

    def __init__(self, denoise):
        self.denoise, self.calls, self.x, self.sigma = denoise, 0, None, None

    def __call__(self, x, sigma):
        self.calls += 1
        self.x, self.sigma = x, float(sigma.reshape(-1)[0])
        return self.denoise(x, sigma)


def reference(denoise, noise, smin, smax, steps):
    """Converged solution: classical (3rd-order) Ode3 on an Eq. 5 grid, state at sigma_min and final."""
    sig = karras_sigmas(steps, smin, smax)[:-1]
    x = noise * smax
    for i in range(len(sig) - 1):
        x = ode_step(denoise, x, float(sig[i]), float(sig[i + 1]), "ode3", placement="classical")
    final = denoise(x, torch.full((x.shape[0],), smin, dtype=x.dtype))
    return x, final


def nearest(points: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    return torch.cdist(points.reshape(points.shape[0], -1), data.reshape(data.shape[0], -1)).argmin(dim=1)


def rms(a, b) -> float:
    return (a - b).square().mean().sqrt().item()


def run(args) -> dict:
    torch.manual_seed(0)
    data = make_dataset(args.data, args.num, args.resolution, args.seed)
    denoise = ideal_denoiser(data)
    g = torch.Generator().manual_seed(args.noise_seed)
    noise = torch.randn((args.samples, *data.shape[1:]), generator=g, dtype=torch.float64)
    smin, smax = args.sigma_min, args.sigma_max
    t0 = time.time()
    ref_x, ref_final = reference(denoise, noise, smin, smax, args.ref_steps)
    half_x, half_final = reference(denoise, noise, smin, smax, args.ref_steps // 2)
    ref_idx = nearest(ref_final, data)
    check = {
        "steps": args.ref_steps,
        "rms_vs_half_steps": rms(ref_x, half_x),
        "match_vs_half_steps": (nearest(half_final, data) == ref_idx).double().mean().item(),
        "seconds": time.time() - t0,
    }
    print(f"reference: classical Ode3, {args.ref_steps} steps; vs {args.ref_steps // 2} steps: "
          f"rms@sigma_min {check['rms_vs_half_steps']:.2e}, match {check['match_vs_half_steps']:.3f}", flush=True)

    results = {}
    table = solver_table()
    if getattr(args, "solvers", None):
        unknown = [n for n in args.solvers if n not in table]
        if unknown:
            raise SystemExit(f"unknown --solvers {unknown}; choose from {list(table)}")
        table = {n: fn for n, fn in table.items() if n in args.solvers}
    for name, fn in table.items():
        rows = []
        for nfe in args.nfe:
            rec = LastCall(denoise)
            final = fn(rec, noise, nfe, smin, smax)
            if rec.calls > nfe:
                raise RuntimeError(f"{name} used {rec.calls} evaluations for NFE {nfe}")
            rows.append({
                "nfe": nfe,
                "used": rec.calls,
                "rms_sigma_min": rms(rec.x, ref_x),
                "rms_final": rms(final, ref_final),
                "match": (nearest(final, data) == ref_idx).double().mean().item(),
            })
        results[name] = rows
        print(f"  {name:18s} " + " ".join(f"{r['rms_sigma_min']:.1e}" for r in rows), flush=True)

    # data-driven sigma_max (Eq. 7-8) vs EDM's 80, NFE-guided from each
    stats = DistanceStats.from_tensor(data)
    sigma_max_rows = []
    choices = [("EDM", smax)] + [(f"data a={a:g}", data_driven_sigma_max(stats, a)) for a in (1.0, 2.0, 3.0)]
    if getattr(args, "skip_sigma_max", False):
        choices = []
    for label, s_max in choices:
        own_x, own_final = reference(denoise, noise, smin, s_max, args.ref_steps)
        own_idx = nearest(own_final, data)
        for nfe in args.nfe:
            rec = LastCall(denoise)
            final = sample(rec, noise, method="nfe-guided", nfe=nfe, sigma_min=smin, sigma_max=s_max)
            idx = nearest(final, data)
            sigma_max_rows.append({
                "sigma_max": label, "value": s_max, "nfe": nfe, "used": rec.calls,
                "rms_sigma_min_own_ref": rms(rec.x, own_x),
                "match_own_ref": (idx == own_idx).double().mean().item(),
                "match_edm_ref": (idx == ref_idx).double().mean().item(),
                "distinct_points": int(idx.unique().numel()),
            })
    return {
        "config": vars(args) | {"nfe": list(args.nfe)},
        "data_shape": list(data.shape),
        "distance_stats": {"mu_d": stats.mu_d, "sigma_d": stats.sigma_d},
        "reference_check": check,
        "solvers": results,
        "sigma_max": sigma_max_rows,
    }


def markdown(res: dict) -> str:
    nfes = res["config"]["nfe"]
    out = []
    c = res["config"]
    out.append(f"Data: {c['data']} {tuple(res['data_shape'])}, {c['samples']} samples, sigma in "
               f"[{c['sigma_min']}, {c['sigma_max']}], rho 7. Reference: classical Ode3, {c['ref_steps']} steps "
               f"(vs half the steps: rms {res['reference_check']['rms_vs_half_steps']:.1e}, "
               f"match {res['reference_check']['match_vs_half_steps']:.3f}).\n")
    out.append("RMS error at sigma_min vs the converged reference (lower is better):\n")
    out.append("| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    out.append("|---|" + "---|" * len(nfes))
    for name, rows in res["solvers"].items():
        out.append(f"| {name} | " + " | ".join(f"{r['rms_sigma_min']:.2e}" for r in rows) + " |")
    out.append("\nFraction of samples landing on the reference's training point (higher is better):\n")
    out.append("| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    out.append("|---|" + "---|" * len(nfes))
    for name, rows in res["solvers"].items():
        out.append(f"| {name} | " + " | ".join(f"{r['match']:.3f}" for r in rows) + " |")
    out.append("\nEvaluations actually used:\n")
    out.append("| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    out.append("|---|" + "---|" * len(nfes))
    for name, rows in res["solvers"].items():
        out.append(f"| {name} | " + " | ".join(str(r["used"]) for r in rows) + " |")
    ds = res["distance_stats"]
    if not res["sigma_max"]:
        return "\n".join(out)
    out.append(f"\nData-driven sigma_max (wsnr.txt Eq. 7-8): mu_d = {ds['mu_d']:.1f}, sigma_d = {ds['sigma_d']:.1f}. "
               "NFE-guided sampler; rms/match against the converged solution from the same sigma_max, and match "
               "against the EDM (sigma_max = 80) reference:\n")
    out.append("| sigma_max | value | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    out.append("|---|---|" + "---|" * len(nfes))
    by = {}
    for r in res["sigma_max"]:
        by.setdefault((r["sigma_max"], r["value"]), []).append(r)
    for (label, value), rows in by.items():
        cells = [f"{r['rms_sigma_min_own_ref']:.1e} / {r['match_own_ref']:.2f} / {r['match_edm_ref']:.2f}" for r in rows]
        out.append(f"| {label} | {value:.2f} | " + " | ".join(cells) + " |")
    out.append("\n(cells: rms@sigma_min own ref / match own ref / match EDM-80 ref)")
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    # matplotlib only for the figure: a second of import time the measurement does not need
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in res["solvers"].items():
        n = [r["nfe"] for r in rows]
        axes[0].plot(n, [max(r["rms_sigma_min"], 1e-16) for r in rows], marker="o", label=name)
        axes[1].plot(n, [r["match"] for r in rows], marker="o", label=name)
    axes[0].set_xscale("log"), axes[0].set_yscale("log")
    axes[0].set_xlabel("NFE"), axes[0].set_ylabel("RMS error at sigma_min vs reference")
    axes[1].set_xscale("log"), axes[1].set_xlabel("NFE"), axes[1].set_ylabel("fraction on reference's training point")
    axes[0].legend(fontsize=8)
    axes[0].grid(True, which="both", alpha=0.3), axes[1].grid(True, alpha=0.3)
    fig.suptitle(f"Ideal-denoiser sampler accuracy ({res['config']['data']}, {tuple(res['data_shape'][1:])})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PEERS = ("EDM Heun", "NFE-guided", "DPM-Solver++ 2M", "DPM-Solver++ 3M")


def verdict(all_res: dict, candidate: str = "auto", peers=PEERS) -> str:
    """Markdown: the candidate vs the best peer at each NFE on each dataset, both metrics.

    A cell is "win" when the candidate is strictly better, "tie" when equal (rms compared at 3
    significant digits, match exactly), "LOSS" otherwise; the best peer is named.
    """
    lines = [f"\n### {candidate} vs the best of {{{', '.join(peers)}}}\n",
             "| dataset | NFE | rms@sigma_min: auto / best peer | | match: auto / best peer | |",
             "|---|---|---|---|---|---|"]
    short = {"EDM Heun": "Heun", "NFE-guided": "NFE-g", "DPM-Solver++ 2M": "2M", "DPM-Solver++ 3M": "3M"}
    wins = {"rms": [0, 0, 0], "match": [0, 0, 0]}
    for label, res in all_res.items():
        sol = res["solvers"]
        if candidate not in sol:
            continue
        present = [p for p in peers if p in sol]
        for i, row in enumerate(sol[candidate]):
            a_rms, a_m = float(f"{row['rms_sigma_min']:.3g}"), row["match"]
            p_rms = min(present, key=lambda p: sol[p][i]["rms_sigma_min"])
            p_m = max(present, key=lambda p: sol[p][i]["match"])
            b_rms, b_m = float(f"{sol[p_rms][i]['rms_sigma_min']:.3g}"), sol[p_m][i]["match"]
            v_rms = "win" if a_rms < b_rms else ("tie" if a_rms == b_rms else "LOSS")
            v_m = "win" if a_m > b_m else ("tie" if a_m == b_m else "LOSS")
            for key, v in (("rms", v_rms), ("match", v_m)):
                wins[key][("win", "tie", "LOSS").index(v)] += 1
            lines.append(f"| {label} | {row['nfe']} | {a_rms:.2e} / {b_rms:.2e} ({short.get(p_rms, p_rms)}) | {v_rms} "
                         f"| {a_m:.3f} / {b_m:.3f} ({short.get(p_m, p_m)}) | {v_m} |")
    lines.append(f"\nrms: {wins['rms'][0]} wins, {wins['rms'][1]} ties, {wins['rms'][2]} losses; "
                 f"match: {wins['match'][0]} wins, {wins['match'][1]} ties, {wins['match'][2]} losses.")
    return "\n".join(lines)


def _parse_dataset(spec: str):
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in ("photos", "latentlike"):
        raise SystemExit(f"--datasets entry {spec!r}: use KIND:RESOLUTION:SEED, e.g. photos:32:0 or latentlike:16:0")
    return parts[0], int(parts[1]), int(parts[2])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/sampler_accuracy", help="output directory")
    p.add_argument("--data", default="photos", choices=["photos", "latentlike"])
    p.add_argument("--num", type=int, default=500, help="dataset size (crops)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--samples", type=int, default=64, help="number of generated samples")
    p.add_argument("--noise-seed", type=int, default=1)
    p.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_NFES))
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--ref-steps", type=int, default=512, help="steps of the classical-Ode3 reference")
    p.add_argument("--datasets", nargs="+", default=None, metavar="KIND:RES:SEED",
                   help="run several datasets (e.g. photos:32:0 photos:64:0 latentlike:16:0; overrides --data, "
                        "--resolution, --seed), one subdirectory each, and print the auto-vs-best-peer verdict")
    p.add_argument("--solvers", nargs="+", default=None, help="only these solvers (names as in the table)")
    p.add_argument("--skip-sigma-max", action="store_true", help="skip the data-driven sigma_max section")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.datasets:
        all_res = {}
        for spec in args.datasets:
            kind, res_, seed = _parse_dataset(spec)
            sub = argparse.Namespace(**{**vars(args), "data": kind, "resolution": res_, "seed": seed, "datasets": None})
            d = out / f"{kind}{res_}_seed{seed}"
            d.mkdir(parents=True, exist_ok=True)
            print(f"== {spec}", flush=True)
            r = run(sub)
            md = markdown(r)
            (d / "table.md").write_text(md + "\n")
            (d / "results.json").write_text(json.dumps(r, indent=1))
            plot(r, d / "sampler_accuracy.png")
            print(md, flush=True)
            all_res[f"{kind} {res_}px seed {seed}"] = r
        v = verdict(all_res)
        (out / "verdict.md").write_text(v + "\n")
        print(v)
        print(f"\nwrote {out}/*/table.md, results.json, sampler_accuracy.png and {out / 'verdict.md'}")
        return all_res
    res = run(args)
    md = markdown(res)
    (out / "table.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "sampler_accuracy.png")
    print(md)
    print(f"\nwrote {out / 'table.md'}, {out / 'results.json'}, {out / 'sampler_accuracy.png'}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
