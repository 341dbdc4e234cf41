"""``OUT/encode.json``: the encode run's fingerprint (the manifest ``dataset.json`` is the typed
:class:`latentdiff.contracts.manifest.DatasetManifest`).

``encode.json`` is written when an output directory is first used; it pins everything that decides the
content and layout of the shards (inputs, input listing hash, resolution, VAE identity and precision,
flip, min size, shard size).  A later run with a different fingerprint is refused with the list of
differing fields, so an output directory never mixes two datasets; the same fingerprint resumes.
"""
from __future__ import annotations

import json
from pathlib import Path

from latentdiff.contracts.manifest import FINGERPRINT_NAME, MANIFEST_NAME
from latentdiff.utils.errors import EncodeError
from latentdiff.utils.io import atomic_write_json, read_json

__all__ = ["FINGERPRINT_VERSION", "check_or_write_fingerprint"]

# the layout of the shards and sidecars the fingerprint pins (not the manifest's format_version)
FINGERPRINT_VERSION = 1


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_diff(a, b, f"{prefix}{k}."))
        elif a != b:
            sa, sb = json.dumps(a)[:120], json.dumps(b)[:120]
            out.append(f"{prefix}{k}: {sa} (existing) != {sb} (this run)")
    return out


def check_or_write_fingerprint(out: Path, fingerprint: dict) -> bool:
    """Refuse an output dir holding another dataset; returns True when resuming an existing one."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EncodeError(f"--output {out} exists and is not a directory; pass a new or existing output directory")
    out.mkdir(parents=True, exist_ok=True)
    fp_path = out / FINGERPRINT_NAME
    if fp_path.is_file():
        old = read_json(fp_path, EncodeError, missing="", invalid=f"; delete {out} or choose another --output")
        diffs = _diff(old, fingerprint)
        if diffs:
            raise EncodeError(
                f"--output {out} already holds a different dataset ({FINGERPRINT_NAME} differs: "
                + "; ".join(diffs[:6])
                + (f"; ... {len(diffs) - 6} more" if len(diffs) > 6 else "")
                + f"). Choose a new --output directory, or delete {out} to re-encode from scratch"
            )
        return True
    foreign = [p.name for p in out.iterdir() if p.name == MANIFEST_NAME or p.name.startswith("shard-")]
    if foreign:
        raise EncodeError(
            f"--output {out} already contains {sorted(foreign)[:3]} but no {FINGERPRINT_NAME}: it holds a dataset "
            "this encoder cannot verify. Choose a new --output directory or empty this one"
        )
    atomic_write_json(fp_path, fingerprint)
    return False
