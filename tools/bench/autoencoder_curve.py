#!/usr/bin/env python
"""Held-out PSNR/SSIM vs CPU-seconds of autoencoder runs, the latent-vs-RGB spectra and the WSNR shift.

    python tools/bench/autoencoder_curve.py --run "LABEL=OUT_DIR" [--run ...] --spectra OUT_DIR --out tools/bench

Reads each ``latentdiff-train-autoencoder`` output's ``training.json`` (its ``history``: step, CPU- and
wall-seconds, held-out PSNR/SSIM) and writes ``autoencoder_psnr_vs_cpu.png``.  For ``--spectra``: the
held-out crops of that run (the right strips of its training images) -> the exported VAE's *sampled*
latents in model space, ``(z - shift_factor) * scaling_factor`` with ``z = m + s eps`` (their mean
power spectrum is the posterior-mean spectrum plus ``scaling^2 E[s^2]`` in every bin, as
``DatasetStats.sampled_latent_power``), against the 64x64 RGB crops themselves: ``autoencoder_spectra.png``
and ``autoencoder_spectra.json`` with the WSNR constants K (wsnr.txt Eq. 2-3, DC included and not) and
the WSNR shift ``0.5 ln(K_latent / K_rgb)`` (the P_mean shift; sigma factor = its exp).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import torch

from latentdiff.diffusion.shift import wsnr_log_factor
from latentdiff.diffusion.spectral import power_spectrum, radial_profile, wsnr_constant
from latentdiff.training.autoencoder.images import load_images
from latentdiff.vae.autoencoder import Autoencoder


def curve(runs: list[tuple[str, Path]], out_png: Path) -> dict:
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    table = {}
    for label, d in runs:
        h = json.loads((d / "training.json").read_text())["history"]
        cpu = [e["cpu_seconds"] for e in h]
        ax[0].plot(cpu, [e["psnr"] for e in h], "o-", ms=3, label=label)
        ax[1].plot(cpu, [e["ssim"] for e in h], "o-", ms=3, label=label)
        table[label] = [(e["step"], e["cpu_seconds"], round(e["psnr"], 2), round(e["ssim"], 4)) for e in h]
    ax[0].axhline(25, color="gray", ls=":", lw=1)
    ax[0].axvline(300, color="gray", ls=":", lw=1)
    for a, name in zip(ax, ("held-out PSNR (dB)", "held-out SSIM")):
        a.set_xlabel("CPU-seconds (one OpenMP thread)")
        a.set_ylabel(name)
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=7)
    fig.suptitle("f4 AutoencoderKL, 4 latent channels, 112 held-out 64x64 crops of the bundled photos", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return table


def sampled_latent_power(ae: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """Mean power spectrum (C, h, w) of the model-space sampled latents of ``x`` (exact in the noise)."""
    m, s = ae.encode(x)
    scale, shift = ae.scaling_factor, ae.shift_factor or 0.0
    z = (m.double() - shift) * scale
    noise = (s.double() * scale).pow(2).mean(dim=(0, 2, 3))  # E[(scale s)^2] per channel: white
    return power_spectrum(z) + noise.view(-1, 1, 1)


def spectra(run: Path, out_png: Path) -> dict:
    t = json.loads((run / "training.json").read_text())
    images = load_images([], t["resolution"], t["crop"], t["val_fraction"], 2)
    x = images.heldout_crops()
    ae = Autoencoder.load(t["vae"])
    with torch.no_grad():
        p_lat = sampled_latent_power(ae, x)
    p_rgb = power_spectrum(x.double())
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for p, name in ((p_rgb, f"RGB {x.shape[-1]}x{x.shape[-1]} (in [-1, 1])"),
                    (p_lat, f"latents {p_lat.shape[-1]}x{p_lat.shape[-1]}x{p_lat.shape[0]} (model space)")):
        f, prof = radial_profile(p)
        ax.loglog(f[1:] / p.shape[-1], prof[1:], "o-", ms=3, label=name)
    ax.set_xlabel("radial frequency (cycles / sample)")
    ax.set_ylabel("mean power per frequency (orthonormal DFT)")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title("held-out crops: RGB vs the trained f4 latent space", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    shift = wsnr_log_factor(p_rgb, p_lat)
    shift0 = wsnr_log_factor(p_rgb, p_lat, include_dc=False)
    return {
        "run": str(run), "crops": len(x), "heldout_psnr": t["heldout_psnr"], "heldout_ssim": t["heldout_ssim"],
        "K_rgb64": float(wsnr_constant(p_rgb)), "K_latent": float(wsnr_constant(p_lat)),
        "K_rgb64_dc_free": float(wsnr_constant(p_rgb, include_dc=False)),
        "K_latent_dc_free": float(wsnr_constant(p_lat, include_dc=False)),
        "p_mean_shift": shift, "sigma_factor": math.exp(shift),
        "p_mean_shift_dc_free": shift0, "sigma_factor_dc_free": math.exp(shift0),
        "scaling_factor": ae.scaling_factor, "shift_factor": ae.shift_factor,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], metavar="LABEL=DIR", help="an autoencoder output directory")
    p.add_argument("--spectra", default=None, metavar="DIR", help="the run whose latent spectra to plot")
    p.add_argument("--out", default="tools/bench")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(r.split("=", 1)[0], Path(r.split("=", 1)[1])) for r in a.run]
    if runs:
        print(json.dumps(curve(runs, out / "autoencoder_psnr_vs_cpu.png"), indent=1))
    if a.spectra:
        res = spectra(Path(a.spectra), out / "autoencoder_spectra.png")
        (out / "autoencoder_spectra.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
