#!/usr/bin/env python
"""Sampler overhead and end-to-end sampling throughput.

1. **Solver overhead**: wall time of ``latentdiff.solvers.sample()`` against ``NFE_used x`` the bare
   denoiser forward ``D(x; sigma)`` (the EDM-preconditioned network, exactly what one evaluation costs)
   on the same batch, in one process.  The two are measured *interleaved* (forward block, then the
   sampler, repeat), so a shared machine's load drift hits both alike; the reported ratio is the median
   over repeats of ``t_sample / (NFE_used * t_forward)``, in wall time and in this process's CPU time (the
   robust number on a shared CPU machine; on a GPU only the wall time counts).  Goal: <= 1.03.  The
   solver's own cost is also measured directly: ``sample()`` with a free denoiser (returns a precomputed
   tensor), as a fraction of ``NFE_used x t_forward`` -- noise-free where the interleaved ratio is not.  The network-only time
   ``F(c_in x; c_noise)`` is shown too (the preconditioning's share of one evaluation).
2. **Pipeline**: images/s of the full ``latentdiff-sample`` path (sample -> exact inverse normalization
   -> VAE decode -> lossless PNG -> samples.npz) on a hand-built export of the same model with a tiny
   random AutoencoderKL, plus the time split between sampling, decoding and PNG writing.

Model: ``uvit-tiny`` by default, or any registry name with ``--override key=value`` (e.g.
``--model uvit-s --override depth=7 --override width=256``), on (C, R, R) latents.

Usage::

    python tools/bench/sampler_overhead.py [--model uvit-tiny] [--resolution 16] [--batch 32] [--nfe 35]
        [--repeats 7] [--solvers nfe-guided heun euler ode3 auto] [--pipeline-images 256] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentdiff import models
from latentdiff.cli.sample import main as sample_main
from latentdiff.contracts.export import ExportMeta, load_export
from latentdiff.contracts.schedule import TrainingSchedule
from latentdiff.data.synthetic import make_tiny_vae
from latentdiff.diffusion.precond import EDMPrecond
from latentdiff.sampling.files import save_png
from latentdiff.solvers import SAMPLERS, sample
from latentdiff.solvers.generate import generate_latents
from latentdiff.vae.autoencoder import Autoencoder
from latentdiff.vae.decode import decode_to_uint8, load_vae_for
from latentdiff.vae.normalization import Normalization


def _parse_override(items):
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def build_denoiser(args):
    torch.manual_seed(0)
    net = models.build(args.model, in_channels=args.channels, resolution=args.resolution, num_classes=args.classes,
                       **_parse_override(args.override))
    return EDMPrecond(net, sigma_data=0.5).eval()


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _both(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process).  On a shared CPU machine the CPU time is what the
    work itself cost (other jobs' load shows up in wall time only); on a GPU only wall time means anything."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


@torch.no_grad()
def overhead(den, args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.resolution, args.resolution, generator=g)
    labels = torch.randint(args.classes, (args.batch,), generator=g) if args.classes else None
    sig = torch.full((args.batch,), 1.0)

    def denoise(v, s):
        return den(v, s, labels)

    c_noise = den.c_noise(sig)
    x_in = den.c_in(sig.reshape(-1, 1, 1, 1)) * x
    for _ in range(3):  # warm-up (allocator, oneDNN primitive caches)
        denoise(x, sig)
    rows = []
    for method in args.solvers:
        _, info = sample(denoise, x, method=method, nfe=args.nfe, sigma_min=0.002, sigma_max=80.0, return_info=True)
        n = info.nfe
        d_const = denoise(x, sig)

        def stub(v, s):  # the solver with a free denoiser: its own arithmetic and Python only
            return d_const

        wall, cpu, t_s, t_f, t_net, t_stub = [], [], [], [], [], []
        for _ in range(args.repeats):
            fw, fc = _both(lambda: [denoise(x, sig) for _ in range(n)])
            sw, sc = _both(lambda: sample(denoise, x, method=method, nfe=args.nfe, sigma_min=0.002, sigma_max=80.0))
            nw, nc = _both(lambda: [den.model(x_in, c_noise, labels) for _ in range(n)])
            t_stub.append(_both(lambda: sample(stub, x, method=method, nfe=args.nfe, sigma_min=0.002, sigma_max=80.0))[1])
            wall.append(sw / fw)
            cpu.append(sc / fc)
            t_s.append((sw, sc))
            t_f.append((fw / n, fc / n))
            t_net.append((nw / n, nc / n))
        med = statistics.median
        row = {
            "solver": method, "nfe_budget": args.nfe, "nfe_used": n,
            "t_sample_ms": {"wall": 1e3 * med(t[0] for t in t_s), "cpu": 1e3 * med(t[1] for t in t_s)},
            "t_forward_ms": {"wall": 1e3 * med(t[0] for t in t_f), "cpu": 1e3 * med(t[1] for t in t_f)},
            "t_network_ms": {"wall": 1e3 * med(t[0] for t in t_net), "cpu": 1e3 * med(t[1] for t in t_net)},
            "ratio_wall": {"median": med(wall), "min": min(wall), "max": max(wall), "all": wall},
            "ratio_cpu": {"median": med(cpu), "min": min(cpu), "max": max(cpu), "all": cpu},
            "solver_only_ms_cpu": 1e3 * med(t_stub),
            "solver_only_fraction": med(t_stub) / (n * med(t[1] for t in t_f)),
        }
        rows.append(row)
        print(f"{method:12s} NFE {n:3d} | sample {row['t_sample_ms']['cpu']:8.1f} ms CPU ({row['t_sample_ms']['wall']:8.1f} wall)"
              f" | NFE x D(x;s) {n * row['t_forward_ms']['cpu']:8.1f} ms CPU ({n * row['t_forward_ms']['wall']:8.1f} wall)"
              f" | ratio CPU {med(cpu):.4f} [{min(cpu):.4f}, {max(cpu):.4f}]"
              f" wall {med(wall):.4f} [{min(wall):.4f}, {max(wall):.4f}]"
              f" | solver alone {row['solver_only_ms_cpu']:.2f} ms = {100 * row['solver_only_fraction']:.2f}% of NFE x D"
              f" | D = F + {100 * (row['t_forward_ms']['cpu'] / row['t_network_ms']['cpu'] - 1):.1f}%", flush=True)
    return rows


def write_export(den, args, root: Path) -> Path:
    """A hand-built export of ``den`` (the layout latentdiff.training.export.export_checkpoint writes) with a tiny VAE."""
    vae_dir = make_tiny_vae(root / "vae", latent_channels=args.channels)
    exp = root / "export"
    exp.mkdir(parents=True)
    state = {k: v.detach().float().contiguous() for k, v in den.model.state_dict().items()}
    save_file(state, str(exp / "ema-0.999.safetensors"))
    save_file(state, str(exp / "raw.safetensors"))
    c = args.channels
    schedule = TrainingSchedule(normalization=Normalization("channel", [0.0] * c, [1.0] * c, 0.5), sigma_data=0.5,
                                sigma_min=0.002, sigma_max=80.0, sigma_dist={"kind": "lognormal", "p_mean": -1.2, "p_std": 1.2})
    ExportMeta(model=dict(den.model.config), precond={"kind": "edm"}, schedule=schedule,
               vae=Autoencoder.load(str(vae_dir)).description(),
               weights={"raw": "raw.safetensors", "ema": {"0.999": "ema-0.999.safetensors"}}).write(exp)
    return exp


def pipeline(den, args, root: Path) -> dict:
    exp = write_export(den, args, root)
    n = args.pipeline_images
    out = root / "samples"
    t0 = time.perf_counter()
    rc = sample_main(["--export", str(exp), "--out", str(out), "--seeds", f"0-{n - 1}", "--batch", str(args.batch),
               "--nfe", str(args.nfe), "--sigma-max", "edm", "--solver", args.solvers[0], "--no-progress"])
    wall = time.perf_counter() - t0
    assert rc == 0
    res = json.loads((out / "sampling.json").read_text())
    # the split of one chunk
    d, loaded = load_export(exp)
    meta = loaded.meta
    ae = load_vae_for(meta.vae)
    seeds = list(range(args.batch))
    t_gen = _time(lambda: generate_latents(d, seeds, [args.channels, args.resolution, args.resolution],
                                           num_classes=args.classes, method=args.solvers[0], nfe=args.nfe, sigma_max=80.0,
                                           pad_to=args.batch))
    z, _ = generate_latents(d, seeds[:2], [args.channels, args.resolution, args.resolution], num_classes=args.classes,
                            method="euler", nfe=1, sigma_max=80.0)
    z = z[:1].expand(args.batch, *z.shape[1:]).contiguous()
    t_dec = _time(lambda: decode_to_uint8(z, meta.normalization, autoencoder=ae, batch_size=8))
    imgs = decode_to_uint8(z, meta.normalization, autoencoder=ae, batch_size=8)
    tmp = root / "png"
    tmp.mkdir()
    t_png = _time(lambda: [save_png(im, tmp / f"{i}.png", {"seed": i}) for i, im in enumerate(imgs)])
    per = {"sample": t_gen / args.batch, "decode": t_dec / args.batch, "png": t_png / args.batch}
    total = sum(per.values())
    out_d = {"images": n, "image_size": res["image_size"], "nfe_used": res["nfe_used"],
             "images_per_second_loop": res["images_per_second"], "wall_seconds_incl_load_and_npz": wall,
             "images_per_second_wall": n / wall, "split_seconds_per_image": per,
             "split_share": {k: v / total for k, v in per.items()}}
    print(f"pipeline: {n} images {res['image_size'][0]}x{res['image_size'][1]}, NFE {res['nfe_used']}: "
          f"{res['images_per_second']:.1f} img/s in the sampling loop, {n / wall:.1f} img/s wall (incl. load, npz, grid); "
          "per image: " + ", ".join(f"{k} {1e3 * v:.2f} ms ({100 * v / total:.0f}%)" for k, v in per.items()), flush=True)
    return out_d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="uvit-tiny")
    p.add_argument("--override", action="append", help="model field override key=value (JSON value)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--nfe", type=int, default=35)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--solvers", nargs="+", default=None,
                   help="default: nfe-guided heun euler ode3 (+ auto when solvers.SAMPLERS has it); the first one "
                        "also runs the pipeline measurement")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--pipeline-images", type=int, default=256, help="0 = skip the pipeline measurement")
    p.add_argument("--out", default=None, help="write results.json here")
    args = p.parse_args(argv)
    if args.solvers is None:
        args.solvers = ["nfe-guided", "heun", "euler", "ode3"] + (["auto"] if "auto" in SAMPLERS else [])
    if args.threads:
        torch.set_num_threads(args.threads)
    den = build_denoiser(args)
    n_par = sum(p.numel() for p in den.parameters())
    print(f"{args.model} {_parse_override(args.override)}: {n_par / 1e6:.2f}M parameters, batch {args.batch} x "
          f"({args.channels}, {args.resolution}, {args.resolution}), {torch.get_num_threads()} threads", flush=True)
    results = {"model": args.model, "override": _parse_override(args.override), "params": n_par, "batch": args.batch,
               "shape": [args.channels, args.resolution, args.resolution], "threads": torch.get_num_threads(),
               "overhead": overhead(den, args)}
    if args.pipeline_images:
        with tempfile.TemporaryDirectory() as tmp:
            results["pipeline"] = pipeline(den, args, Path(tmp))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    direct = max(r["solver_only_fraction"] for r in results["overhead"])
    print(f"largest direct solver cost (free denoiser) = {100 * direct:.2f}% of NFE x t_forward")
    worst = max(r["ratio_cpu"]["median"] for r in results["overhead"])
    worst_w = max(r["ratio_wall"]["median"] for r in results["overhead"])
    print(f"worst median ratio t_sample / (NFE x t_forward): CPU time {worst:.4f}, wall {worst_w:.4f} (goal <= 1.03)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
