"""Fréchet Inception Distance with numbers comparable to EDM / ADM: ``evaluate``.

* Features: 2048-d pool features of torch-fidelity's TF-compatible Inception-v3 on uint8 images, with
  weights that are never downloaded silently (:mod:`latentdiff.metrics.inception`).
* Samples: a PNG folder or an ADM-format ``samples.npz``, seeds from file names, an ``npz`` key or
  ``sampling.json`` (:mod:`latentdiff.metrics.image_sources`); a ``sampling.json`` beside the samples is passed
  through to ``fid.json``.
* Statistics, distance and reference files: float64 moments all-reduced over ranks, the checked
  float64 Fréchet distance, ``mu``/``sigma`` ``.npz`` files compatible with EDM and ADM plus a provenance
  JSON (:mod:`latentdiff.metrics.frechet`).

Each (samples, seed range) pair is one FID; ``fid.json`` lists them all with min and mean.
The command is ``latentdiff.cli.fid``.
"""
from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from latentdiff.utils import dist as ldist
from latentdiff.utils.errors import FIDError
from latentdiff.metrics.frechet import (
    MIN_SAMPLES,
    RECOMMENDED_SAMPLES,
    Reference,
    broadcast_floats,
    check_count,
    compute_statistics,
    feature_dim,
    frechet_distance,
    is_distributed,
    load_reference,
    provenance_path,
    save_reference,
)
from latentdiff.metrics.image_sources import ImageSource, NpzImages, PngFolder, open_samples, select_seeds
from latentdiff.metrics.image_sources import parse_seed_set as parse_seeds
from latentdiff.utils.seeds import format_seeds

# the library evaluate() uses has its own homes: inception.py (extractor), image_sources.py (samples),
# frechet.py (statistics, distance, reference files), seeds.py
__all__ = ["evaluate", "parse_seeds", "REPORT_FORMAT"]

REPORT_FORMAT = "latentdiff-fid/1"

_SAMPLING_FIELDS = {
    "export_hash": ("export_hash", "export_sha256", "model_hash"),
    "solver": ("solver", "method", "sampler"),
    "nfe": ("nfe_used", "nfe_actual", "evaluations", "nfe"),
    "nfe_requested": ("nfe_requested",),
    "cfg": ("cfg", "cfg_scale", "guidance_scale", "guidance"),
    "guidance_interval": ("guidance_interval", "cfg_interval"),
    "ema": ("ema_profile", "ema", "ema_std", "ema_halflife"),
    "vae_decode_precision": ("vae_decode_precision", "decode_precision", "decode_dtype"),
    "sigma_max": ("sigma_max",),
}


# --------------------------------------------------------------------------------------------
# small helpers


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# evaluation (the CLI's engine; also usable from Python)


def _sampling_summary(sampling: Mapping | None) -> tuple[dict, list[str]]:
    found: dict[str, Any] = {}
    if sampling:
        scopes = [sampling] + [v for v in sampling.values() if isinstance(v, Mapping)]
        for field, names in _SAMPLING_FIELDS.items():
            for scope in scopes:
                hit = next((n for n in names if n in scope), None)
                if hit is not None:
                    found[field] = scope[hit]
                    break
    missing = [f for f in ("export_hash", "solver", "nfe", "cfg", "guidance_interval", "ema", "vae_decode_precision") if f not in found]
    for f in missing:
        found[f] = None
    return found, missing


