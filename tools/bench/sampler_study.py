#!/usr/bin/env python
"""Sampler study on a trained export: distribution distance vs NFE for every solver and sigma_max
choice (the shape of wsnr.txt Table 3/4 and Fig. 7).

For one export (``--export DIR``, or ``--tiny`` to encode a small dataset and train one on the CPU
first) the tool generates the same seeds with every solver at every NFE budget, for each sigma_max
choice (``data`` = the export's data-driven value, wsnr.txt Eq. 7-8; ``edm`` = 80; ``vp`` = sigma(t=1)
~ 152), and compares each sample set with the training data.

Solvers: Euler, EDM Heun, Midpoint, Ode3 (wsnr.txt Table 5, Alg. 3), the NFE-guided hybrid
(Alg. 1-2), ``auto`` when ``latentdiff.solvers.SAMPLERS`` has it, and the peer a user would pick
instead, DPM-Solver++ 2M/3M (diffusers' ``EDMDPMSolverMultistepScheduler`` through
``latentdiff.solvers.dpm``), all on the same Karras grid parameters, the same noise and the same labels
(one generator per seed, exactly as ``latentdiff-sample`` draws them, so a row of the table can be
reproduced with the CLI).  A fixed method spends at most the budget (e.g. Heun with an even budget
leaves one evaluation unused); cells show the NFE actually used in parentheses when it is smaller.

Metric
------
* **FID** (Inception-v3 pool features through ``latentdiff.fid``, decoded uint8 images vs the
  dataset's posterior means decoded by the same VAE) when Inception weights are available
  (``--inception-weights PATH`` or torch-fidelity's cache).  With fewer than 50k samples it is *not*
  comparable with published numbers; it ranks the configurations of this study only.
* Otherwise, and always in addition: **FD-lat** -- the Fréchet distance between Gaussians fitted to a
  fixed random orthonormal projection (``--proj-dim``, default 64, seed 0) of the *model-space latents*
  (the sampler's output before decoding) and of the training latents (posterior mean + std * eps with a
  fixed seed, mapped by the export's normalization: exactly what the model was trained on).
  **This is NOT FID** and not comparable with any published number.  Why this space: (1) it is the space
  the ODE is solved in, so solver error shows up without a decoder in between; (2) the reference is
  exactly the training distribution, no extra network is needed (the CI VAE is randomly initialized, so
  pixel-space features of its decodes would mostly measure the decoder); (3) a few hundred reference
  points cannot estimate a full (C*H*W)-dimensional covariance (rank-deficient, and the estimator bias
  grows like d^2/N), while a random orthonormal projection keeps squared distances in expectation
  (Johnson-Lindenstrauss) and mixes every frequency, so loss of detail still counts.  The estimator's
  own noise is shown as the ``data half A vs half B`` floor.
* **RMS-to-ODE** -- RMS difference (model space) between each sample and a converged solution of the
  same ODE from the same noise (EDM Heun with ``--ref-steps`` levels): a low-variance measure of pure
  solver error.  Its FD-lat is the "ODE limit" every solver converges to.

Outputs: ``OUT/study.md`` (tables), ``OUT/study.json`` (every number), ``OUT/study.png`` (FD vs NFE,
one panel per sigma_max, Fig. 7 style).

Usage::

    python tools/bench/sampler_study.py --tiny --out bench_out/sampler_study
    python tools/bench/sampler_study.py --export RUN/export/step_X [--dataset DATA] --num 1024 --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from latentdiff.contracts.export import load_export
from latentdiff.data.encode import EncodeConfig, encode_dataset
from latentdiff.contracts.manifest import load_manifest
from latentdiff.data.shards import iter_tar, npy_load
from latentdiff.data.synthetic import make_tiny_vae, write_image_folder
from latentdiff.metrics.frechet import compute_statistics, frechet_distance
from latentdiff.metrics.inception import load_feature_extractor
from latentdiff.sampling.options import resolve_sigma_max
from latentdiff.solvers import SAMPLERS, sample
from latentdiff.solvers.dpm import dpm_solver_pp
from latentdiff.utils.errors import FIDError
from latentdiff.vae.decode import decode_to_uint8, load_vae_for

REPO = Path(__file__).resolve().parents[2]
DEFAULT_NFES = (5, 7, 9, 11, 15, 19, 25, 35)
SIGMA_CHOICES = ("data", "edm", "vp")


# ----------------------------------------------------------------------------------------------
# a tiny trained export


def build_tiny(root: Path, steps: int, log=print) -> Path:
    """Encode 288 photo crops (3 classes, +flips) with a tiny random AutoencoderKL, train the tiny-cpu
    preset for ``steps`` steps (EDM log-normal noise, micro-batch 32) and export it.  Reuses what exists."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    if not (data / "dataset.json").is_file():
        log(f"encoding a tiny dataset into {data}")
        vae = make_tiny_vae(root / "vae")
        write_image_folder(root / "images", classes=3, per_class=96, size_range=(40, 80), seed=0)
        encode_dataset(EncodeConfig(inputs=[str(root / "images")], output=str(data), resolution=32, vae=str(vae),
                                    flip=True, shard_size=64, batch_size=32, workers=0, progress=False))
    export = root / "run" / "export" / f"step_{steps:08d}"
    if (export / "model.json").is_file():
        return export
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "latentdiff.train", "--config", "tiny-cpu", "--dataset", str(data),
           "--run-dir", str(root / "run"), "--duration-images", str(32 * steps), "--checkpoint-every", str(steps),
           "--heldout-batch", "0", "--noise", "edm", "--micro-batch", "32", "--lr", "2e-3",
           "--warmup-images", "2048", "--ema-rates", "[0.99, 0.995]", "--log-every", "100",
           "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json")]
    log(f"training the tiny-cpu preset for {steps} steps ...")
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"training failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    log(f"  trained in {time.time() - t0:.0f} s")
    if not (export / "model.json").is_file():  # the trainer exports when it reaches the duration
        p = subprocess.run([sys.executable, "-m", "latentdiff.cli.export", str(root / "run")], env=env, capture_output=True,
                           text=True, cwd=REPO)
        if p.returncode != 0:
            raise SystemExit(f"export failed:\n{p.stderr[-3000:]}")
    return export


