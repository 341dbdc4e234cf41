"""``latentdiff-reconstruct-ema RUN --sigma-rel 0.05 0.08 0.12 [--end-images N] [--out DIR]``: post-hoc
EMA (EDM2 App. C) from ``RUN/ema_snapshots``.

Fits every target (σ_rel, end point) to the stored power-EMA snapshots, prints the fit error per target,
reads each snapshot once for all targets and writes one export per target,
``OUT/phema-<sigma_rel>-img<images>/`` (default OUT = RUN/export), that ``latentdiff-sample --export``
loads (its weights are ``phema-<sigma_rel>``, the default ``ema`` choice of that export).  The export's
metadata comes from the run's latest checkpoint.  ``--dry-run`` prints the fits without reading weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latentdiff.training.checkpoint import find_latest
from latentdiff.training.export import write_weights_export
from latentdiff.training.reconstruct import Target, plan, reconstruct
from latentdiff.training.snapshots import SNAPSHOT_DIR, list_snapshots
from latentdiff.utils.dist import hard_exit
from latentdiff.utils.errors import LatentdiffError
from latentdiff.utils.io import atomic_write_json

__all__ = ["cli", "export_name", "main"]


def export_name(sigma_rel: float, images: int) -> str:
    return f"phema-{sigma_rel:.4g}-img{images:012d}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentdiff-reconstruct-ema", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run directory (holds ema_snapshots/ and checkpoints/)")
    p.add_argument("--sigma-rel", type=float, nargs="+", required=True, help="target widths sigma_rel")
    p.add_argument("--end-images", type=int, nargs="+", default=None,
                   help="end points in images (default: the last snapshot); each is combined with every sigma_rel")
    p.add_argument("--out", default=None, help="parent directory of the exports (default RUN/export)")
    p.add_argument("--snapshots", default=None, help=f"snapshot directory (default RUN/{SNAPSHOT_DIR})")
    p.add_argument("--dry-run", action="store_true", help="print the fits only")
    return p


def run(args) -> list[dict]:
    run_dir = Path(args.run)
    snaps = list_snapshots(Path(args.snapshots) if args.snapshots else run_dir / SNAPSHOT_DIR)
    ends = args.end_images or [None]
    plans = plan(snaps, [Target(s, e) for e in ends for s in args.sigma_rel])
    for p in plans:
        print(f"sigma_rel {p.sigma_rel:.4g} (gamma {p.gamma:.3f}) at {p.images} images (step {p.step}): "
              f"{len(p.used)} snapshots, {len(p.columns)} profiles, fit error {p.fit.rel_error:.3e}")
    if args.dry_run:
        return [p.summary() for p in plans]
    ckpt = find_latest(run_dir / "checkpoints")
    if ckpt is None:
        raise LatentdiffError(f"{run_dir / 'checkpoints'} holds no complete checkpoint to take the model "
                              "config and schedule from")
    out_root = Path(args.out) if args.out else run_dir / "export"
    results = []
    for p, weights in zip(plans, reconstruct(snaps, plans, log=print)):
        out = out_root / export_name(p.sigma_rel, p.images)
        write_weights_export(ckpt, out, {p.sigma_rel: weights}, step=p.step, images_seen=p.images)
        info = {**p.summary(), "export": str(out), "snapshot_files": [snaps[i].file for i in p.used]}
        atomic_write_json(out / "phema.json", info, indent=1)
        print(f"wrote {out}")
        results.append(info)
    return results


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        results = run(args)
    except (LatentdiffError, ValueError) as e:
        print(f"latentdiff-reconstruct-ema: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(results, indent=1))
    return 0


def cli() -> None:
    hard_exit(main())


if __name__ == "__main__":
    cli()
