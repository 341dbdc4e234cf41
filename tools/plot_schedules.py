#!/usr/bin/env python
"""The paper's pictures for any dataset statistics (PNG).

* ``sigma_densities.png`` — training noise densities in log sigma: EDM log-normal vs the WSNR-aligned
  one (wsnr.txt Fig. 1, left);
* ``wsnr_vs_sigma.png`` — WSNR(sigma) of several data sets / resolutions (Fig. 2, right), with the
  WSNR-equivalent sigma of each marked at the EDM median sigma;
* ``distances.png`` — the distribution of each point's mean squared distance to the others (Eq. 6)
  with the upper-bound proxies mu_d + alpha sigma_d, and p_ub(sigma) of Eq. 8 (Fig. 6).

Inputs: one or more encoded datasets (``--dataset DIR``, uses ``stats.json``/``stats.npz`` and reads
up to ``--max-points`` posterior means for the distance histogram), and/or ``--photos`` (random crops
of scikit-image's bundled photographs at ``--resolutions``, computed on the fly; no download).

    python tools/plot_schedules.py --photos --resolutions 32 64 128 --out figs/
    python tools/plot_schedules.py --dataset data/imagenet256-sdvae --normalization sd --out figs/
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from latentdiff.contracts.manifest import load_manifest
from latentdiff.data.photos import random_crops
from latentdiff.data.reader import LatentShardDataset
from latentdiff.data.stats import DatasetStats
from latentdiff.training.schedule import make_normalization, model_space_power
from latentdiff.diffusion.grids import EDM_SIGMA_MAX
from latentdiff.diffusion.distances import DistanceStats, p_upper_bound
from latentdiff.diffusion.noise import LogNormalSigma, wsnr_aligned
from latentdiff.diffusion.spectral import power_spectrum, wsnr, wsnr_equivalent_sigma


plt.switch_backend("Agg")  # files only, no display

class Source:
    """One data set: a name, its mean power spectrum, per-point distances and (mu_d, sigma_d, N)."""

    def __init__(self, name, power, d2_points, moments, n):
        self.name, self.power, self.d2_points, self.moments, self.n = name, power, d2_points, moments, n


def photo_sources(resolutions, num, seed) -> list[Source]:
    out = []
    for r in resolutions:
        x, _ = random_crops(num, r, seed=seed + r, dtype=torch.float64)
        st = DistanceStats.from_tensor(x)
        out.append(Source(f"photos RGB {r}x{r}", power_spectrum(x), st.per_point(x), st.moments(), x.shape[0]))
    return out


def dataset_sources(root: Path, normalization: str, sigma_target: float, max_points: int) -> tuple[list[Source], torch.Tensor]:
    """(the dataset's model-space latents as a Source, its 64x64 RGB reference spectrum)."""
    stats = DatasetStats.load(root)
    norm = make_normalization(normalization, load_manifest(root), stats, sigma_target)
    scale = torch.tensor(norm.scale, dtype=torch.float64)
    dist = stats.distance_stats()
    ds = LatentShardDataset(root, 64, rank=0, world_size=1, num_workers=0, shuffle=False, verify="none")
    pts = []
    n_read = 0
    for mean, _, _, _ in ds:
        pts.append(dist.per_point(mean.double(), scale))
        n_read += mean.shape[0]
        if n_read >= max_points:
            break
    c, h, w = stats.sample_shape
    src = Source(f"{root.name} latents {c}x{h}x{w} ({norm.kind})", model_space_power(stats, norm), torch.cat(pts),
                 dist.moments(scale), stats.n)
    return [src], stats.rgb64_power


def plot_all(sources: list[Source], reference: Source | None, out: Path, p_mean: float, p_std: float,
             include_dc: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    base = LogNormalSigma(p_mean, p_std)
    ref = reference or sources[0]
    summary = {"reference": ref.name, "include_dc": include_dc, "sources": {}}

    # Fig. 1 left: densities of ln(sigma)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    grid = torch.linspace(math.log(1e-4), math.log(500), 600, dtype=torch.float64)
    ax.plot(grid, torch.exp(base.log_pdf(torch.exp(grid))), "k--", label=f"EDM log-normal ({p_mean}, {p_std}) on {ref.name}")
    for s in sources:
        al = wsnr_aligned(base, ref.power, s.power, include_dc=include_dc)
        ax.plot(grid, torch.exp(al.log_pdf(torch.exp(grid))), label=f"WSNR-aligned: {s.name} (P_mean {al.p_mean:+.2f})")
        summary["sources"][s.name] = {"aligned_p_mean": al.p_mean, "n": s.n, "mu_d": s.moments[0], "sigma_d": s.moments[1]}
    ax.set_xlabel("ln sigma"), ax.set_ylabel("density of ln sigma"), ax.legend(fontsize=7)
    ax.set_title("Training noise densities (wsnr.txt Fig. 1 left)")
    fig.tight_layout(), fig.savefig(out / "sigma_densities.png", dpi=110), plt.close(fig)

    # Fig. 2: WSNR vs sigma
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sig = torch.logspace(-3, math.log10(EDM_SIGMA_MAX), 200, dtype=torch.float64)
    s_med = math.exp(p_mean)
    for s in [ref] + [x for x in sources if x is not ref]:
        line, = ax.plot(sig, wsnr(s.power, sig, include_dc=include_dc), label=s.name)
        s_eq = float(wsnr_equivalent_sigma(s_med, ref.power, s.power, include_dc=include_dc))
        ax.plot([s_eq], [float(wsnr(s.power, s_eq, include_dc=include_dc))], "o", color=line.get_color())
    ax.axvline(s_med, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("sigma"), ax.set_ylabel("WSNR (Eq. 2)")
    ax.set_title(f"WSNR vs sigma (Fig. 2); dots: WSNR-equivalent of sigma={s_med:.2f} on the reference", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / "wsnr_vs_sigma.png", dpi=110), plt.close(fig)

    # Fig. 6: distances and p_ub
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for s in sources:
        mu, sd = s.moments
        line = axes[0].hist(s.d2_points.numpy(), bins=60, alpha=0.5, density=True, label=s.name)
        for a in (1, 2, 3):
            proxy = mu + a * sd
            cover = float((s.d2_points <= proxy).double().mean())
            axes[0].axvline(proxy, ls="--", lw=0.8, color="k")
            summary["sources"][s.name][f"coverage_alpha{a}"] = cover
            summary["sources"][s.name][f"sigma_max_alpha{a}"] = math.sqrt(proxy)
            sgrid = torch.logspace(-2, math.log10(EDM_SIGMA_MAX * 2), 300, dtype=torch.float64)
            axes[1].plot(torch.log(sgrid), p_upper_bound(sgrid, proxy, s.n), label=f"{s.name}, alpha={a} (sigma_max {math.sqrt(proxy):.1f})")
    axes[0].set_xlabel("mean squared distance to the other points (Eq. 6)"), axes[0].set_ylabel("density")
    axes[0].legend(fontsize=7), axes[0].set_title("Distance distribution; dashed: mu_d + alpha sigma_d, alpha = 1, 2, 3")
    axes[1].set_xlabel("ln sigma"), axes[1].set_ylabel("p_ub (Eq. 8)"), axes[1].set_yscale("log")
    axes[1].legend(fontsize=6), axes[1].set_title("Softmax-weight upper bound (Fig. 6 right)")
    fig.tight_layout(), fig.savefig(out / "distances.png", dpi=110), plt.close(fig)
    (out / "schedules.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", action="append", default=[], help="encoded dataset directory (repeatable)")
    p.add_argument("--normalization", default="channel", choices=["channel", "sd"], help="model space of --dataset")
    p.add_argument("--sigma-target", type=float, default=0.5)
    p.add_argument("--photos", action="store_true", help="add scikit-image photo crops at --resolutions")
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--num", type=int, default=400, help="photo crops per resolution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-points", type=int, default=5000, help="points read for the distance histogram")
    p.add_argument("--reference", default="rgb64", help="rgb64 (the first dataset's 64x64 RGB spectrum), photos64, or first")
    p.add_argument("--p-mean", type=float, default=-1.2)
    p.add_argument("--p-std", type=float, default=1.2)
    p.add_argument("--no-dc", action="store_true", help="DC-free WSNR (Eq. 2 without the zero frequency)")
    p.add_argument("--out", default="figs", help="output directory")
    args = p.parse_args(argv)
    if not args.dataset and not args.photos:
        p.error("give --dataset DIR and/or --photos")
    sources: list[Source] = []
    reference = None
    for d in args.dataset:
        srcs, rgb64 = dataset_sources(Path(d), args.normalization, args.sigma_target, args.max_points)
        sources += srcs
        if reference is None and rgb64 is not None and args.reference == "rgb64":
            reference = Source(f"{Path(d).name} RGB 64x64", rgb64, torch.empty(0), (float("nan"),) * 2, 0)
    if args.photos:
        sources += photo_sources(args.resolutions, args.num, args.seed)
        if reference is None and args.reference in ("rgb64", "photos64"):
            reference = next((s for s in sources if s.name.endswith("64x64")), None)
    summary = plot_all(sources, reference, Path(args.out), args.p_mean, args.p_std, not args.no_dc)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}/sigma_densities.png, wsnr_vs_sigma.png, distances.png, schedules.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
