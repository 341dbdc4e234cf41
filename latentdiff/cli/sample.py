"""Distributed generation from an export: any solver, classifier-free guidance, exact VAE decode.

``torchrun --nproc_per_node N -m latentdiff.sample --export RUN/export/step_X --out SAMPLES --seeds 0-49999``

Determinism
-----------
* One generator per image seed: the initial noise (drawn on the CPU, then moved to the device), the
  class label of an unlabelled request and any stochastic-sampler noise come from seed ``s`` alone.
* PyTorch only promises bitwise-equal results for equal tensor shapes: BLAS/cuDNN/oneDNN pick their
  kernels (and so the order of floating-point sums) by batch size.  The sampler therefore gives every
  network forward exactly ``B = min(--batch, number of seeds)`` images and every VAE decode exactly
  ``min(--decode-batch, number of seeds)`` latents, padding a short chunk with copies of its first item
  (rows do not interact in eval mode, so the padding cannot change the real rows).  The images are then
  bitwise identical for any number of ranks, any order or split of the seeds and any resume pattern.
  Changing ``--batch`` changes the forward shape; the images stay identical only where the kernels are
  batch-size invariant (on the CPU builds we test, for batches >= 3; ``sampling.json`` records both
  sizes, and a resume with other sizes prints a warning).  On the CPU the intra-op thread count is
  part of the kernel choice too: ``torchrun`` sets ``OMP_NUM_THREADS=1`` per rank, a plain ``python``
  run uses every core, and the two can differ in the last bit of a pixel (seen on one CI machine).
  Compare CPU runs made with the same thread count (``sampling.json`` records ``intra_op_threads``).
* Seeds are split round-robin over ranks; ``SAMPLES/images/<seed:06d>.png`` that exist and verify are
  skipped (resume).  ``SAMPLES/config.json`` holds everything that determines the pixels; a resume
  with a different export, solver, NFE, sigma range, guidance, ... is refused instead of mixing sets.

Outputs
-------
Latents are mapped back with the export's exact inverse normalization (in float64) and decoded by the
VAE named in the export in fp32, untiled, outside autocast (traps T1, T3, T20); images are saved as
lossless PNG (``tEXt`` chunk ``latentdiff`` = ``{"seed": s, "label": y}``), then rank 0 writes
``samples.npz`` (``arr_0`` uint8 NHWC in seed order as ADM/EDM evaluators expect, ``arr_1`` the class
labels of a class-conditional model as ADM does, ``seeds``), ``grid.png`` and ``sampling.json``
(export hash, seeds, solver, NFE budget and the NFE actually used = counted denoiser calls, the sigma
grid, guidance scale and interval, EMA profile, decode precision, batch sizes, timing).
``sampling.json`` and ``samples.npz`` are removed when a run starts and rewritten when it completes,
so they always describe a complete set.

Pretrained bridge
-----------------
``--diffusers-unet DIR`` samples a diffusers ``UNet2DModel`` epsilon-prediction DDPM model through VP
preconditioning with the same solvers (:mod:`latentdiff.models.diffusers_vp`).

Library
-------
The command runs :mod:`latentdiff.solvers.generate` (latents from seeds) and :mod:`latentdiff.vae.decode`
(latents to images); use those from Python.
"""
from __future__ import annotations

import argparse
import sys

from latentdiff.sampling.run import run
from latentdiff.solvers.registry import DEFAULT_SAMPLER, SAMPLERS
from latentdiff.utils.dist import hard_exit
from latentdiff.utils.errors import LatentdiffError

__all__ = ["build_parser", "main", "cli"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentdiff-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", help="export directory (model.json + safetensors) from latentdiff-export")
    src.add_argument("--diffusers-unet", help="a local diffusers UNet2DModel (epsilon-prediction DDPM) or pipeline directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seeds", default="0-63", help="seed list/ranges, e.g. 0-49999 (one image per seed)")
    p.add_argument("--batch", type=int, default=64, help="images per network forward per rank (fixed forward shape)")
    p.add_argument("--decode-batch", type=int, default=8, help="latents per VAE decode (fixed decode shape)")
    p.add_argument("--solver", default=DEFAULT_SAMPLER, choices=list(SAMPLERS), help=f"ODE solver (default {DEFAULT_SAMPLER})")
    p.add_argument("--nfe", type=int, default=35, help="denoiser evaluations per image (budget, never exceeded)")
    p.add_argument("--steps", type=int, default=None,
                   help="noise levels instead of an NFE budget (fixed-method solvers; required by hybrid)")
    p.add_argument("--sigma-max", default="data", help="data (export's data-driven value), edm (80), vp (~152) or a number")
    p.add_argument("--sigma-min", type=float, default=None, help="default: the export's sigma_min (0.002)")
    p.add_argument("--rho", type=float, default=7.0, help="Karras grid exponent (edm.txt Eq. 5)")
    p.add_argument("--placement", choices=("log", "classical"), default=None,
                   help="RK stage noise levels: log (wsnr.txt Alg. 3, default) or classical")
    p.add_argument("--h-tau", type=float, default=None, help="nfe-guided: step-size threshold of Algorithm 1")
    p.add_argument("--num-ode3", type=int, default=None, help="hybrid: number of third-order steps (largest sigma first)")
    p.add_argument("--midpoint", action="store_true", help="hybrid: midpoint instead of Heun for the second-order steps")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale w: D_u + w (D_c - D_u); 1 = conditional model")
    p.add_argument("--guidance-interval", default=None, help="sigma_lo,sigma_hi: guide only inside this interval")
    p.add_argument("--class-label", type=int, default=None, help="one class for every image (default: drawn per seed)")
    p.add_argument("--weights", default="ema", help="ema (largest rate), an EMA rate such as 0.9999, or raw")
    p.add_argument("--vae", default=None, help="load the export's VAE from this directory (its sha256 is still checked)")
    p.add_argument("--s-churn", type=float, default=None, help="edm-stochastic: S_churn (default 0)")
    p.add_argument("--s-tmin", type=float, default=None, help="edm-stochastic: S_tmin")
    p.add_argument("--s-tmax", type=float, default=None, help="edm-stochastic: S_tmax")
    p.add_argument("--s-noise", type=float, default=None, help="edm-stochastic: S_noise")
    p.add_argument("--grid", type=int, default=64, help="images in grid.png (0 = none)")
    p.add_argument("--no-npz", action="store_true", help="do not write samples.npz")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = run(args)
    except LatentdiffError as e:  # SampleError, ExportError, ConfigError: one line naming the field and the fix
        print(f"latentdiff-sample: {e}", file=sys.stderr)
        return 2
    if res:
        print(f"wrote {res['num_images']} images to {args.out} ({res['solver']}, NFE used {res['nfe_used']}, "
              f"{res['generated_this_run']} generated now)")
    return 0


def cli() -> None:
    """Console-script entry point: ``main`` then a hard exit (see ``latentdiff.dist.hard_exit``)."""
    hard_exit(main())


if __name__ == "__main__":
    cli()
