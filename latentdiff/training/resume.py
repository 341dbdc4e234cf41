"""Whether a checkpoint may be resumed by this run: same world size under ZeRO, same config and the
same values derived from the dataset statistics (or ``--force-resume``, which logs the difference)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from latentdiff.contracts.schedule import TrainingSchedule
from latentdiff.models import from_config
from latentdiff.training.config import config_diff
from latentdiff.training.state import TrainerState
from latentdiff.utils.errors import TrainError

__all__ = ["check_resume"]

def _weight_shapes(model_config: dict) -> dict[str, tuple]:
    """The state-dict shapes of the network ``model_config`` describes (built on the meta device: no memory)."""
    with torch.device("meta"):
        net = from_config(model_config)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _check_same_network(ckpt: Path, state: TrainerState, model_config: dict) -> None:
    """Refuse a checkpoint whose weights do not fit this network (another width, depth, class count...)."""
    if _weight_shapes(model_config) == _weight_shapes(state.model_config):
        return
    new = json.loads(json.dumps(model_config))  # tuples -> lists, as the checkpoint stores them
    changed = sorted(k for k in set(new) | set(state.model_config) if new.get(k) != state.model_config.get(k))
    what = ", ".join(f"{k}: {json.dumps(state.model_config.get(k))} -> {json.dumps(new.get(k))}" for k in changed)
    raise TrainError(
        f"{ckpt} holds another network ({what}): its weights cannot be loaded into this model, with or "
        "without --force-resume; revert the model fields or start a new run_dir"
    )


def check_resume(ckpt: Path, state: TrainerState, resolved: dict, schedule: TrainingSchedule, *, world: int, zero_stage: int,
                 force: bool, model_config: dict | None = None) -> list[str]:
    """The differences that matter between ``ckpt`` and this run; raises :class:`TrainError` unless ``force``.

    A network whose weights have other shapes (``model_config``) is refused even with ``force``.
    """
    if model_config is not None:
        _check_same_network(ckpt, state, model_config)
    if state.world_size != world and zero_stage > 0:
        raise TrainError(
            f"{ckpt} was written by {state.world_size} ranks but {world} are running; ZeRO checkpoints "
            f"resume on the same number of ranks (use DeepSpeed's universal checkpoint to change it)"
        )
    diff = config_diff(state.config, resolved)
    diff += TrainingSchedule.from_dict(state.schedule, f"{ckpt} schedule").diff(schedule)
    if diff and not force:
        raise TrainError(
            f"refusing to resume {ckpt}: the config changed in ways that matter:\n  " + "\n  ".join(diff)
            + "\nrevert these fields, start a new run_dir, or pass --force-resume true to accept the change"
        )
    return diff
