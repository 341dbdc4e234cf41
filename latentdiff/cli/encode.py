"""``latentdiff-encode``: images -> VAE-latent webdataset shards + dataset statistics.

    latentdiff-encode --input PATH [--input PATH ...] --output DIR --resolution N \\
        --vae ID|DIR|none [--flip] [--shard-size N] [--batch-size N] [--workers N] [--min-size N]
    latentdiff-encode --config encode.yaml [--output DIR ...]

Every :class:`~latentdiff.data.config.EncodeConfig` field is a flag (``--input`` repeats) and a key of
the ``--config`` YAML file (``inputs: [...]``); flags override the file.  Multi-rank:
``torchrun --nproc_per_node 8 -m latentdiff.encode ...`` (or ``tools/encode_latents.py``) or under
``srun``.  Re-running the same command after a kill resumes (completed shards are kept, each image is
encoded exactly once).  Output: ``DIR/shard-%06d.tar``, ``dataset.json``, ``stats.json`` +
``stats.npz``, ``skipped.jsonl`` (see ``latentdiff.data``).
"""
from __future__ import annotations

import argparse
import sys

import torch.distributed as tdist

from latentdiff.cli.common import report_error
from latentdiff.data.config import EncodeConfig
from latentdiff.data.encode import encode_dataset, format_summary
from latentdiff.utils.config import add_config_flags, config_from_args
from latentdiff.utils.dist import destroy, get_rank, is_distributed, run_entry_point
from latentdiff.utils.errors import LatentdiffError
from latentdiff.utils.io import atomic_write_json

__all__ = ["parse_args", "main", "cli"]


def parse_args(argv=None) -> tuple[EncodeConfig, str | None]:
    """The config the flags (and ``--config``) describe, and the ``--summary-json`` path."""
    p = argparse.ArgumentParser(prog="latentdiff-encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, EncodeConfig, skip=("command",), with_presets=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the same as --progress false)")
    p.add_argument("--summary-json", default=None, help="also write the run summary to this JSON file (rank 0)")
    a = p.parse_args(argv)
    overrides = {"command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]}
    if a.no_progress:
        overrides["progress"] = False
    return config_from_args(EncodeConfig, a, overrides), a.summary_json


def main(argv=None) -> int:
    try:
        cfg, summary_json = parse_args(argv)
        summary = encode_dataset(cfg)
    except LatentdiffError as exn:
        report_error("latentdiff-encode", exn)
        # no barrier here: the other ranks may be elsewhere; torchrun stops them when this one exits
        if is_distributed():
            tdist.destroy_process_group()
        return 2
    if get_rank() == 0:
        print(format_summary(summary))
        if summary_json:
            atomic_write_json(summary_json, summary)
    destroy()
    return 0


def cli() -> None:
    """Console-script entry point: ``main``, then an immediate exit with its code, also after an error
    (see ``latentdiff.utils.dist.run_entry_point``)."""
    run_entry_point(main, "latentdiff-encode")


if __name__ == "__main__":
    cli()
