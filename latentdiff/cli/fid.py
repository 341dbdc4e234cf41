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

from latentdiff.metrics.config import FIDConfig
from latentdiff.metrics.fid import evaluate
from latentdiff.metrics.frechet import MIN_SAMPLES, check_count
from latentdiff.metrics.image_sources import open_samples, parse_seed_set, select_seeds
from latentdiff.metrics.inception import download_inception_weights, load_feature_extractor
from latentdiff.metrics.reference import load_reference
from latentdiff.utils import dist as ldist
from latentdiff.utils.config import add_config_flags, config_from_args, field_help
from latentdiff.utils.errors import LatentdiffError
from latentdiff.utils.io import atomic_write_json

__all__ = ["build_parser", "main", "cli"]


def build_parser() -> argparse.ArgumentParser:
    """The positional SAMPLES, ``--config`` (a YAML file of FIDConfig fields) and one flag per other field."""
    p = argparse.ArgumentParser(prog="latentdiff-fid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    samples = next(f for f in FIDConfig.__dataclass_fields__.values() if f.name == "samples")
    p.add_argument("samples", nargs="*", help=field_help(samples))
    add_config_flags(p, FIDConfig, skip=("samples",))
    return p


def _default_out(samples: list[str]) -> Path:
    if len(samples) == 1:
        p = Path(samples[0])
        return (p if p.is_dir() else p.parent) / "fid.json"
    return Path("fid.json")


def _precheck(cfg: FIDConfig) -> None:
    """The cheap checks (reference, paths, seeds, counts) before the network loads or a group starts."""
    load_reference(cfg.ref)
    for s in cfg.samples:
        src, _, _ = open_samples(s, cfg.input_format)
        for spec in cfg.seed_specs:
            chosen = select_seeds(src, parse_seed_set(spec), s) if spec is not None else src
            check_count(len(chosen), cfg.allow_small, MIN_SAMPLES, s + (f" seeds {spec}" if spec else ""))


def _write(cfg: FIDConfig, report: dict) -> None:
    out = Path(cfg.out) if cfg.out else _default_out(cfg.samples)
    atomic_write_json(out, report)
    for r in report["runs"]:
        print(f"FID {r['fid']:.4f}  n={r['num_samples']}  seeds={r['seeds']}  {r['samples']}")
    if report["num_runs"] > 1:
        print(f"FID min {report['fid_min']:.4f}  mean {report['fid_mean']:.4f}  over {report['num_runs']} runs")
    print(f"wrote {out}")


def _run(cfg: FIDConfig, argv) -> None:
    extractor = load_feature_extractor(cfg.inception_weights, device=cfg.device, download=cfg.download_weights)
    report = evaluate(cfg.samples, cfg.ref, extractor, seeds=cfg.seed_specs, batch_size=cfg.batch_size,
                      allow_small=cfg.allow_small, input_format=cfg.input_format, progress=not cfg.no_progress,
                      save_stats=cfg.save_stats)
    report["command"] = [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
    if ldist.get_rank() == 0:
        _write(cfg, report)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefix, initialized_here = "latentdiff-fid", False
    try:
        cfg = config_from_args(FIDConfig, args, {"samples": args.samples} if args.samples else None)
        if cfg.download_weights and not cfg.samples:
            print(f"Inception weights at {download_inception_weights(cfg.inception_weights)}")
            return 0
        _precheck(cfg.validate())
        initialized_here = ldist.init_distributed()
        if ldist.get_world_size() > 1:
            prefix = f"latentdiff-fid[rank {ldist.get_rank()}]"
        _run(cfg, argv)
        return 0
    except LatentdiffError as e:  # FIDError, ConfigError, ...: one line naming the input and the fix
        print(f"{prefix}: error: {e}", file=sys.stderr)
        initialized_here = False  # no barrier after an error: another rank may be inside a collective
        return 2
    finally:
        if initialized_here:
            ldist.destroy()


def cli() -> None:
    """Console-script entry point: ``main``, then an immediate exit with its code, also after an error
    (see ``latentdiff.utils.dist.run_entry_point``)."""
    ldist.run_entry_point(main, "latentdiff-fid")


if __name__ == "__main__":
    cli()
