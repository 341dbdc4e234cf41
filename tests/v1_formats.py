"""Test helper: ``dataset.json`` and ``trainer_state.json`` rewritten in the format the previous commit
wrote (``format_version`` 1), to check that datasets and checkpoints made before the typed contracts
still load.  ``tests/fixtures/format_v1/`` holds real files of that format (written by the commit
before :class:`DatasetManifest` and :class:`TrainerState`); ``test_formats.py`` checks that these
converters reproduce them exactly, key for key and value for value.
"""
from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "format_v1"


def manifest_as_v1(m, fingerprint: dict) -> dict:
    """A :class:`DatasetManifest` as version 1 stored it: also the totals, the shard-list hash, the chunk
    layout and a copy of ``encode.json``."""
    d = m.to_json()
    d.update(format_version=1, num_samples=m.num_samples, num_images=m.num_images, shards_hash=m.shards_hash,
             images_per_chunk=m.images_per_chunk, num_chunks=m.num_chunks, fingerprint=fingerprint)
    d["skipped"] = {"total": m.skipped_total, **d["skipped"]}
    return d


def state_as_v1(d: dict) -> dict:
    """A ``trainer_state.json`` dict as version 1 stored it: no format fields, plus the class count, the
    null label and the preconditioning record."""
    out = {k: v for k, v in d.items() if k not in ("format", "format_version")}
    n = int(d["model_config"].get("num_classes") or 0)
    out.update(num_classes=n, null_label=d["model_config"].get("null_label") if n > 0 else None,
               precond={"kind": "edm", "sigma_data": d["schedule"]["sigma_data"]})
    return out


def rewrite_state_as_v1(ckpt: Path) -> None:
    """Replace a checkpoint's ``trainer_state.json`` by its version-1 form."""
    path = Path(ckpt) / "trainer_state.json"
    path.write_text(json.dumps(state_as_v1(json.loads(path.read_text())), indent=1, sort_keys=True))
