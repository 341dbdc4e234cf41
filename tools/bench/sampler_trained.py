#!/usr/bin/env python
"""Sampler accuracy on a trained model against a long-run reference.

    python tools/bench/sampler_trained.py --export RUN/export/step_X [--samples 32] [--ref-steps 256]
                                          [--nfe 7 11 15 19 23 27 35 51 79] [--out DIR]

The ideal denoiser (``sampler_accuracy.py``) is piecewise constant in the limit of small sigma; a
trained network is smooth.  Here every solver integrates the probability-flow ODE (wsnr.txt Eq. 1) of
the export's EMA denoiser from the same noise (seeds 0..N-1, one generator per seed as the sampling CLI
draws it; class labels cycle over the classes, cfg = 1) and is compared with a converged reference:
classical Ode3 with ``--ref-steps`` steps, checked against half as many.  Reported per NFE: the RMS
error of the state at sigma_min (the input of the final Euler evaluation) in model space, and the
measured convergence order (slope of log error vs log NFE over the last points).  sigma range: the
export's [sigma_min, sigma_max] (``--sigma-max 80`` for EDM's).

Writes DIR/table.md, DIR/results.json and DIR/sampler_trained.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from latentdiff.contracts.export import load_export
from latentdiff.sampling.options import resolve_sigma_max

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_convergence import convergence_study, default_methods, markdown, plot  # noqa: E402

DEFAULT_NFES = (7, 11, 15, 19, 23, 27, 35, 51, 79)
DEFAULT_SOLVERS = ("EDM Heun", "NFE-guided", "DPM-Solver++ 2M", "DPM-Solver++ 3M", "auto")


def run(args) -> dict:
    torch.set_grad_enabled(False)
    net, loaded = load_export(args.export, weights=args.weights)
    meta = loaded.meta
    shape, num_classes = meta.shape, meta.num_classes
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in range(args.samples)])
    noise = noise.double() if args.float64 else noise
    net = net.double() if args.float64 else net
    labels = torch.arange(args.samples) % num_classes if num_classes else None

    def denoise(x, sigma):
        return net(x, sigma, labels) if labels is not None else net(x, sigma)

    sigma_min = meta.schedule.sigma_min if args.sigma_min is None else args.sigma_min
    sigma_max = resolve_sigma_max(args.sigma_max, meta.schedule.sigma_max)
    methods = {k: v for k, v in default_methods().items() if k in args.solvers}
    missing = [s for s in args.solvers if s not in methods]
    if missing:
        raise SystemExit(f"unknown --solvers {missing}; choose from {list(default_methods())}")
    res = convergence_study(denoise, noise, methods=methods, nfes=args.nfe, sigma_min=sigma_min, sigma_max=sigma_max,
                            ref_steps=args.ref_steps, last=args.last)
    res["setup"] = {"export": str(args.export), "weights": loaded.weights_file, "samples": args.samples,
                    "shape": list(shape), "sigma_min": sigma_min, "sigma_max": sigma_max,
                    "dtype": "float64" if args.float64 else "float32"}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="an export directory (RUN/export/step_X)")
    p.add_argument("--weights", default="ema", help="ema (largest rate), an EMA rate, or raw")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_NFES))
    p.add_argument("--solvers", nargs="+", default=list(DEFAULT_SOLVERS))
    p.add_argument("--sigma-min", type=float, default=None, help="default: the export's")
    p.add_argument("--sigma-max", default="80", help="edm|vp|data|VALUE (default 80, EDM's)")
    p.add_argument("--ref-steps", type=int, default=256, help="classical-Ode3 steps of the reference")
    p.add_argument("--last", type=int, default=3, help="points of the order fit")
    p.add_argument("--float64", action="store_true", help="run network and solvers in float64 (lower error floor)")
    p.add_argument("--out", default="bench_out/sampler_trained")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    key = f"trained model ({Path(args.export).name}, {res['setup']['dtype']})"
    md = markdown({key: res}, args.nfe)
    (out / "table.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(res, indent=1))
    plot({key: res}, out / "sampler_trained.png")
    print(md)
    print(f"\nwrote {out}/table.md, results.json, sampler_trained.png")
    return res


if __name__ == "__main__":
    main()
