"""``latentdiff-fid``: FID of generated samples against reference statistics.

    torchrun --nproc_per_node 8 -m latentdiff.fid --ref ref.npz SAMPLES [SAMPLES ...] \\
        [--seeds 0-49999 [--seeds 50000-99999 ...]] [--inception-weights PATH] [--out fid.json]

Each (samples, seed range) pair is one FID; ``fid.json`` lists them all with min and mean.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from latentdiff.metrics.fid import evaluate
from latentdiff.metrics.frechet import MIN_SAMPLES, check_count, load_reference
from latentdiff.metrics.image_sources import open_samples, select_seeds
from latentdiff.metrics.image_sources import parse_seed_set as parse_seeds
from latentdiff.metrics.inception import WEIGHTS_ENV, download_inception_weights, load_feature_extractor
from latentdiff.utils import dist as ldist
from latentdiff.utils.dist import hard_exit
from latentdiff.utils.errors import FIDError
from latentdiff.utils.io import atomic_write_json

__all__ = ["main", "cli"]


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff-fid",
        description="FID of generated samples against reference statistics (torch-fidelity's TF-compatible "
        "Inception-v3). Run under torchrun/srun to split the images over ranks.",
    )
    p.add_argument("samples", nargs="*", help="samples directories (PNGs or samples.npz) or ADM samples.npz files")
    p.add_argument("--ref", help="reference statistics .npz (mu, sigma), e.g. from tools/fid_reference.py, EDM or ADM")
    p.add_argument(
        "--seeds",
        action="append",
        help="seed range(s) to evaluate, e.g. 0-49999; repeat for several FIDs (min/mean reported)",
    )
    p.add_argument("--inception-weights", help=f"torch-fidelity Inception state dict (default: ${WEIGHTS_ENV} or the torch hub cache)")
    p.add_argument("--download-weights", action="store_true", help="explicitly download the official weights to the torch hub cache")
    p.add_argument("--allow-small", action="store_true", help=f"allow fewer than {MIN_SAMPLES} samples (smoke tests only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass per rank (default 64)")
    p.add_argument("--input-format", choices=("auto", "png", "npz"), default="auto")
    p.add_argument("--out", help="fid.json path (default: SAMPLES/fid.json for one samples directory, else ./fid.json)")
    p.add_argument("--save-stats", help="also write the samples' statistics (.npz + provenance) for a single run")
    p.add_argument("--device", help="torch device (default: this rank's accelerator device)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _default_out(samples: list[str]) -> Path:
    if len(samples) == 1:
        p = Path(samples[0])
        return (p if p.is_dir() else p.parent) / "fid.json"
    return Path("fid.json")


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    prefix = "latentdiff-fid"
    initialized_here = False
    try:
        if args.download_weights and not args.samples:
            path = download_inception_weights(args.inception_weights)
            print(f"Inception weights at {path}")
            return 0
        if not args.samples or not args.ref:
            raise FIDError("give --ref REF.npz and at least one samples directory or samples.npz")
        if args.batch_size < 1:
            raise FIDError(f"--batch-size must be >= 1, got {args.batch_size}")
        seeds = args.seeds or [None]
        for s in seeds:
            if s is not None:
                parse_seeds(s)
        ref = load_reference(args.ref)
        # cheap validation before loading the network / starting the group
        for s in args.samples:
            src, _, _ = open_samples(s, args.input_format)
            for spec in seeds:
                chosen = select_seeds(src, parse_seeds(spec), s) if spec is not None else src
                check_count(len(chosen), args.allow_small, MIN_SAMPLES, s + (f" seeds {spec}" if spec else ""))
        initialized_here = ldist.init_distributed()
        if ldist.get_world_size() > 1:
            prefix = f"latentdiff-fid[rank {ldist.get_rank()}]"
        extractor = load_feature_extractor(args.inception_weights, device=args.device, download=args.download_weights)
        report = evaluate(
            args.samples,
            ref,
            extractor,
            seeds=seeds,
            batch_size=args.batch_size,
            allow_small=args.allow_small,
            input_format=args.input_format,
            progress=not args.no_progress,
            save_stats=args.save_stats,
        )
        report["command"] = [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        out = Path(args.out) if args.out else _default_out(args.samples)
        if ldist.get_rank() == 0:
            atomic_write_json(out, report)
            for r in report["runs"]:
                print(f"FID {r['fid']:.4f}  n={r['num_samples']}  seeds={r['seeds']}  {r['samples']}")
            if report["num_runs"] > 1:
                print(f"FID min {report['fid_min']:.4f}  mean {report['fid_mean']:.4f}  over {report['num_runs']} runs")
            print(f"wrote {out}")
        return 0
    except FIDError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if initialized_here:
            ldist.destroy()


def cli() -> None:
    """Console-script entry point: ``main`` then a hard exit (see ``latentdiff.dist.hard_exit``)."""
    hard_exit(main())


if __name__ == "__main__":
    cli()
