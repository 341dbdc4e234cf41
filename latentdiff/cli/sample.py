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
VAE named in the export in fp32, untiled, outside autocast; images are saved as
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

from latentdiff.cli.common import report_error
from latentdiff.sampling.config import SampleConfig
from latentdiff.sampling.run import run
from latentdiff.utils.config import add_config_flags, config_from_args
from latentdiff.utils.dist import run_entry_point
from latentdiff.utils.errors import LatentdiffError

__all__ = ["build_parser", "main", "cli"]


def build_parser() -> argparse.ArgumentParser:
    """``--config`` (a YAML file of SampleConfig fields) and one flag per field, e.g. ``--decode-batch``."""
    p = argparse.ArgumentParser(prog="latentdiff-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, SampleConfig)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(SampleConfig, args)
        res = run(cfg)
    except LatentdiffError as e:  # SampleError, ExportError, ConfigError: one line naming the field and the fix
        return report_error("latentdiff-sample", e)
    if res:
        print(f"wrote {res.num_images} images to {cfg.out} ({res.solver}, NFE used {res.nfe_used}, "
              f"{res.generated_this_run} generated now)")
    return 0


def cli() -> None:
    """Console-script entry point: ``main``, then an immediate exit with its code, also after an error
    (see ``latentdiff.utils.dist.run_entry_point``)."""
    run_entry_point(main, "latentdiff-sample")


if __name__ == "__main__":
    cli()
