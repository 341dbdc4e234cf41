#!/usr/bin/env python
"""Metric vs EMA length from one run (EDM2 Fig. 1 style): post-hoc EMA reconstructions for a list of σ_rel,
each sampled and scored with an offline metric, plotted against σ_rel.

    python tools/bench/phema_sweep.py RUN --out DIR [--sigma-rels 0.02 0.05 ...] [--num 512] [--nfe 15]

1. ``latentdiff-reconstruct-ema RUN --sigma-rel ... --out DIR/exports`` (one pass over the snapshots);
2. every export: seeds 0..num-1 through ``latentdiff.solvers.generate.generate_latents`` (the sampler
   ``latentdiff-sample`` runs, same seeds, same labels), in model space;
3. the metric: **FD-lat**, the Fréchet distance between Gaussians fitted to a fixed random orthonormal
   projection (``--proj-dim``, seed 0) of the generated model-space latents and of the training latents
   (posterior mean + std·ε, fixed seed, through the export's normalization) -- the offline distance of
   ``tools/bench/sampler_study.py``.  **Not FID**, not comparable with published numbers; it ranks the
   EMA lengths of this run.  The estimator's own floor (the training set, half A vs half B) is reported;
   the raw weights and the fixed-rate EMAs of the run's newest export are drawn as horizontal lines.

Outputs: ``DIR/sweep.json`` (every number, with the reconstruction fit errors), ``DIR/sweep.md`` and
``DIR/sweep.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from latentdiff.cli.reconstruct_ema import _parser as reconstruct_parser
from latentdiff.cli.reconstruct_ema import run as reconstruct_run
from latentdiff.contracts.export import load_export
from latentdiff.data.reader import LatentShardDataset, sample_latent
from latentdiff.metrics.frechet import frechet_distance
from latentdiff.solvers.generate import generate_latents
from latentdiff.solvers.registry import DEFAULT_SAMPLER

DEFAULT_SIGMAS = [0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25]


def training_latents(dataset: str, normalization, seed: int = 0) -> torch.Tensor:
    ds = LatentShardDataset(dataset, 64, rank=0, world_size=1, num_workers=0, shuffle=False, verify="none")
    ds.set_epoch(0)
    g = torch.Generator().manual_seed(seed)
    out = [normalization.to_model(sample_latent(mean, std, g)) for mean, std, _, _ in ds]
    return torch.cat(out).float()


class FDLat:
    """Fréchet distance of a fixed random orthonormal projection (QR of a seeded Gaussian), float64."""

    def __init__(self, reference: torch.Tensor, dim: int, seed: int = 0):
        d_in = reference[0].numel()
        g = torch.Generator().manual_seed(seed)
        self.q, _ = torch.linalg.qr(torch.randn(d_in, min(dim, d_in), generator=g, dtype=torch.float64))
        self.ref = self._gauss(reference)
        f = self._proj(reference)
        half = f.shape[0] // 2
        self.floor = self._fd(self._moments(f[:half]), self._moments(f[half:]))

    def _proj(self, z: torch.Tensor) -> np.ndarray:
        return (z.reshape(z.shape[0], -1).double() @ self.q).numpy()

    @staticmethod
    def _moments(f: np.ndarray):
        return f.mean(axis=0), np.cov(f, rowvar=False)

    def _gauss(self, z):
        return self._moments(self._proj(z))

    @staticmethod
    def _fd(a, b) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(frechet_distance(*a, *b))

    def __call__(self, z: torch.Tensor) -> float:
        return self._fd(self._gauss(z), self.ref)


@torch.no_grad()
def latents_of(export: Path, weights: str, args) -> torch.Tensor:
    den, loaded = load_export(export, weights=weights)
    meta = loaded.meta
    out = []
    for i in range(0, args.num, args.batch):
        seeds = list(range(i, min(i + args.batch, args.num)))
        x, _ = generate_latents(den, seeds, meta.shape, num_classes=meta.num_classes, method=args.solver,
                                nfe=args.nfe, sigma_min=meta.schedule.sigma_min, sigma_max=meta.schedule.sigma_max,
                                null_label=meta.null_label, pad_to=args.batch)
        out.append(x.float())
    return torch.cat(out)


def comparisons(run: Path, explicit: str | None) -> tuple[Path | None, list[str]]:
    """The export whose raw and fixed-rate EMA weights are drawn as lines, and its weight choices."""
    exp = Path(explicit) if explicit else max((run / "export").glob("step_*"), default=None)
    if exp is None or not (exp / "model.json").is_file():
        return None, []
    w = json.loads((exp / "model.json").read_text())["weights"]
    return exp, ["raw"] + sorted(w.get("ema", {}), key=float)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["sigma_rel"] for r in result["sweep"]]
    ax.plot(xs, [r["fd_lat"] for r in result["sweep"]], "o-", label="post-hoc EMA (reconstructed)")
    for i, (name, v) in enumerate(result["baselines"].items()):
        ax.axhline(v, ls="--", color=f"C{i + 1}", label=f"{name} ({result['baselines_export_step']} steps)")
    ax.axhline(result["floor"], ls=":", color="gray", label="estimator floor (data A vs B)")
    ax.set_xlabel(r"EMA length $\sigma_{rel}$")
    ax.set_ylabel("FD-lat (not FID)")
    ax.set_title(f"{result['run_name']}: {result['images']} images, NFE {result['nfe']}, {result['num']} samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [f"# FD-lat vs sigma_rel ({result['run_name']}, {result['images']} images)", "",
             (f"{result['num']} samples, solver {result['solver']}, NFE {result['nfe']}, projection dim "
              f"{result['proj_dim']}; FD-lat is NOT FID.  Estimator floor: {result['floor']:.4g}."), "",
             "| sigma_rel | gamma | fit error | FD-lat |", "|---|---|---|---|"]
    lines += [f"| {r['sigma_rel']:.3g} | {r['gamma']:.3f} | {r['fit_rel_error']:.2e} | {r['fd_lat']:.4g} |"
              for r in result["sweep"]]
    lines += ["", "| baseline | FD-lat |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in result["baselines"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--sigma-rels", type=float, nargs="+", default=DEFAULT_SIGMAS)
    p.add_argument("--end-images", type=int, default=None, help="end point (default: the last snapshot)")
    p.add_argument("--num", type=int, default=512, help="samples per sigma_rel")
    p.add_argument("--nfe", type=int, default=15)
    p.add_argument("--solver", default=DEFAULT_SAMPLER)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--proj-dim", type=int, default=64)
    p.add_argument("--compare-export", default=None, help="default: the newest RUN/export/step_*")
    args = p.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = ["--sigma-rel", *map(str, args.sigma_rels), "--out", str(out / "exports")]
    rec += ["--end-images", str(args.end_images)] if args.end_images else []
    infos = reconstruct_run(reconstruct_parser().parse_args([str(run), *rec]))
    meta = load_export(infos[0]["export"])[1].meta
    fd = FDLat(training_latents(meta.train_config["dataset"], meta.normalization), args.proj_dim)
    sweep = []
    for info in infos:
        sweep.append({k: info[k] for k in ("sigma_rel", "gamma", "images", "fit_rel_error", "export")})
        sweep[-1]["fd_lat"] = fd(latents_of(Path(info["export"]), "ema", args))
        print(f"sigma_rel {info['sigma_rel']:.3g}: FD-lat {sweep[-1]['fd_lat']:.4g}", flush=True)
    exp, choices = comparisons(run, args.compare_export)
    baselines = {("raw weights" if c == "raw" else f"EMA rate {c}"): fd(latents_of(exp, c, args)) for c in choices}
    result = {"run_name": run.name, "images": infos[0]["images"], "num": args.num, "nfe": args.nfe,
              "solver": args.solver, "proj_dim": args.proj_dim, "floor": fd.floor, "sweep": sweep,
              "baselines": baselines, "baselines_export": str(exp) if exp else None,
              "baselines_export_step": json.loads((exp / "model.json").read_text())["step"] if exp else None}
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    (out / "sweep.md").write_text(markdown(result))
    plot(result, out / "sweep.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
