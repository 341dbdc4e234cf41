"""``latentdiff-encode``: images -> VAE-latent webdataset shards + dataset statistics.

    latentdiff-encode --input PATH [--input PATH ...] --output DIR --resolution N \\
        --vae ID|DIR|none [--flip] [--shard-size N] [--batch-size N] [--workers N] [--min-size N]

Multi-rank: ``torchrun --nproc_per_node 8 -m latentdiff.encode ...`` (or ``tools/encode_latents.py``) or
under ``srun``.
Re-running the same command after a kill resumes (completed shards are kept, each image is encoded
exactly once).  Output: ``DIR/shard-%06d.tar``, ``dataset.json``, ``stats.json`` + ``stats.npz``,
``skipped.jsonl`` (see ``latentdiff.data``).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch.distributed as tdist

from latentdiff.data.encode import EncodeConfig, encode_dataset, format_summary
from latentdiff.data.images import DEFAULT_MAX_PIXELS
from latentdiff.utils.dist import destroy, get_rank, hard_exit
from latentdiff.utils.errors import EncodeError
from latentdiff.vae.autoencoder import DEFAULT_VAE, PRECISIONS

__all__ = ["parse_args", "main", "cli"]


def parse_args(argv=None) -> EncodeConfig:
    p = argparse.ArgumentParser(prog="latentdiff-encode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True, metavar="PATH",
                   help="image folder (class sub-folders give labels), .tar of images, or list file; repeatable")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (created; resumable)")
    p.add_argument("--resolution", type=int, required=True, help="square output size in pixels (ADM center crop)")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"hub id, local directory, or 'none' for pixel space (default {DEFAULT_VAE})")
    p.add_argument("--vae-revision", default=None, help="hub revision (branch, tag or commit) of --vae")
    p.add_argument("--vae-precision", default="fp32", choices=sorted(PRECISIONS),
                   help="fp32 (default); bf16/fp16 only after validation against fp32 on the first batch")
    p.add_argument("--flip", action="store_true", help="also store the horizontally mirrored image as its own sample")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE batch (default 32)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes decoding images (default 4)")
    p.add_argument("--min-size", type=int, default=None, help="skip images whose short side is below this (default resolution/2)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"skip images with more pixels (decompression bombs; default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--summary-json", default=None, help="also write the run summary to this JSON file (rank 0)")
    a = p.parse_args(argv)
    cfg = EncodeConfig(
        inputs=a.input, output=a.output, resolution=a.resolution, vae=a.vae, vae_revision=a.vae_revision,
        vae_precision=a.vae_precision, flip=a.flip, shard_size=a.shard_size, batch_size=a.batch_size,
        workers=a.workers, min_size=a.min_size, max_pixels=a.max_pixels, progress=not a.no_progress,
        command=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
    )
    cfg.summary_json = a.summary_json
    return cfg


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        cfg.validate()
        summary = encode_dataset(cfg)
    except EncodeError as exn:
        print(f"latentdiff-encode: error: {exn}", file=sys.stderr)
        # no barrier here: the other ranks may be elsewhere; torchrun stops them when this one exits
        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
        return 2
    if get_rank() == 0:
        print(format_summary(summary))
        if cfg.summary_json:
            with open(cfg.summary_json, "w") as f:
                json.dump(summary, f, indent=2)
    destroy()
    return 0


def cli() -> None:
    """Console-script entry point: ``main`` then a hard exit (see ``latentdiff.utils.dist.hard_exit``)."""
    hard_exit(main())


if __name__ == "__main__":
    cli()