def _sampling_passthrough(sampling: Mapping | None) -> dict | None:
    if sampling is None:
        return None
    out = dict(sampling)
    if isinstance(out.get("seeds"), list) and len(out["seeds"]) > 16:
        out["seeds"] = format_seeds(out["seeds"])
    return out


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
    dim = feature_dim(extractor)
    if ref.mu.shape[0] != dim:
        raise FIDError(f"reference {ref.path} has {ref.mu.shape[0]}-d statistics but the extractor gives {dim}-d features")
    if ref.provenance is None:
        warnings.warn(
            f"reference {ref.path} has no provenance file ({provenance_path(ref.path).name}); assuming it was built "
            "with torch-fidelity's official weights and the samples' preprocessing (EDM/ADM files)",
            RuntimeWarning,
            stacklevel=2,
        )
        if hasattr(extractor, "official") and not extractor.official:
            warnings.warn(
                "non-official Inception weights against a reference of unknown provenance: the distance is meaningless",
                RuntimeWarning,
                stacklevel=2,
            )
    seed_specs = list(seeds) if seeds else [None]
    plans = []
    for s in samples:
        if isinstance(s, ImageSource):
            src, sampling, spath, where = s, None, None, s.description
        else:
            src, sampling, spath = open_samples(s, input_format)
            where = str(s)
        for spec in seed_specs:
            chosen = src
            seed_list = None
            if spec is not None:
                seed_list = parse_seeds(spec)
                chosen = select_seeds(src, seed_list, where)
            elif src.seeds is not None:
                seed_list = [int(x) for x in src.seeds]
            check_count(len(chosen), allow_small, MIN_SAMPLES, f"{where}" + (f" seeds {format_seeds(seed_list)}" if spec is not None else ""))
            res = chosen.resolution
            _check_reference_compat(ref, extractor, res, where)
            plans.append((where, chosen, seed_list, sampling, spath, res))
    if save_stats is not None and len(plans) != 1:
        raise FIDError(f"--save-stats writes one statistics file but {len(plans)} runs were requested")
    runs = []
    for k, (where, src, seed_list, sampling, spath, res) in enumerate(plans):
        if len(src) < RECOMMENDED_SAMPLES and ldist.get_rank() == 0:
            warnings.warn(
                f"{where}: FID from {len(src)} samples; published numbers use {RECOMMENDED_SAMPLES} (FID is biased "
                "upward at small n, so the values are not comparable)",
                RuntimeWarning,
                stacklevel=2,
            )
        mu, sigma, n = compute_statistics(
            src, extractor, batch_size, allow_small=allow_small, progress=progress, desc=f"FID {k + 1}/{len(plans)}"
        )
        value, info = float("nan"), {}
        if ldist.get_rank() == 0 or not is_distributed():
            value, info = frechet_distance(mu, sigma, ref.mu, ref.sigma, return_info=True)
        (value,) = broadcast_floats([value])
        settings, missing = _sampling_summary(sampling)
        if save_stats is not None and ldist.get_rank() == 0:
            describe = getattr(extractor, "describe", None)
            save_reference(
                save_stats,
                mu,
                sigma,
                {
                    "source": where,
                    "source_type": "samples",
                    "count": n,
                    "resolution": list(res),
                    "seeds": format_seeds(seed_list),
                    "preprocessing": "none (generated samples fed as uint8)",
                    "feature_extractor": describe() if describe else {"name": repr(extractor)},
                    "created": _now(),
                },
            )
        runs.append(
            {
                "samples": where,
                "source": _source_kind(src),
                "fid": value,
                "num_samples": n,
                "seeds": format_seeds(seed_list),
                "resolution": list(res),
                **settings,
                "missing_sampling_fields": missing,
                "sampling_json": None if spath is None else str(spath),
                "sampling": _sampling_passthrough(sampling),
                "sqrtm": {k2: v for k2, v in info.items() if k2 != "scipy_warnings" or v},
            }
        )
        if missing and ldist.get_rank() == 0:
            warnings.warn(
                f"{where}: sampling.json does not state {', '.join(missing)}; the FID report will list them as null",
                RuntimeWarning,
                stacklevel=2,
            )
    values = [r["fid"] for r in runs]
    describe = getattr(extractor, "describe", None)
    return {
        "format": REPORT_FORMAT,
        "metric": "fid" if getattr(extractor, "official", False) else "frechet-distance (non-official Inception weights)",
        "fid": values[0] if len(values) == 1 else min(values),
        "fid_aggregate": "single" if len(values) == 1 else f"min over {len(values)} runs",
        "fid_min": min(values),
        "fid_mean": float(np.mean(values)),
        "fid_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "num_runs": len(runs),
        "num_samples": [r["num_samples"] for r in runs] if len(runs) > 1 else runs[0]["num_samples"],
        "seeds": [r["seeds"] for r in runs] if len(runs) > 1 else runs[0]["seeds"],
        "runs": runs,
        "reference": {
            "path": str(ref.path),
            "sha256": ref.sha256,
            "provenance": ref.provenance,
        },
        "feature_extractor": describe() if describe else {"name": repr(extractor)},
        "world_size": ldist.get_world_size() if is_distributed() else 1,
        "created": _now(),
    }


# --------------------------------------------------------------------------------------------
# CLI
