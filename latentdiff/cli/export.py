"""``latentdiff-export RUN [--step S] [--out DIR]``: write ``RUN/export/step_NNNNNNNN/`` (or DIR) from a
checkpoint, loadable without DeepSpeed (``latentdiff.contracts.export.load_export``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latentdiff.cli.common import report_error
from latentdiff.training.checkpoint import find_latest, tag_for
from latentdiff.training.export import export_checkpoint
from latentdiff.utils.dist import run_entry_point
from latentdiff.utils.errors import LatentdiffError

__all__ = ["main", "cli"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="latentdiff-export", description="Export a training checkpoint (no DeepSpeed needed to load it).")
    p.add_argument("run", help="run directory (with checkpoints/) or a checkpoint directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", default=None, help="output directory (default RUN/export/step_NNNNNNNN)")
    args = p.parse_args(argv)
    run = Path(args.run)
    if (run / "trainer_state.json").is_file():
        ckpt, run = run, run.parent.parent
    else:
        root = run / "checkpoints"
        ckpt = root / tag_for(args.step) if args.step is not None else find_latest(root)
        if ckpt is None or not (ckpt / "COMPLETE").is_file():
            print(f"latentdiff-export: no complete checkpoint {'for step ' + str(args.step) if args.step is not None else ''} "
                  f"under {root}", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else run / "export" / ckpt.name
    try:
        export_checkpoint(ckpt, out)
    except LatentdiffError as e:  # ExportError, UnsafeFileError (a checkpoint file holding pickled objects), ...
        return report_error("latentdiff-export", e)
    print(f"exported {ckpt} -> {out}")
    return 0


def cli() -> None:
    """Console-script entry point: ``main``, then an immediate exit with its code, also after an error
    (see ``latentdiff.utils.dist.run_entry_point``)."""
    run_entry_point(main, "latentdiff-export")


if __name__ == "__main__":
    cli()
