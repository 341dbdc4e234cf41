"""Post-hoc EMA snapshots: the power-function EMAs (:class:`~latentdiff.training.ema.PowerEMA`) saved
every K images beside the checkpoints, for :mod:`latentdiff.training.reconstruct` (EDM2 App. C).

Layout: ``RUN/ema_snapshots/snap_<images:012d>.safetensors`` holds the full (consolidated) weights of
every tracked profile (keys ``<sigma_rel>/<param name>``, fp16 or fp32), and
``snap_<images:012d>.json`` (:class:`Snapshot`) records the image count t, the step, the batch and
each profile's (σ_rel, γ).  The safetensors file is written to a temporary name and renamed, then the
JSON is written the same way: a snapshot without its JSON is incomplete and ignored (a crash leaves at
most such a file, which the next write of that snapshot replaces).  A run resumed from an earlier
checkpoint rewrites the snapshots after it with the same bits (training is bitwise deterministic).

Retention (``snapshot_keep``), independent of the checkpoints': 0 keeps every snapshot (what
post-hoc reconstruction wants), N > 0 the N newest.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from latentdiff.utils.dist import barrier, get_rank
from latentdiff.utils.errors import TrainError
from latentdiff.utils.io import atomic_write_json, fsync_dir

__all__ = [
    "SNAPSHOT_DIR",
    "SNAPSHOT_FORMAT",
    "Snapshot",
    "list_snapshots",
    "prune_snapshots",
    "snapshot_due",
    "write_snapshot",
]

SNAPSHOT_DIR = "ema_snapshots"
SNAPSHOT_FORMAT = "latentdiff-ema-snapshot"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Snapshot:
    """One snapshot's record (its JSON file) and where its weights are."""

    directory: Path
    images: int  # t in EDM2's image-count form
    step: int
    global_batch: int
    dtype: str
    file: str
    profiles: tuple[tuple[float, float], ...]  # (sigma_rel, gamma)

    @property
    def path(self) -> Path:
        return self.directory / self.file

    def to_json(self) -> dict:
        return {"format": SNAPSHOT_FORMAT, "format_version": 1, "images": self.images, "step": self.step,
                "global_batch": self.global_batch, "dtype": self.dtype, "file": self.file,
                "profiles": [{"sigma_rel": s, "gamma": g} for s, g in self.profiles]}

    @classmethod
    def from_json(cls, directory: Path, d: dict, where: str) -> Snapshot:
        if not isinstance(d, dict) or d.get("format") != SNAPSHOT_FORMAT or d.get("format_version") != 1:
            raise TrainError(f"{where}: not a {SNAPSHOT_FORMAT} version 1 record")
        try:
            profiles = tuple((float(p["sigma_rel"]), float(p["gamma"])) for p in d["profiles"])
            snap = cls(directory, int(d["images"]), int(d["step"]), int(d["global_batch"]), str(d["dtype"]),
                       str(d["file"]), profiles)
        except (KeyError, TypeError, ValueError) as e:
            raise TrainError(f"{where}: field {e} is missing or malformed; delete this snapshot's two files") from None
        if snap.images <= 0 or not profiles or snap.dtype not in DTYPES:
            raise TrainError(f"{where}: images must be > 0, profiles non-empty and dtype one of {sorted(DTYPES)}")
        return snap

    def load(self) -> dict[float, dict[str, torch.Tensor]]:
        """The weights per σ_rel (as stored: fp16 or fp32)."""
        if not self.path.is_file():
            raise TrainError(f"{self.path} is missing but its record {self.path.with_suffix('.json')} exists")
        flat = load_file(str(self.path))
        out: dict[float, dict[str, torch.Tensor]] = {s: {} for s, _ in self.profiles}
        for k, v in flat.items():
            s, name = k.split("/", 1)
            out.setdefault(float(s), {})[name] = v
        return out


def snapshot_due(images_seen: int, batch: int, every: int) -> bool:
    """True when the last step (``batch`` images, ending at ``images_seen``) crossed a multiple of ``every``."""
    return every > 0 and images_seen // every > (images_seen - batch) // every


def _stem(images: int) -> str:
    return f"snap_{images:012d}"


def write_snapshot(pema, root: str | Path, *, step: int, images: int, global_batch: int, dtype: str = "fp16",
                   keep: int = 0) -> Path | None:
    """Collective (every rank calls: ZeRO-3 gathers); rank 0 writes the snapshot and applies retention."""
    root = Path(root)
    flat = {}
    for s in pema.rates:
        full = pema.full_state(s, dst=0)
        if full is not None:
            flat.update({f"{s!r}/{n}": t.to(DTYPES[dtype]).contiguous() for n, t in full.items()})
    out = None
    if get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        snap = Snapshot(root, images, step, global_batch, dtype, _stem(images) + ".safetensors",
                        tuple((s, pema.gammas[s]) for s in pema.rates))
        tmp = root / f".{snap.file}.{os.getpid()}.tmp"
        save_file(flat, str(tmp))  # no header metadata: the JSON record holds it (and the bytes stay reproducible)
        os.replace(tmp, snap.path)
        atomic_write_json(root / (_stem(images) + ".json"), snap.to_json(), indent=1, sync_dir=True)
        fsync_dir(root)
        prune_snapshots(root, keep)
        out = snap.path
    barrier()
    return out


def list_snapshots(root: str | Path) -> list[Snapshot]:
    """The complete snapshots under ``root`` (those with a JSON record), oldest first."""
    root = Path(root)
    out = []
    for p in sorted(root.glob("snap_*.json")):
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise TrainError(f"{p} is not valid JSON ({e}); delete it and its .safetensors") from None
        out.append(Snapshot.from_json(root, d, str(p)))
    return sorted(out, key=lambda s: s.images)


def prune_snapshots(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest snapshots (0 = keep all): the record first, then the weights."""
    if keep <= 0:
        return []
    removed = []
    for snap in list_snapshots(root)[:-keep]:
        (snap.directory / (Path(snap.file).stem + ".json")).unlink(missing_ok=True)
        snap.path.unlink(missing_ok=True)
        removed.append(snap.path)
    return removed
