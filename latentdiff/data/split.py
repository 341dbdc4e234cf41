"""The validation split of the encode stage: a deterministic held-out fraction of the listed images.

With ``val_fraction = f`` and ``N`` listed images, exactly ``k = max(1, round(f N))`` images are held
out: those with the smallest ``sha256(key)``, where ``key`` is the image's path relative to the
``--input`` it was listed under (plus the tar member).  So the split depends only on the images'
names - not on the listing order, the machine, the directory the data lives in or the world size - and
a growing dataset keeps its old validation images wherever their hashes stay among the smallest.
The two parts keep the full listing's class vocabulary (one label means one class in both).

``split.json`` in each output records the rule, the counts and the other part's directory.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

from latentdiff.data.inputs import InputItem, Listing
from latentdiff.utils.errors import EncodeError
from latentdiff.utils.io import atomic_write_json

__all__ = ["SPLIT_JSON", "split_key", "held_out", "select", "write_split_record"]

SPLIT_JSON = "split.json"
RULE = ("the k = max(1, round(val_fraction * N)) images with the smallest sha256 of their path relative to the "
        "--input they were listed under (plus '::' and the tar member)")


def split_key(item: InputItem, roots: list[str]) -> str:
    """The image's name relative to its input (what the hash of the split sees)."""
    src = item.source
    for root in sorted(roots, key=len, reverse=True):
        if src == root:
            src = os.path.basename(root)
            break
        if src.startswith(root.rstrip(os.sep) + os.sep):
            src = os.path.relpath(src, root)
            break
    return src if item.member is None else f"{src}::{item.member}"


def held_out(listing: Listing, fraction: float) -> set[int]:
    """Indices (into ``listing.items``) of the validation images."""
    n = len(listing.items)
    if not 0.0 < fraction < 1.0:
        raise EncodeError(f"--val-fraction must be in (0, 1), got {fraction}")
    k = max(1, round(fraction * n))
    if k >= n:
        raise EncodeError(f"--val-fraction {fraction} of {n} images leaves no training image; lower it or add images")
    digests = [(hashlib.sha256(split_key(it, listing.inputs).encode()).hexdigest(), i) for i, it in enumerate(listing.items)]
    return {i for _, i in sorted(digests)[:k]}


def select(listing: Listing, keep) -> Listing:
    """The listing restricted to the indices ``keep`` (order and class vocabulary unchanged)."""
    keep = set(keep)
    idx = [i for i in range(len(listing.items)) if i in keep]
    return replace(listing, items=[listing.items[i] for i in idx], labels=[listing.labels[i] for i in idx])


def write_split_record(out: Path, role: str, fraction: float | None, counts: dict, other: Path,
                       val_inputs: list | None = None) -> None:
    atomic_write_json(Path(out) / SPLIT_JSON, {
        "role": role, "val_fraction": fraction, "rule": RULE if fraction else "a separate --val-input",
        "val_inputs": val_inputs or None, **counts,
        ("validation_dataset" if role == "train" else "training_dataset"): str(Path(other).resolve()),
    })
