"""Fréchet Inception Distance with numbers comparable to EDM / ADM: ``evaluate``.

* Features: 2048-d pool features of torch-fidelity's TF-compatible Inception-v3 on uint8 images, with
  weights that are never downloaded silently (:mod:`latentdiff.metrics.inception`).
* Samples: a PNG folder or an ADM-format ``samples.npz``, seeds from file names, an ``npz`` key or
  ``sampling.json`` (:mod:`latentdiff.metrics.image_sources`); the sampler's settings in ``sampling.json``
  (:class:`~latentdiff.contracts.sampling.SamplingRecord`) are copied into ``fid.json``.
* Statistics and distance: float64 moments all-reduced over ranks, the checked float64 Fréchet
  distance (:mod:`latentdiff.metrics.frechet`); reference files: ``mu``/``sigma`` ``.npz`` files
  compatible with EDM and ADM plus a provenance JSON (:mod:`latentdiff.metrics.reference`).

Each (samples, seed range) pair is one FID; ``fid.json`` lists them all with min and mean.
The command is ``latentdiff.cli.fid``.
"""
from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentdiff.contracts.sampling import SamplingRecord
from latentdiff.metrics.frechet import (
    MIN_SAMPLES,
    RECOMMENDED_SAMPLES,
    check_count,
    compute_statistics,
    feature_dim,
    frechet_distance,
    several_ranks,
)
from latentdiff.metrics.image_sources import ImageSource, NpzImages, PngFolder, open_samples, select_seeds
from latentdiff.metrics.image_sources import parse_seed_set as parse_seeds
from latentdiff.metrics.reference import Reference, load_reference, provenance_path, save_reference
from latentdiff.utils import dist as ldist
from latentdiff.utils.errors import FIDError
from latentdiff.utils.seeds import format_seeds

__all__ = ["evaluate", "parse_seeds", "REPORT_FORMAT", "SAMPLING_FIELDS"]

REPORT_FORMAT = "latentdiff-fid/1"
# the sampler's settings each FID run reports (null, and listed as missing, without a sampling.json)
SAMPLING_FIELDS = ("export_hash", "solver", "nfe", "nfe_requested", "cfg", "guidance_interval", "ema",
                   "vae_decode_precision", "sigma_max")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _sampling_summary(record: SamplingRecord | None) -> dict:
    """The sampler's settings of one run (``SAMPLING_FIELDS``) from its record, None without one."""
    if record is None:
        return dict.fromkeys(SAMPLING_FIELDS)
    return {"export_hash": record.export_hash, "solver": record.solver, "nfe": record.nfe_used,
            "nfe_requested": record.nfe_requested, "cfg": record.cfg, "guidance_interval": record.guidance_interval,
            "ema": record.ema_profile, "vae_decode_precision": record.vae_decode_precision,
            "sigma_max": record.sigma_max}


def _check_reference_compat(ref: Reference, extractor, resolution: tuple[int, int], where: str) -> None:
    prov = ref.provenance
    if prov is None:
        return
    fe = prov.get("feature_extractor") or {}
    want = fe.get("weights_sha256")
    have = getattr(extractor, "weights_sha256", None)
    if want and have and want != have:
        raise FIDError(
            f"reference {ref.path} was built with Inception weights sha256 {want[:12]}... but this run uses "
            f"{have[:12]}... ({getattr(extractor, 'weights_path', '?')}): features are not comparable. Pass the "
            "same --inception-weights as the reference, or rebuild the reference with these weights"
        )
    res = prov.get("resolution")
    if res is not None:
        rh, rw = (int(res), int(res)) if isinstance(res, (int, float)) else (int(res[0]), int(res[1]))
        if (rh, rw) != tuple(resolution):
            raise FIDError(
                f"reference {ref.path} was built at {rh}x{rw} but the samples in {where} are "
                f"{resolution[0]}x{resolution[1]}: reference and samples must share preprocessing. Rebuild the "
                f"reference with tools/fid_reference.py --resolution {resolution[0]}"
            )


def _source_kind(src: ImageSource) -> str:
    base = getattr(src, "base", src)
    return "npz" if isinstance(base, NpzImages) else "png" if isinstance(base, PngFolder) else "array"


def _describe(extractor) -> dict:
    describe = getattr(extractor, "describe", None)
    return describe() if describe else {"name": repr(extractor)}


@dataclass(frozen=True)
class _Run:
    """One FID to compute: the images (a seed subset or all), where they came from, their sampling record."""

    where: str
    images: ImageSource
    seeds: list | None
    sampling: SamplingRecord | None
    sampling_path: Path | None
    resolution: tuple


def _check_reference(ref: Reference, extractor) -> None:
    dim = feature_dim(extractor)
    if ref.mu.shape[0] != dim:
        raise FIDError(f"reference {ref.path} has {ref.mu.shape[0]}-d statistics but the extractor gives {dim}-d features")
    if ref.provenance is not None:
        return
    warnings.warn(f"reference {ref.path} has no provenance file ({provenance_path(ref.path).name}); assuming it was "
                  "built with torch-fidelity's official weights and the samples' preprocessing (EDM/ADM files)",
                  RuntimeWarning, stacklevel=3)
    if hasattr(extractor, "official") and not extractor.official:
        warnings.warn("non-official Inception weights against a reference of unknown provenance: the distance is "
                      "meaningless", RuntimeWarning, stacklevel=3)


