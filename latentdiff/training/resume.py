"""Whether a checkpoint may be resumed by this run: same world size under ZeRO, same config and the
same values derived from the dataset statistics (or ``--force-resume``, which logs the difference)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from latentdiff.training.config import config_diff
from latentdiff.training.state import TrainerState
from latentdiff.utils.errors import TrainError

__all__ = ["SCHEDULE_KEYS", "schedule_diff", "check_resume"]

SCHEDULE_KEYS = ("normalization", "sigma_data", "sigma_dist", "sigma_min", "sigma_max", "noise")


def schedule_diff(old: dict, new: dict) -> list[str]:
    """What changed in the values the training depends on (extra diagnostic keys are ignored)."""
    out = []
    for k in SCHEDULE_KEYS:
        a, b = old.get(k), new.get(k)
        if isinstance(a, float) and isinstance(b, float):
            same = math.isclose(a, b, rel_tol=1e-9)
        else:
            same = a == b
        if not same:
            out.append(f"schedule.{k}: {json.dumps(a)} (checkpoint) -> {json.dumps(b)} (now; derived from the dataset stats)")
    return out


def check_resume(ckpt: Path, state: TrainerState, resolved: dict, schedule: dict, *, world: int, zero_stage: int,
                 force: bool) -> list[str]:
    """The differences that matter between ``ckpt`` and this run; raises :class:`TrainError` unless ``force``."""
    if state.world_size != world and zero_stage > 0:
        raise TrainError(
            f"{ckpt} was written by {state.world_size} ranks but {world} are running; ZeRO checkpoints "
            f"resume on the same number of ranks (use DeepSpeed's universal checkpoint to change it)"
        )
    diff = config_diff(state.config, resolved) + schedule_diff(state.schedule, schedule)
    if diff and not force:
        raise TrainError(
            f"refusing to resume {ckpt}: the config changed in ways that matter:\n  " + "\n  ".join(diff)
            + "\nrevert these fields, start a new run_dir, or pass --force-resume true to accept the change"
        )
    return diff
