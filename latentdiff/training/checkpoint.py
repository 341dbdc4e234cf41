"""Atomic, collective checkpoints with retention.

Layout: ``RUN/checkpoints/step_00001000/`` holds DeepSpeed's files (model, optimizer, LR scheduler,
loss scaler), the EMA (``ema*.safetensors``), ``trainer_state.json`` (step, images seen, data position,
resolved config, noise schedule) and ``COMPLETE``.  ``RUN/checkpoints/latest`` names the newest
complete checkpoint.

Atomicity (trap T22): everything is written into ``.tmp-step_NNNNNNNN``; after a barrier rank 0 writes
``COMPLETE``, renames the directory into place and then replaces ``latest`` (write to a temp file +
``os.replace``).  A crash at any point leaves ``latest`` pointing at a checkpoint that loads; stale
``.tmp-*`` directories are removed by the next save.  Every rank calls :func:`save_checkpoint` and
:func:`load_checkpoint` (trap T4).

Retention: the ``keep_last`` newest checkpoints plus every checkpoint whose step is a multiple of
``keep_every`` (milestones) survive; older ones are deleted after a successful save.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from latentdiff.utils.io import atomic_write_text
from latentdiff.utils.dist import barrier, get_rank
from latentdiff.utils.errors import TrainError

__all__ = ["tag_for", "save_checkpoint", "find_latest", "load_trainer_state", "prune", "list_checkpoints"]

STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_atomic(path: Path, text: str) -> None:
    atomic_write_text(path, text)
    _fsync_dir(path.parent)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    root = Path(root)
    out = []
    if root.is_dir():
        for p in root.glob("step_*"):
            if p.is_dir() and (p / COMPLETE).is_file():
                try:
                    out.append((int(p.name.split("_")[1]), p))
                except ValueError:
                    continue
    return sorted(out)


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint named by ``latest`` if it is complete, else the newest complete one, else None."""
    root = Path(root)
    latest = root / "latest"
    if latest.is_file():
        p = root / latest.read_text().strip()
        if (p / COMPLETE).is_file():
            return p
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(engine, root: str | Path, step: int, state: dict, ema=None, *, keep_last: int = 3,
                    keep_every: int = 0, fault_hook=None) -> Path:
    """Collective save of the engine, the EMA and ``state`` as ``root/step_NNNNNNNN``."""
    root = Path(root)
    rank = get_rank()
    world = int(state.get("world_size", 1))
    tag = tag_for(step)
    final, tmp = root / tag, root / f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a re-save of the same step (e.g. preemption right after a periodic save)
            shutil.rmtree(final)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={"latentdiff_step": step}, save_latest=False)
    if ema is not None:
        ema.save(tmp, rank, world)
    if fault_hook is not None:
        fault_hook("mid-save")
    barrier()
    if rank == 0:
        _write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
        _write_atomic(tmp / COMPLETE, tag + "\n")
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", tag + "\n")
        prune(root, keep_last, keep_every)
    barrier()
    return final


def prune(root: str | Path, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Delete complete checkpoints beyond the retention policy; returns what was removed."""
    ckpts = list_checkpoints(root)
    keep = {p for _, p in ckpts[-keep_last:]} if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {p for s, p in ckpts if s % keep_every == 0}
    removed = []
    for _, p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def load_trainer_state(ckpt: str | Path) -> dict:
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise TrainError(f"{path} is missing: {ckpt} is not a complete latentdiff checkpoint")
    return json.loads(path.read_text())
