#!/usr/bin/env python
"""Every solver x time schedule on a trained network, against a converged float64 reference (resumable).

    python tools/bench/sampler_trained.py --export RUN/export/step_X --name NET [--data DATA/val]
        [--samples 64] [--noise-seeds 0 1] [--nfe 5 7 10 15 20 35 50]
        [--solvers auto ipndm unipc deis-tab3 dpm-3m] [--schedules karras log-uniform gits]
        [--ref-steps 160] [--gits-warmup 256 --gits-fine 51] [--out tools/bench/trained]

Setup.  The export's EMA denoiser integrates the probability-flow ODE (wsnr.txt Eq. 1) from the noises of
image seeds ``k * 100000 + i`` (i < --samples) for each noise seed k, one generator per seed and the
class label drawn from it, exactly as ``latentdiff-sample`` draws them, over the CLI's sigma range (the
export's sigma_min and data-driven sigma_max, Eq. 7-8, unless --sigma-max is given).  Solvers run in
float32 (what the CLI runs).  Reference: the network and UniPC in float64 with --ref-steps levels, checked
against --ref-steps / 2 (the RMS of their difference is reported; it must lie far below every error).

Per cell (solver, schedule, NFE, noise seed): the RMS over samples and coordinates of the state at
sigma_min (the input of the final Euler evaluation) minus the reference's, in model space; FWD
(``latentdiff.metrics.fwd``, Haar level 4) of the decoded samples against the reference's decoded
samples of the same noises (the solver's distribution error; 0 when converged) and, with --data,
against that encoded dataset (sample quality, including the network's own error).  Error bars: the
standard error over noise seeds (for two seeds, half their difference).  Cells run NFE by NFE; finished ones are lines of
``OUT/NET/cells.jsonl`` and are skipped on a re-run; the summary files are rewritten after every NFE:
``OUT/NET/results.json``, ``OUT/NET/table.md``, ``OUT/NET/error_vs_nfe.png``.  GITS tables come from
``latentdiff.sampling.gits_cache`` (EXPORT/gits/, else OUT/NET/gits/).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from latentdiff.contracts.export import load_export
from latentdiff.diffusion.grids import karras_sigmas
from latentdiff.metrics.fwd import PacketAccumulator, fwd_from_statistics
from latentdiff.sampling.gits_cache import build_gits_table, gits_key, load_or_build_gits
from latentdiff.sampling.options import resolve_sigma_max
from latentdiff.solvers.generate import _seed_noise_and_labels
from latentdiff.solvers.multistep import unipc_sampler
from latentdiff.solvers.registry import SOLVERS, sample
from latentdiff.solvers.schedules import GITSParams
from latentdiff.utils.io import sha256_file
from latentdiff.vae.decode import decode_to_uint8, load_vae_for

DEFAULT_NFES = (5, 7, 10, 15, 20, 35, 50)
DEFAULT_SOLVERS = ("auto", "ipndm", "unipc", "deis-tab3", "dpm-3m")
DEFAULT_SCHEDULES = ("karras", "log-uniform", "gits")
SEED_STRIDE = 100_000


class LastInput:
    """Counts denoiser calls; keeps the last input (the state at sigma_min before the final Euler step)."""

    def __init__(self, denoise):
        self.denoise, self.calls, self.x = denoise, 0, None

    def __call__(self, x, sigma):
        self.calls += 1
        self.x = x
        return self.denoise(x, sigma)


class Bench:
    def __init__(self, args):
        torch.set_grad_enabled(False)
        self.args = args
        self.net, loaded = load_export(args.export, weights=args.weights)
        self.meta = loaded.meta
        self.weights_file = loaded.weights_file
        self.shape, self.num_classes = tuple(self.meta.shape), self.meta.num_classes
        self.sigma_min = float(self.meta.schedule.sigma_min)
        self.sigma_max = resolve_sigma_max(args.sigma_max, self.meta.schedule.sigma_max)
        self.ae = load_vae_for(self.meta.vae, "cpu")
        self.out = Path(args.out) / args.name
        self.out.mkdir(parents=True, exist_ok=True)
        self.cells_path = self.out / "cells.jsonl"
        self.noise, self.labels = {}, {}
        for k in args.noise_seeds:
            seeds = [k * SEED_STRIDE + i for i in range(args.samples)]
            _, self.noise[k], self.labels[k] = _seed_noise_and_labels(seeds, self.shape, None, self.num_classes, None)
        self.gits = None
        self.reference = {}

    def denoise(self, k, dtype):
        net = self.net.to(dtype)
        labels = self.labels[k]
        return lambda x, s: torch.cat([net(x[i : i + 256], s[i : i + 256], None if labels is None else labels[i : i + 256])
                                       for i in range(0, x.shape[0], 256)])

    def images(self, z):
        return decode_to_uint8(z.float(), self.meta.normalization, autoencoder=self.ae, batch_size=64)

    def ref_for(self, k):
        """(state at sigma_min, decoded images, info) of the float64 UniPC reference for noise seed k (cached)."""
        if k in self.reference:
            return self.reference[k]
        path = self.out / f"reference-seed{k}.pt"
        if path.exists():
            self.reference[k] = torch.load(path, weights_only=True)
            return self.reference[k]
        t0 = time.time()
        den = self.denoise(k, torch.float64)
        states = {}
        for steps in (self.args.ref_steps, self.args.ref_steps // 2):
            rec = LastInput(den)
            unipc_sampler(rec, self.noise[k].double() * self.sigma_max,
                          karras_sigmas(steps, self.sigma_min, self.sigma_max))
            states[steps] = rec.x
        x = states[self.args.ref_steps]
        final = den(x, torch.full((x.shape[0],), self.sigma_min, dtype=torch.float64))
        half = float((x - states[self.args.ref_steps // 2]).square().mean().sqrt())
        ref = {"x": x, "images": self.images(final), "rms_vs_half_steps": torch.tensor(half),
               "seconds": torch.tensor(time.time() - t0)}
        torch.save(ref, path)
        self.reference[k] = ref
        print(f"[{self.args.name}] reference seed {k}: UniPC float64 {self.args.ref_steps} levels, rms vs half "
              f"{half:.2e} [{time.time() - t0:.0f} s]", flush=True)
        return ref

    def gits_table(self):
        if self.gits is None:
            a = self.args
            params = GITSParams(warmup=a.gits_warmup, fine_levels=a.gits_fine)
            sha = sha256_file(Path(a.export) / self.weights_file)
            key = gits_key(sha, params, sigma_min=self.sigma_min, sigma_max=self.sigma_max, shape=list(self.shape),
                           cfg=1.0, guidance_interval=None, class_label=None, dtype="float32")
            self.gits = load_or_build_gits(
                [a.export, self.out], key,
                lambda: build_gits_table(self.net.float(), self.shape, params, sigma_min=self.sigma_min,
                                         sigma_max=self.sigma_max, num_classes=self.num_classes, batch=128))
            print(f"[{a.name}] GITS table {self.gits.meta['file']} (cached: {self.gits.meta['cached']})", flush=True)
        return self.gits

    def run_cell(self, solver, schedule, nfe, k) -> dict:
        ref = self.ref_for(k)
        opts = {} if schedule == "auto" else {"schedule": schedule}
        if schedule == "gits":
            opts["gits"] = self.gits_table()
        rec = LastInput(self.denoise(k, torch.float32))
        t0 = time.time()
        z, info = sample(rec, self.noise[k], method=solver, nfe=nfe, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                         return_info=True, **opts)
        if rec.calls != nfe:
            raise RuntimeError(f"{solver}/{schedule} used {rec.calls} evaluations for NFE {nfe}")
        cell = {"solver": solver, "schedule": schedule, "nfe": nfe, "seed": k, "samples": int(z.shape[0]),
                "rms": float((rec.x.double() - ref["x"]).square().mean().sqrt()),
                "fwd_ref": fwd(self.images(z), ref["images"]), "seconds": time.time() - t0,
                "sigmas": [float(s) for s in info.sigmas] if schedule != "auto" else None}
        if self.args.data:
            cell["fwd_data"] = fwd(self.images(z), self.data_images())
        return cell

    def data_images(self):
        if not hasattr(self, "_data"):
            from latentdiff.metrics.eval_sources import EncodedDatasetImages

            src = EncodedDatasetImages(self.args.data)
            self._data = src.batch(list(range(len(src))))
        return self._data


def fwd(gen: torch.Tensor, ref: torch.Tensor, level: int = 4) -> float:
    stats = []
    for imgs in (gen, ref):
        acc = PacketAccumulator(level)
        acc.update(imgs)
        stats.append(acc.statistics())
    return fwd_from_statistics(stats[0][0], stats[0][1], stats[1][0], stats[1][1])[0]


def pairs(solvers, schedules):
    for s in solvers:
        if SOLVERS[s].per_sample_grid or "schedule" not in SOLVERS[s].options:
            yield s, "auto"
        else:
            for t in schedules:
                yield s, t


def read_cells(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarize(cells: list[dict], metrics=("rms", "fwd_ref", "fwd_data")) -> dict:
    """{pair: {metric: {nfe: (mean, standard error over seeds, seeds)}}}."""
    out = {}
    for c in cells:
        out.setdefault(f"{c['solver']} / {c['schedule']}", {}).setdefault("_cells", []).append(c)
    for pair, d in out.items():
        for m in metrics:
            by_nfe = {}
            for c in d["_cells"]:
                if m in c:
                    by_nfe.setdefault(c["nfe"], []).append(c[m])
            d[m] = {n: (float(np.mean(v)), float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan"),
                        len(v)) for n, v in sorted(by_nfe.items())}
        del d["_cells"]
    return out


def markdown(summary: dict, nfes, metric: str, title: str) -> str:
    lines = [f"\n**{title}** (mean ± standard error over noise seeds; **bold**: best pair at that NFE)\n",
             "| solver / schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    best = {n: min((v[metric][n][0], p) for p, v in summary.items() if n in v.get(metric, {}))[1]
            for n in nfes if any(n in v.get(metric, {}) for v in summary.values())}
    for pair, v in summary.items():
        cells = []
        for n in nfes:
            if n not in v.get(metric, {}):
                cells.append("")
                continue
            mean, se, _ = v[metric][n]
            txt = f"{mean:.2e} ± {se:.0e}" if math.isfinite(se) else f"{mean:.2e}"
            cells.append(f"**{txt}**" if best.get(n) == pair else txt)
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str, metrics=("rms", "fwd_ref")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 5), squeeze=False)
    styles = {"karras": "-", "log-uniform": ":", "gits": "--", "auto": "-"}
    for ax, m in zip(axes[0], metrics):
        for i, (pair, v) in enumerate(summary.items()):
            pts = v.get(m, {})
            if not pts:
                continue
            n = sorted(pts)
            ax.errorbar(n, [pts[x][0] for x in n], yerr=[0 if not math.isfinite(pts[x][1]) else pts[x][1] for x in n],
                        ls=styles.get(pair.split(" / ")[1], "-"), marker="o", ms=3, capsize=2, label=pair,
                        lw=2.5 if pair.startswith("auto") else 1.2)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("NFE"), ax.set_ylabel({"rms": "RMS error at sigma_min (model space)",
                                             "fwd_ref": "FWD to the converged reference"}.get(m, m))
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(bench: Bench) -> dict:
    a = bench.args
    cells = read_cells(bench.cells_path)
    summary = summarize(cells)
    refs = {k: {"rms_vs_half_steps": float(r["rms_vs_half_steps"]), "seconds": float(r["seconds"])}
            for k, r in bench.reference.items()}
    setup = {"export": str(a.export), "weights": bench.weights_file, "samples_per_seed": a.samples,
             "noise_seeds": list(a.noise_seeds), "shape": list(bench.shape), "sigma_min": bench.sigma_min,
             "sigma_max": bench.sigma_max, "solver_dtype": "float32",
             "reference": f"UniPC float64, {a.ref_steps} Eq. 5 levels (checked against {a.ref_steps // 2})",
             "gits": {"warmup": a.gits_warmup, "fine_levels": a.gits_fine}, "data": a.data}
    res = {"setup": setup, "references": refs, "summary": {p: {m: {str(n): v for n, v in d.items()}
                                                               for m, d in v.items()} for p, v in summary.items()}}
    (bench.out / "results.json").write_text(json.dumps(res, indent=1))
    md = [f"# {a.name}: solver × schedule on a trained network\n", "```", json.dumps(setup), json.dumps(refs), "```"]
    md.append(markdown(summary, a.nfe, "rms", "RMS error of the state at sigma_min vs the float64 reference"))
    md.append(markdown(summary, a.nfe, "fwd_ref", "FWD of the samples to the reference's samples (same noises)"))
    if a.data:
        md.append(markdown(summary, a.nfe, "fwd_data", f"FWD of the samples to {a.data}"))
    (bench.out / "table.md").write_text("\n".join(md) + "\n")
    plot(summary, bench.out / "error_vs_nfe.png", a.name)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="an export directory (RUN/export/step_X)")
    p.add_argument("--name", required=True, help="the network's name (the output subdirectory)")
    p.add_argument("--weights", default="ema")
    p.add_argument("--data", default=None, help="an encoded dataset (e.g. DATA/val) for FWD against data")
    p.add_argument("--samples", type=int, default=64, help="samples per noise seed")
    p.add_argument("--noise-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_NFES))
    p.add_argument("--solvers", nargs="+", default=list(DEFAULT_SOLVERS), choices=list(SOLVERS))
    p.add_argument("--schedules", nargs="+", default=list(DEFAULT_SCHEDULES), choices=list(DEFAULT_SCHEDULES))
    p.add_argument("--sigma-max", default="data", help="data|edm|vp|VALUE (default: the CLI's, data)")
    p.add_argument("--ref-steps", type=int, default=160, help="levels of the float64 UniPC reference")
    p.add_argument("--gits-warmup", type=int, default=256)
    p.add_argument("--gits-fine", type=int, default=51)
    p.add_argument("--out", default="tools/bench/trained")
    args = p.parse_args(argv)
    bench = Bench(args)
    done = {(c["solver"], c["schedule"], c["nfe"], c["seed"]) for c in read_cells(bench.cells_path)}
    for k in args.noise_seeds:
        bench.ref_for(k)
    for n in sorted(args.nfe):  # NFE-major: complete rows with error bars arrive first, the costly NFEs last
        for k in args.noise_seeds:
            for solver, schedule in pairs(args.solvers, args.schedules):
                if (solver, schedule, n, k) in done:
                    continue
                cell = bench.run_cell(solver, schedule, n, k)
                with open(bench.cells_path, "a") as f:
                    f.write(json.dumps(cell) + "\n")
                print(f"[{args.name}] NFE {n:>3} seed {k} {solver:>9} / {schedule:<11}: rms {cell['rms']:.3e} "
                      f"fwd_ref {cell['fwd_ref']:.3e} [{cell['seconds']:.0f} s]", flush=True)
        write_summary(bench)  # after every NFE: partial results are always on disk
    res = write_summary(bench)
    print(f"wrote {bench.out}/results.json, table.md, error_vs_nfe.png")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