def _plan(samples, seed_specs, ref: Reference, extractor, input_format: str, allow_small: bool) -> list[_Run]:
    """Every (samples, seed range) pair, validated (paths, seeds, counts, resolution) before any feature."""
    runs = []
    for s in samples:
        if isinstance(s, ImageSource):
            src, sampling, spath, where = s, None, None, s.description
        else:
            (src, sampling, spath), where = open_samples(s, input_format), str(s)
        for spec in seed_specs:
            chosen, seed_list = src, None if src.seeds is None else [int(x) for x in src.seeds]
            if spec is not None:
                seed_list = parse_seeds(spec)
                chosen = select_seeds(src, seed_list, where)
            check_count(len(chosen), allow_small, MIN_SAMPLES,
                        where + (f" seeds {format_seeds(seed_list)}" if spec is not None else ""))
            _check_reference_compat(ref, extractor, chosen.resolution, where)
            runs.append(_Run(where, chosen, seed_list, sampling, spath, chosen.resolution))
    return runs


def _save_stats(path, run: _Run, mu, sigma, n: int, extractor) -> None:
    save_reference(path, mu, sigma, {
        "source": run.where, "source_type": "samples", "count": n, "resolution": list(run.resolution),
        "seeds": format_seeds(run.seeds), "preprocessing": "none (generated samples fed as uint8)",
        "feature_extractor": _describe(extractor), "created": _now(),
    })


def _fid_of(k: int, total: int, run: _Run, ref: Reference, extractor, batch_size: int, allow_small: bool,
            progress: bool, save_stats) -> dict:
    """One run's FID and its ``fid.json`` entry (every rank computes, rank 0's distance is broadcast)."""
    main = ldist.get_rank() == 0
    if len(run.images) < RECOMMENDED_SAMPLES and main:
        warnings.warn(f"{run.where}: FID from {len(run.images)} samples; published numbers use {RECOMMENDED_SAMPLES} "
                      "(FID is biased upward at small n, so the values are not comparable)", RuntimeWarning, stacklevel=3)
    mu, sigma, n = compute_statistics(run.images, extractor, batch_size, allow_small=allow_small, progress=progress,
                                      desc=f"FID {k + 1}/{total}")
    value, info = float("nan"), {}
    if main or not several_ranks():
        value, info = frechet_distance(mu, sigma, ref.mu, ref.sigma, return_info=True)
    value = ldist.broadcast_object(value)
    if save_stats is not None and main:
        _save_stats(save_stats, run, mu, sigma, n, extractor)
    missing = [] if run.sampling is not None else list(SAMPLING_FIELDS)
    if missing and main:
        warnings.warn(f"{run.where}: no sampling.json states {', '.join(missing)}; the FID report lists them as null",
                      RuntimeWarning, stacklevel=3)
    return {
        "samples": run.where, "source": _source_kind(run.images), "fid": value, "num_samples": n,
        "seeds": format_seeds(run.seeds), "resolution": list(run.resolution), **_sampling_summary(run.sampling),
        "missing_sampling_fields": missing, "sampling_json": None if run.sampling_path is None else str(run.sampling_path),
        "sampling": None if run.sampling is None else run.sampling.to_dict(),
        "sqrtm": {k2: v for k2, v in info.items() if k2 != "scipy_warnings" or v},
    }


def _report(runs: list[dict], ref: Reference, extractor) -> dict:
    values = [r["fid"] for r in runs]
    one = len(runs) == 1
    return {
        "format": REPORT_FORMAT,
        "metric": "fid" if getattr(extractor, "official", False) else "frechet-distance (non-official Inception weights)",
        "fid": values[0] if one else min(values),
        "fid_aggregate": "single" if one else f"min over {len(values)} runs",
        "fid_min": min(values),
        "fid_mean": float(np.mean(values)),
        "fid_std": float(np.std(values, ddof=1)) if not one else 0.0,
        "num_runs": len(runs),
        "num_samples": runs[0]["num_samples"] if one else [r["num_samples"] for r in runs],
        "seeds": runs[0]["seeds"] if one else [r["seeds"] for r in runs],
        "runs": runs,
        "reference": {"path": str(ref.path), "sha256": ref.sha256, "provenance": ref.provenance},
        "feature_extractor": _describe(extractor),
        "world_size": ldist.get_world_size() if several_ranks() else 1,
        "created": _now(),
    }


def evaluate(
    samples: Sequence[str | os.PathLike | ImageSource],
    reference: str | os.PathLike | Reference,
    extractor,
    *,
    seeds: Sequence[str | Sequence[int] | None] = (None,),
    batch_size: int = 64,
    allow_small: bool = False,
    input_format: str = "auto",
    progress: bool = True,
    save_stats: str | os.PathLike | None = None,
) -> dict:
    """FID of every (samples, seed range) pair against ``reference`` -> the ``fid.json`` content.

    All ranks must call it; each run's features are split over ranks.  All inputs are validated
    (paths, seeds, counts, resolution vs the reference's provenance) before any feature is computed.
    """
    ref = reference if isinstance(reference, Reference) else load_reference(reference)
    _check_reference(ref, extractor)
    plans = _plan(samples, list(seeds) if seeds else [None], ref, extractor, input_format, allow_small)
    if save_stats is not None and len(plans) != 1:
        raise FIDError(f"--save-stats writes one statistics file but {len(plans)} runs were requested")
    runs = [_fid_of(k, len(plans), run, ref, extractor, batch_size, allow_small, progress, save_stats)
            for k, run in enumerate(plans)]
    return _report(runs, ref, extractor)
