"""The sample stage's output directory: reuse only for the same configuration (resume), never mix sets.

``OUT/config.json`` holds the fingerprint of everything that determines the pixels (source hash,
weights, VAE, normalization, shapes, solver, budget, the options that took effect, sigma range,
guidance, labels, the fixed ``micro_batch`` shape).  A run with another fingerprint is refused;
``--batch`` and ``--decode-batch`` are not in it (they only group the fixed-shape micro-batches).  One
that differs only in the kernel settings (``KERNEL_FIELDS``: intra-op threads, torch's SIMD level)
resumes with a warning: the same shapes on other kernels may round differently.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from latentdiff.contracts.sampling import SAMPLING_JSON
from latentdiff.utils.io import atomic_write_text

__all__ = ["CONFIG_FORMAT", "KERNEL_FIELDS", "prepare_out"]

CONFIG_FORMAT = "latentdiff-sample-config/1"
KERNEL_FIELDS = ("intra_op_threads", "cpu_capability")


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def _compare(out: Path, old: dict, fingerprint: dict) -> tuple[str | None, list[str]]:
    """(refusal or None, warnings) for resuming ``out`` made with fingerprint ``old``."""
    keys = sorted(set(old) | set(fingerprint))
    diff = [k for k in keys if old.get(k) != fingerprint.get(k)]
    hard = [k for k in diff if k not in KERNEL_FIELDS]
    if hard:
        lines = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(fingerprint.get(k))}" for k in hard)
        return (f"{out} holds images made with a different configuration ({lines}). Resuming would mix two sample "
                f"sets: use a new --out, or delete {out} to start over"), []
    return None, [
        f"warning: {k} was {old.get(k)} and is now {fingerprint.get(k)}: other CPU kernels may round differently, "
        "so images of the two runs are bitwise identical only where these kernels agree"
        for k in diff
    ]


def prepare_out(out: Path, fingerprint: dict, cfg) -> tuple[str | None, list[str]]:
    """Rank 0: check that ``out`` may be (re)used, write config.json, drop stale summary files.
    Returns (error message or None, warnings)."""
    images, cfg_path = out / "images", out / "config.json"
    notes: list[str] = []
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return f"{cfg_path} is not a latentdiff-sample config; use an empty --out", notes
        error, notes = _compare(out, old, fingerprint)
        if error:
            return error, notes
    elif images.is_dir() and any(images.glob("*.png")):
        return f"{images} holds PNGs but {cfg_path} is missing: they were not written by this sampler; use an empty --out", notes
    images.mkdir(parents=True, exist_ok=True)
    for stale in [out / "samples.npz", out / SAMPLING_JSON, out / "grid.png", *images.glob("*.tmp")]:
        stale.unlink(missing_ok=True)
    record = {"format": CONFIG_FORMAT, "fingerprint": fingerprint, "args": dataclasses.asdict(cfg),
              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(cfg_path, json.dumps(record, indent=1, sort_keys=True))
    return None, notes