# ----------------------------------------------------------------------------------------------
# data and features


def dataset_latents(root: Path, normalization, seed: int = 0):
    """(model-space sampled latents (N, C, H, W) float32, raw posterior means, labels) of every shard."""
    manifest = load_manifest(root)
    means, stds, labels = [], [], []
    for sh in manifest.shards:
        with open(root / sh.name, "rb") as f:
            for smp in iter_tar(f, sh.name):
                means.append(npy_load(smp["mean.npy"]).astype(np.float32))
                stds.append(npy_load(smp["std.npy"]).astype(np.float32))
                labels.append(int(smp["cls"].decode()) if "cls" in smp else -1)
    mean, std = torch.from_numpy(np.stack(means)), torch.from_numpy(np.stack(stds))
    g = torch.Generator().manual_seed(seed)
    sampled = mean + std * torch.randn(mean.shape, generator=g)
    return normalization.to_model(sampled), mean, torch.tensor(labels)


class Projection:
    """Fixed random orthonormal projection R^D -> R^d (QR of a seeded Gaussian matrix), float64."""

    def __init__(self, dim_in: int, dim_out: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim_in, min(dim_out, dim_in), generator=g, dtype=torch.float64))
        self.q = q

    def __call__(self, z: torch.Tensor) -> np.ndarray:
        return (z.reshape(z.shape[0], -1).to(torch.float64) @ self.q).numpy()


def gaussian(f: np.ndarray):
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet(a, b) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rank-deficient sets take the eps * I fallback
        return frechet_distance(*a, *b)


# ----------------------------------------------------------------------------------------------
# solvers


