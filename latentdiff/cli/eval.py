"""``latentdiff-eval``: sample quality without a hub - FWD, SWD, KID and precision/recall (and FID, KID,
precision/recall on Inception features when the weights are there) of generated samples against a
reference, written to ``metrics.json``.

    torchrun --nproc_per_node 8 -m latentdiff.cli.eval SAMPLES --ref REF [--save-ref REF.npz] [--out metrics.json]

REF: an encoded dataset directory (decoded through its VAE), an image folder or ``samples.npz``, or the
statistics an earlier run saved with ``--save-ref``.  Sets too small for a metric are refused with the
number it needs; leave it out with ``--metrics``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from latentdiff.cli.common import cli_exit, run_distributed
from latentdiff.metrics.eval_config import EvalConfig
from latentdiff.metrics.eval_sources import open_reference, samples_source
from latentdiff.metrics.eval_stats import SetStatistics, save_statistics
from latentdiff.metrics.evaluation import check_counts, check_geometry, evaluate
from latentdiff.utils import dist as ldist
from latentdiff.utils.config import add_config_flags, config_from_args, field_help
from latentdiff.utils.errors import FIDError
from latentdiff.utils.io import atomic_write_json

__all__ = ["build_parser", "main", "cli"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentdiff-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    samples = EvalConfig.__dataclass_fields__["samples"]
    p.add_argument("samples", nargs="?", help=field_help(samples))
    add_config_flags(p, EvalConfig, skip=("samples",), with_presets=False)
    return p


def _inception(cfg: EvalConfig):
    """The Inception extractor, or None (``auto`` without weights: noted in the report)."""
    if cfg.inception == "off":
        return None, "off (--inception off)"
    from latentdiff.metrics.inception import (
        load_feature_extractor,
        resolve_weights_path,
    )

    try:
        resolve_weights_path(cfg.inception_weights)
    except FIDError as e:
        if cfg.inception == "on":
            raise
        return None, f"not used: {str(e).split('. ')[0]}"
    return load_feature_extractor(cfg.inception_weights, device=cfg.device), "used"


def _precheck(cfg: EvalConfig, settings):
    """Samples, reference and counts, before any network loads or a process group starts."""
    samples, info = samples_source(cfg.samples, cfg.input_format)
    check_geometry(samples.resolution, settings, cfg.samples)
    check_counts(len(samples), samples.resolution, settings, cfg.samples)
    return samples, info


def _save_ref(path):
    def save(stats: SetStatistics) -> None:
        save_statistics(path, stats)
        print(f"saved the reference statistics to {path}")

    return save if path else None


def _print(report: dict, out: Path) -> None:
    for key, m in report["metrics"].items():
        if "value" in m:
            print(f"{key:12s} {m['value']:.6g}")
        elif "kid" in m:
            print(f"{key:12s} {m['kid']:.6g} +- {m['kid_std']:.2g}")
        else:
            print(f"{key:12s} precision {m['precision']:.4f} recall {m['recall']:.4f}")
    print(f"wrote {out}")


def _run(cfg: EvalConfig, argv) -> None:
    extractor, note = _inception(cfg)
    settings = cfg.settings(inception=extractor is not None)
    samples, info = _precheck(cfg, settings)
    device = cfg.device or str(ldist.device())
    reference = open_reference(cfg.ref, device=device, vae_path=cfg.vae, input_format="auto")
    if cfg.save_ref and isinstance(reference, SetStatistics):
        raise FIDError("--save-ref: the reference already is a statistics file")
    report = evaluate(samples, reference, settings, inception=extractor, batch_size=cfg.batch_size,
                      progress=not cfg.no_progress, samples_info=info, save_reference=_save_ref(cfg.save_ref))
    report["inception"] = note
    report["command"] = [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
    if ldist.get_rank() == 0:
        p = Path(cfg.samples)
        out = Path(cfg.out) if cfg.out else (p if p.is_dir() else p.parent) / "metrics.json"
        atomic_write_json(out, report)
        _print(report, out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def prepare():
        cfg = config_from_args(EvalConfig, args, {"samples": args.samples} if args.samples else None).validate()
        _precheck(cfg, cfg.settings(inception=False))
        return cfg

    return run_distributed("latentdiff-eval", prepare, lambda cfg: _run(cfg, argv))


def cli() -> None:
    cli_exit(main, "latentdiff-eval")


if __name__ == "__main__":
    cli()
