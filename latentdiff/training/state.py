"""``trainer_state.json``: what a checkpoint records besides DeepSpeed's files and the EMA.

:class:`TrainerState` holds each value once: the position (step, images seen, epoch and batch within
it), the run layout (world size, ZeRO stage, precision), the resolved :class:`TrainConfig` dict, the
model config (which holds the class count and the null label), the noise schedule (which holds
sigma_data) and the dataset reference (:meth:`DatasetManifest.reference`).  The preconditioning
record, the class count and the null label are derived from those (properties).

A checkpoint written before ``format_version`` 2 (no ``format`` field; it also stored ``precond``,
``num_classes`` and ``null_label``) still loads: those copies must agree with the values they repeat.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.utils.errors import TrainError
from latentdiff.utils.io import read_json

__all__ = ["STATE_FILE", "STATE_FORMAT", "STATE_VERSION", "TrainerState", "load_trainer_state"]

STATE_FILE = "trainer_state.json"
STATE_FORMAT = "latentdiff-trainer-state"
STATE_VERSION = 2
_INTS = ("step", "images_seen", "epoch", "batch_in_epoch", "world_size", "zero_stage")
_DICTS = ("config", "model_config", "schedule", "dataset")


@dataclass
class TrainerState:
    """The trainer's record in a checkpoint (see the module docstring); :meth:`validate` is its one check."""

    step: int
    images_seen: int
    epoch: int
    batch_in_epoch: int
    world_size: int
    zero_stage: int
    precision: str
    config: dict
    model_config: dict
    schedule: dict
    dataset: dict
    time: float = field(default_factory=time.time)

    # derived values ----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Classes of the trained model (0 = unconditional)."""
        return int(self.model_config.get("num_classes") or 0)

    @property
    def null_label(self) -> int | None:
        """The model's null class (classifier-free guidance), None for an unconditional model."""
        return self.model_config.get("null_label") if self.num_classes > 0 else None

    @property
    def precond(self) -> dict:
        """The trainer's preconditioning: EDM with the schedule's sigma_data (edm.txt Table 1)."""
        return {"kind": "edm", "sigma_data": self.schedule["sigma_data"]}

    # the one check -----------------------------------------------------------------------------
    def validate(self, where: str = STATE_FILE) -> "TrainerState":
        for k in _INTS:
            v = getattr(self, k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise TrainError(f"{where}: field {k!r} is {v!r}, expected an integer >= 0")
        if self.world_size < 1:
            raise TrainError(f"{where}: field 'world_size' is {self.world_size}, expected >= 1")
        for k in _DICTS:
            if not isinstance(getattr(self, k), dict):
                raise TrainError(f"{where}: field {k!r} is not a mapping")
        sd = self.schedule.get("sigma_data")
        if not (isinstance(sd, (int, float)) and math.isfinite(sd) and sd > 0):
            raise TrainError(f"{where}: schedule.sigma_data is {sd!r}, expected a positive number")
        return self

    # JSON --------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "format_version": STATE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict, where: str = STATE_FILE) -> "TrainerState":
        """Parse (this format, or a checkpoint written before it had a version) and :meth:`validate`."""
        if not isinstance(d, dict):
            raise TrainError(f"{where}: expected a JSON object")
        version = d.get("format_version", 1) if d.get("format", STATE_FORMAT) == STATE_FORMAT else None
        if version not in (1, STATE_VERSION):
            raise TrainError(f"{where}: format {d.get('format')!r} version {d.get('format_version')!r} is not a "
                             f"trainer state this latentdiff reads ({STATE_FORMAT} 1-{STATE_VERSION})")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in names if k not in d and k != "time"]
        if missing:
            raise TrainError(f"{where}: fields {missing} are missing: not a complete latentdiff checkpoint")
        state = cls(**{k: d[k] for k in names if k in d}).validate(where)
        if version == 1:
            state._check_v1_copies(d, where)
        return state

    def _check_v1_copies(self, d: dict, where: str) -> None:
        """A version-1 state repeated the class count, null label and preconditioning: they must agree."""
        derived = {"num_classes": self.num_classes, "null_label": self.null_label, "precond": self.precond}
        for k, want in derived.items():
            got = d.get(k, want)
            if k == "precond" and isinstance(got, dict) and isinstance(got.get("sigma_data"), float):
                same = got.get("kind") == "edm" and math.isclose(got["sigma_data"], want["sigma_data"], rel_tol=1e-12)
            else:
                same = got == want
            if not same:
                raise TrainError(f"{where}: {k} {json.dumps(got)} disagrees with the value the model config and "
                                 f"schedule give ({json.dumps(want)}); the checkpoint was edited by hand")

    def dumps(self) -> str:
        """The JSON text of ``trainer_state.json`` (sorted keys)."""
        return json.dumps(self.to_json(), indent=1, sort_keys=True)


def load_trainer_state(ckpt: str | Path) -> TrainerState:
    """The :class:`TrainerState` of checkpoint directory ``ckpt`` (raises :class:`TrainError` naming the file)."""
    path = Path(ckpt) / STATE_FILE
    d = read_json(path, TrainError, missing=f": {ckpt} is not a complete latentdiff checkpoint",
                  invalid="; resume from (or export) another checkpoint")
    return TrainerState.from_json(d, str(path))