def solver_table() -> dict:
    def ours(method):
        def run(denoise, noise, nfe, smin, smax):
            return sample(denoise, noise, method=method, nfe=nfe, sigma_min=smin, sigma_max=smax, return_info=True)

        return run

    def dpm(order):
        def run(denoise, noise, nfe, smin, smax):
            return dpm_solver_pp(denoise, noise, nfe=nfe, sigma_min=smin, sigma_max=smax, order=order, return_info=True)

        return run

    table = {"Euler": ours("euler"), "EDM Heun": ours("heun"), "Midpoint": ours("midpoint"), "Ode3": ours("ode3"),
             "NFE-guided": ours("nfe-guided")}
    if "auto" in SAMPLERS:
        table["auto"] = ours("auto")
    table["DPM-Solver++ 2M"] = dpm(2)
    table["DPM-Solver++ 3M"] = dpm(3)
    return table


@torch.no_grad()
def generate(fn, denoiser, noise, labels, nfe, smin, smax, batch):
    """Run solver ``fn`` over the sample set in chunks; returns (latents, NFE used per image)."""
    outs, used = [], set()
    for i in range(0, noise.shape[0], batch):
        y = labels[i : i + batch] if labels is not None else None
        x, info = fn(lambda v, s: denoiser(v, s, y), noise[i : i + batch], nfe, smin, smax)
        outs.append(x.float())
        used.add(info.nfe)
    assert len(used) == 1, used
    return torch.cat(outs), used.pop()


def seed_noise(num: int, shape, num_classes: int):
    """Noise and labels exactly as latentdiff-sample draws them for seeds 0..num-1."""
    noise, labels = [], []
    for s in range(num):
        g = torch.Generator().manual_seed(s)
        noise.append(torch.randn(tuple(shape), generator=g))
        if num_classes:
            labels.append(torch.randint(num_classes, (), generator=g))
    return torch.stack(noise), (torch.stack(labels) if num_classes else None)


# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def run(args) -> dict:
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export = Path(args.export) if args.export else build_tiny(out / "tiny", args.tiny_steps)
    weights = args.weights or ("0.99" if not args.export else "ema")
    den, loaded = load_export(export, weights=weights)
    meta = loaded.meta
    norm, shape, nc = meta.normalization, meta.shape, meta.num_classes
    data_root = Path(args.dataset or meta.dataset["path"])
    ref_z, ref_means, _ = dataset_latents(data_root, norm)
    if args.max_ref and args.max_ref < ref_z.shape[0]:  # a fixed random subset
        keep = torch.randperm(ref_z.shape[0], generator=torch.Generator().manual_seed(2))[: args.max_ref]
        ref_z, ref_means = ref_z[keep], ref_means[keep]
    proj = Projection(int(np.prod(shape)), args.proj_dim)
    ref_stats = gaussian(proj(ref_z))
    half = ref_z.shape[0] // 2
    perm = torch.randperm(ref_z.shape[0], generator=torch.Generator().manual_seed(1))
    floor = frechet(gaussian(proj(ref_z[perm[:half]])), gaussian(proj(ref_z[perm[half:]])))
    print(f"export {export} ({meta.model['name']}, step {meta.step}, weights {loaded.weights_file}); "
          f"reference: {ref_z.shape[0]} training latents from {data_root}", flush=True)

    fid_ctx = None
    if args.inception_weights or args.fid == "auto":
        try:
            ext = load_feature_extractor(args.inception_weights, device="cpu")
            ae = load_vae_for(meta.vae)
            ref_imgs = decode_to_uint8(norm.to_model(ref_means), norm, autoencoder=ae, batch_size=64)
            ref_fid = compute_statistics(ref_imgs, ext, allow_small=True, progress=False)[:2]

            def fid_of(z):
                imgs = decode_to_uint8(z, norm, autoencoder=ae, batch_size=64)
                return frechet(compute_statistics(imgs, ext, allow_small=True, progress=False)[:2], ref_fid)

            fid_ctx = fid_of
        except FIDError as e:
            if args.inception_weights:
                raise
            print(f"no Inception weights ({str(e).splitlines()[0][:120]}...): reporting FD-lat only", flush=True)

    noise, labels = seed_noise(args.num, shape, nc)
    solvers = solver_table()
    if args.solvers:
        solvers = {k: v for k, v in solvers.items() if k in args.solvers}
    smin = meta.schedule.sigma_min
    results = {"export": str(export), "weights": loaded.weights_file, "num": args.num, "reference_n": ref_z.shape[0],
               "proj_dim": args.proj_dim, "floor_fd_lat": floor, "floor_n": half, "sigma_max": {}, "rows": []}
    t_all = time.time()
    for choice in args.sigma_max:
        smax = resolve_sigma_max(choice, meta.schedule.sigma_max)
        t0 = time.time()
        ode = []
        for i in range(0, args.num, args.batch):
            y = labels[i : i + args.batch] if labels is not None else None
            ode.append(sample(lambda v, s: den(v, s, y), noise[i : i + args.batch], method="heun", steps=args.ref_steps,
                              sigma_min=smin, sigma_max=smax).float())
        ode = torch.cat(ode)
        ode_fd = frechet(gaussian(proj(ode)), ref_stats)
        entry = {"value": smax, "ode_limit_fd_lat": ode_fd, "ref_steps": args.ref_steps}
        if fid_ctx:
            entry["ode_limit_fid"] = fid_ctx(ode)
        results["sigma_max"][choice] = entry
        print(f"sigma_max {choice} = {smax:.4g}: converged ODE (Heun, {args.ref_steps} levels) FD-lat {ode_fd:.4f} "
              f"[{time.time() - t0:.0f} s]", flush=True)
        for name, fn in solvers.items():
            for nfe in args.nfe:
                try:
                    z, used = generate(fn, den, noise, labels, nfe, smin, smax, args.batch)
                except ValueError as e:  # e.g. a budget too small for a method
                    results["rows"].append({"sigma_max": choice, "solver": name, "nfe": nfe, "error": str(e)})
                    continue
                row = {"sigma_max": choice, "solver": name, "nfe": nfe, "nfe_used": used,
                       "fd_lat": frechet(gaussian(proj(z)), ref_stats),
                       "rms_to_ode": float((z - ode).square().mean().sqrt())}
                if fid_ctx:
                    row["fid"] = fid_ctx(z)
                results["rows"].append(row)
            print(f"  {name:16s} " + " ".join(f"{r['fd_lat']:.3f}" for r in results["rows"]
                                             if r.get("solver") == name and r["sigma_max"] == choice and "fd_lat" in r),
                  flush=True)
    results["seconds"] = time.time() - t_all
    md = markdown(results, args.nfe, list(solvers), fid=fid_ctx is not None)
    (out / "study.md").write_text(md)
    (out / "study.json").write_text(json.dumps(results, indent=1))
    plot(results, list(solvers), out / "study.png", key="fid" if fid_ctx else "fd_lat")
    print(md)
    return results


