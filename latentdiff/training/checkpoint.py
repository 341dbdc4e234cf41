"""Atomic, collective checkpoints with retention.

Layout: ``RUN/checkpoints/step_00001000/`` holds DeepSpeed's files (model, optimizer, LR scheduler,
loss scaler), the EMAs (``ema*.safetensors``, ``power_ema*.safetensors``), ``trainer_state.json`` (a
:class:`~latentdiff.training.state.TrainerState`: step, images seen, data position, resolved config,
noise schedule) and ``COMPLETE``.  ``RUN/checkpoints/latest`` names the newest
complete checkpoint.

Atomicity: everything is written into ``.tmp-step_NNNNNNNN``; after a barrier rank 0 writes
``COMPLETE``, renames the directory into place and then replaces ``latest`` (write to a temp file +
``os.replace``).  A crash at any point leaves ``latest`` pointing at a checkpoint that loads; stale
``.tmp-*`` directories are removed by the next save.  Every rank calls :func:`save_checkpoint` (it
holds collectives), and every rank loads (``Trainer.maybe_resume``).

Retention: the ``keep_last`` newest checkpoints plus every checkpoint whose step is a multiple of
``keep_every`` (milestones) survive; older ones are deleted after a successful save.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from latentdiff.training.state import STATE_FILE, TrainerState
from latentdiff.utils.dist import barrier, get_rank
from latentdiff.utils.io import atomic_write_text, fsync_dir

__all__ = ["tag_for", "save_checkpoint", "find_latest", "prune", "list_checkpoints"]

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


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


def save_checkpoint(engine, root: str | Path, step: int, state: TrainerState, ema=None, *, keep_last: int = 3,
                    keep_every: int = 0, fault_hook=None) -> Path:
    """Collective save of the engine, the EMA(s) (one or a list) and ``state`` as ``root/step_NNNNNNNN``."""
    root = Path(root)
    rank = get_rank()
    world = state.world_size
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
    for e in (ema if isinstance(ema, (list, tuple)) else [ema]):  # the fixed-rate EMA and the power EMA
        if e is not None:
            e.save(tmp, rank, world)
    if fault_hook is not None:
        fault_hook("mid-save")
    barrier()
    if rank == 0:
        atomic_write_text(tmp / STATE_FILE, state.dumps(), sync_dir=True)
        atomic_write_text(tmp / COMPLETE, tag + "\n", sync_dir=True)
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / "latest", tag + "\n", sync_dir=True)
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
