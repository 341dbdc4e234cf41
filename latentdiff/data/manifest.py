"""``OUT/dataset.json`` (the manifest) and ``OUT/encode.json`` (the run fingerprint).

``encode.json`` is written when an output directory is first used; it pins everything that decides the
content and layout of the shards (inputs, input listing hash, resolution, VAE identity and precision,
flip, min size, shard size).  A later run with a different fingerprint is refused with the list of
differing fields, so an output directory never mixes two datasets; the same fingerprint resumes.

``dataset.json`` is written last, when every shard and the statistics are complete.  Fields:

``format`` ("latentdiff-latents"), ``format_version``, ``created_utc``, ``command``, ``latentdiff_version``,
``vae`` (the :meth:`Autoencoder.description` dict, or ``"none"`` for pixel space), ``vae_precision``,
``pixel_range`` ([-1, 1]), ``resolution``, ``sample_shape`` [C, h, w], ``stored`` (what the members
hold), ``preprocessing``, ``num_samples``, ``num_images``, ``num_labelled``, ``num_classes``,
``class_names`` (list or null), ``shard_size``, ``images_per_chunk``, ``num_chunks``, ``shards``
(list of {name, count, sha256, bytes}), ``shards_hash``, ``stats`` ({json, npz}), ``skipped``
({total, by_reason, file}), ``inputs``, ``listing_sha256``, ``num_listed``, ``fingerprint``.
"""
from __future__ import annotations

import json
from pathlib import Path

from latentdiff.utils.io import atomic_write_json
from latentdiff.utils.errors import DataError, EncodeError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "FINGERPRINT_NAME",
    "check_or_write_fingerprint",
    "load_manifest",
]

FORMAT = "latentdiff-latents"
FORMAT_VERSION = 1
MANIFEST_NAME = "dataset.json"
FINGERPRINT_NAME = "encode.json"


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
        try:
            old = json.loads(fp_path.read_text())
        except (OSError, json.JSONDecodeError) as exn:
            raise EncodeError(f"{fp_path} is unreadable ({exn}); delete {out} or choose another --output") from exn
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


def load_manifest(root: str | Path) -> dict:
    """Read and sanity-check ``root/dataset.json`` (raises :class:`DataError` naming the problem)."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        hint = " (the encode run has not finished: re-run the same tools/encode_latents.py command)" if (root / FINGERPRINT_NAME).is_file() else ""
        raise DataError(f"{path} is missing{hint}; a dataset directory is made by tools/encode_latents.py")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise DataError(f"{path} is not valid JSON ({exn}); re-run tools/encode_latents.py") from exn
    if m.get("format") != FORMAT:
        raise DataError(f"{path}: field 'format' is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: field 'format_version' is {m.get('format_version')!r}, this latentdiff reads {FORMAT_VERSION}; "
            "re-encode the dataset with this version"
        )
    for k in ("shards", "sample_shape", "num_samples", "vae", "resolution"):
        if k not in m:
            raise DataError(f"{path}: field {k!r} is missing; re-run tools/encode_latents.py")
    total = sum(int(s["count"]) for s in m["shards"])
    if total != int(m["num_samples"]):
        raise DataError(f"{path}: shard counts sum to {total} but 'num_samples' is {m['num_samples']}")
    return m
