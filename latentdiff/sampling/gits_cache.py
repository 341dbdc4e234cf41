"""GITS' one-off cost per model (``latentdiff.solvers.schedules``): the cost matrix from warm-up
trajectories of the model, cached beside the export and reused.

The cache file is ``EXPORT/gits/<key>.json`` (``latentdiff-gits/1``): the fine grid, the cost matrix
and the key it was computed for.  The key is the sha256 of the weights file sampled with, the GITS
parameters (``GITSParams``: fine grid, rho, warm-up count and seeds, coeff, teacher) and what else
shapes the trajectories (sigma range, sample shape, guidance scale and interval, class label, dtype).
Any change of one of them names another file, so a stale table is never read; a file whose stored
key differs from its name's is recomputed.  An export directory that cannot be written falls back to
``OUT/gits/``.  Warm-up noise: one generator per seed ``seed .. seed + warmup - 1`` (labels drawn from
it for a class-conditional model, as for images), never overlapping image seeds below 10^6.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from latentdiff.diffusion.grids import karras_sigmas
from latentdiff.solvers.generate import _conditioned, _seed_noise_and_labels
from latentdiff.solvers.schedules import GITSParams, GITSTable, gits_cost_matrix
from latentdiff.utils.errors import SampleError
from latentdiff.utils.io import atomic_write_text

__all__ = ["GITS_FORMAT", "build_gits_table", "gits_key", "load_or_build_gits"]

GITS_FORMAT = "latentdiff-gits/1"


def gits_key(weights_sha256: str, params: GITSParams, **settings) -> dict:
    """Everything the cost matrix depends on (the cache key, stored in the file)."""
    return {"weights_sha256": weights_sha256, "gits": params.to_dict(), **settings}


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def build_gits_table(denoiser, shape, params: GITSParams, *, sigma_min: float, sigma_max: float, num_classes: int = 0,
                     class_label: int | None = None, cfg_scale: float = 1.0, guidance_interval=None,
                     null_label: int | None = None, device="cpu", dtype=torch.float32, batch: int = 64) -> GITSTable:
    """The warm-up trajectories (``params.warmup`` of them, ``batch`` at a time) and their cost matrix."""
    if params.teacher != "ipndm":
        raise SampleError(f"GITS teacher {params.teacher!r}: only ipndm (GITS' default) is implemented")
    fine = karras_sigmas(params.fine_levels, sigma_min, sigma_max, params.rho)
    seeds = list(range(params.seed, params.seed + params.warmup))
    total = None
    for i in range(0, len(seeds), batch):
        part = seeds[i : i + batch]
        labels = None if class_label is None else torch.full((len(part),), int(class_label))
        _, noise, labels = _seed_noise_and_labels(part, shape, labels, num_classes, None)
        denoise = _conditioned(denoiser, labels, num_classes, "ipndm", cfg_scale, guidance_interval, null_label, device)
        c = gits_cost_matrix(denoise, noise.to(device, dtype), fine, batch=batch) * len(part)
        total = c if total is None else total + c
    return GITSTable(sigmas=[float(s) for s in fine[:-1]], cost=(total / len(seeds)).tolist(), coeff=params.coeff)


def _read(path: Path, key: dict) -> GITSTable | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if d.get("format") != GITS_FORMAT or d.get("key") != key:
        return None
    return GITSTable(sigmas=d["sigmas"], cost=d["cost"], coeff=float(key["gits"]["coeff"]),
                     meta={"file": str(path), "key": key, "cached": True, "seconds": d.get("seconds")})


def load_or_build_gits(cache_dirs, key: dict, build) -> GITSTable:
    """The table of ``key`` from the first of ``cache_dirs`` that has it, else ``build()`` written to the
    first writable one.  Returns the table with ``meta`` = {file, key, cached, seconds}."""
    name = f"{_key_hash(key)}.json"
    for d in cache_dirs:
        table = _read(Path(d) / "gits" / name, key)
        if table is not None:
            return table
    t0 = time.time()
    table = build()
    seconds = time.time() - t0
    text = json.dumps({"format": GITS_FORMAT, "key": key, "seconds": seconds, "sigmas": table.sigmas,
                       "cost": table.cost})
    errors = []
    for d in cache_dirs:
        path = Path(d) / "gits" / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        return GITSTable(sigmas=table.sigmas, cost=table.cost, coeff=table.coeff,
                         meta={"file": str(path), "key": key, "cached": False, "seconds": seconds})
    raise SampleError("could not write the GITS cache anywhere (" + "; ".join(errors) + "); make the export or --out "
                      "directory writable")
