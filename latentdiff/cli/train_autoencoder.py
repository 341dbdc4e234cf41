"""``latentdiff-train-autoencoder``: train a small KL autoencoder for your images (no hub needed).

    latentdiff-train-autoencoder --output DIR [--input PATH ...] [--preset f4|f8|f4-wide] \\
        [--latent-channels 4] [--steps 2400] [--resolution 512] [--crop 64] [--precision bf16|fp32]

No ``--input``: the photographs bundled with scikit-image.  Inputs are read as ``latentdiff-encode``
reads them (folders, .tar shards, list files) and ADM-center-cropped to ``--resolution``; the right
``--val-fraction`` of every image's columns is held out.  Output: ``DIR/vae`` (``save_pretrained``, the
EMA weights, ``scaling_factor``/``shift_factor`` from the encoded training crops; pass it as
``--vae DIR/vae`` to the encoder), ``DIR/training.json`` (command, data hash, held-out PSNR/SSIM and
their history), ``DIR/checkpoint`` (re-running the same command resumes), ``DIR/tb``.  Multi-rank:
``torchrun --nproc_per_node N tools/train_autoencoder.py ...`` (torch DDP).
"""
from __future__ import annotations

import argparse
import sys

from latentdiff.cli.common import report_error
from latentdiff.training.autoencoder.config import AutoencoderConfig
from latentdiff.training.autoencoder.loop import train_autoencoder
from latentdiff.utils.config import add_config_flags, config_from_args
from latentdiff.utils.dist import destroy, get_rank, run_entry_point
from latentdiff.utils.errors import LatentdiffError

__all__ = ["cli", "main", "parse_args"]


def parse_args(argv=None) -> AutoencoderConfig:
    p = argparse.ArgumentParser(prog="latentdiff-train-autoencoder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, AutoencoderConfig, skip=("command",), with_presets=False)
    a = p.parse_args(argv)
    overrides = {"command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]}
    return config_from_args(AutoencoderConfig, a, overrides)


def main(argv=None) -> int:
    try:
        summary = train_autoencoder(parse_args(argv))
    except LatentdiffError as exn:
        report_error("latentdiff-train-autoencoder", exn)
        return 2
    if get_rank() == 0 and summary is not None:
        print(f"held-out PSNR {summary['heldout_psnr']:.2f} dB, SSIM {summary['heldout_ssim']:.4f}; "
              f"VAE: {summary['vae']} (scaling_factor {summary['scaling_factor']:.4f}, "
              f"shift_factor {summary['shift_factor']:.4f})")
    destroy()
    return 0


def cli() -> None:
    run_entry_point(main, "latentdiff-train-autoencoder")


if __name__ == "__main__":
    cli()