def _cell(r, key):
    if r is None or "error" in r:
        return "n/a"
    v = r[key]
    s = f"{v:.3f}" if v < 100 else f"{v:.1f}"
    return s + (f" ({r['nfe_used']})" if r["nfe_used"] != r["nfe"] else "")


def markdown(results, nfes, solvers, fid=False) -> str:
    rows = {(r["sigma_max"], r["solver"], r["nfe"]): r for r in results["rows"]}
    metric = "FID (Inception, few samples: not comparable with published FID)" if fid else \
        f"FD-lat (Fréchet distance, random {results['proj_dim']}-d projection of model-space latents; NOT FID)"
    lines = [f"# Sampler study: {results['export']} ({results['weights']}), {results['num']} samples vs "
             f"{results['reference_n']} training latents", "",
             f"Metric: {metric}. Lower is better. Cells: value at the NFE budget (NFE used in parentheses when smaller).",
             f"Estimator noise (FD-lat between two disjoint halves of the training latents, {results.get('floor_n', '?')} vs "
             f"{results.get('floor_n', '?')}; the estimator's bias shrinks like 1/N, so at this study's sizes it is smaller): "
             f"{results['floor_fd_lat']:.3f}.", ""]
    keys = (["fid"] if fid else []) + ["fd_lat", "rms_to_ode"]
    titles = {"fid": "FID", "fd_lat": "FD-lat (not FID)", "rms_to_ode": "RMS to the converged ODE solution (model space)"}
    for key in keys:
        for choice, info in results["sigma_max"].items():
            lim = info.get("ode_limit_fid" if key == "fid" else "ode_limit_fd_lat")
            extra = f"; converged ODE: {lim:.3f}" if key != "rms_to_ode" else ""
            lines += [f"## {titles[key]} -- sigma_max = {choice} ({info['value']:.4g}){extra}", "",
                      "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                      "|---|" + "---|" * len(nfes)]
            for s in solvers:
                lines.append(f"| {s} | " + " | ".join(_cell(rows.get((choice, s, n)), key) for n in nfes) + " |")
            lines.append("")
    # Table 3 shape: sigma_max choice x NFE for the NFE-guided sampler
    key = "fid" if fid else "fd_lat"
    lines += [f"## sigma_max choice, NFE-guided sampler ({titles[key]})", "",
              "| sigma_max | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for choice, info in results["sigma_max"].items():
        lines.append(f"| {choice} ({info['value']:.3g}) | "
                     + " | ".join(_cell(rows.get((choice, "NFE-guided", n)), key) for n in nfes) + " |")
    return "\n".join(lines) + "\n"


def plot(results, solvers, path, key="fd_lat"):
    # matplotlib only for the figure: a second of import time and a backend choice the study does not need
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    choices = list(results["sigma_max"])
    lims = [v.get("ode_limit_fid" if key == "fid" else "ode_limit_fd_lat") for v in results["sigma_max"].values()]
    top = 100 * min(v for v in lims if v) if any(lims) else None  # diverged runs (e.g. Ode3 in one step) are clipped
    fig, axes = plt.subplots(1, len(choices), figsize=(5 * len(choices), 4), sharey=True, squeeze=False)
    for ax, choice in zip(axes[0], choices):
        for s in solvers:
            pts = [(r["nfe_used"], r[key]) for r in results["rows"]
                   if r["sigma_max"] == choice and r["solver"] == s and key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, [min(y, top) if top else y for y in ys], marker="o", ms=3, label=s)
                clipped = [(x, top) for x, y in pts if top and y > top]
                if clipped:
                    ax.plot(*zip(*clipped), "^", color=ax.lines[-1].get_color(), ms=7)
        lim = results["sigma_max"][choice].get("ode_limit_fid" if key == "fid" else "ode_limit_fd_lat")
        if lim is not None:
            ax.axhline(lim, color="k", ls="--", lw=1, label="converged ODE")
        if key == "fd_lat":
            ax.axhline(results["floor_fd_lat"], color="gray", ls=":", lw=1, label="data half vs half")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE used")
        ax.set_title(f"sigma_max = {choice} ({results['sigma_max'][choice]['value']:.3g})"
                     + (" [^ = off scale]" if top and any(r.get(key, 0) > top for r in results["rows"]
                                                          if r["sigma_max"] == choice) else ""))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("FID" if key == "fid" else "FD-lat (NOT FID)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", help="an export directory (latentdiff-export)")
    src.add_argument("--tiny", action="store_true", help="encode a tiny dataset and train a tiny export first (CPU)")
    p.add_argument("--tiny-steps", type=int, default=800, help="--tiny: training steps (micro-batch 32)")
    p.add_argument("--dataset", default=None, help="reference dataset (default: the export's dataset.path)")
    p.add_argument("--weights", default=None, help="ema / an EMA rate / raw (default: ema; 0.99 for --tiny)")
    p.add_argument("--out", default="bench_out/sampler_study")
    p.add_argument("--num", type=int, default=512, help="samples per configuration (seeds 0..num-1)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_NFES))
    p.add_argument("--sigma-max", nargs="+", default=list(SIGMA_CHOICES), help="data edm vp or numbers")
    p.add_argument("--solvers", nargs="+", default=None, help="subset of the solver names")
    p.add_argument("--ref-steps", type=int, default=128, help="noise levels of the converged Heun reference")
    p.add_argument("--proj-dim", type=int, default=64, help="FD-lat feature dimension")
    p.add_argument("--max-ref", type=int, default=0, help="use at most this many training latents as the reference (0 = all)")
    p.add_argument("--inception-weights", default=None, help="compute real FID on decoded images with these weights")
    p.add_argument("--fid", choices=("auto", "off"), default="auto",
                   help="auto: FID too when torch-fidelity's weights are in their cache")
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
