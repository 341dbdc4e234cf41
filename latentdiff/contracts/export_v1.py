"""Exports of ``format_version`` 1, converted to the current ``model.json`` on read.

Version 1 stored four values twice: the normalization (top level and ``schedule.normalization``),
EDM's sigma_data (``precond.sigma_data`` and ``schedule.sigma_data``), the class count and null class
(top level and in the model config) and the VAE (top level and ``dataset.vae``), plus the label dropout
beside the training config that holds it.  :func:`upgrade_v1` keeps one copy of each; an export whose
copies disagree (edited by hand) or that lacks a field is refused with the command that re-exports it.
"""
from __future__ import annotations

import math

from latentdiff.utils.errors import ExportError

__all__ = ["REEXPORT", "V1_FIELDS", "upgrade_v1"]

REEXPORT = "re-export the run with `latentdiff-export RUN` (the checkpoint itself is unchanged)"
V1_FIELDS = ("format", "format_version", "model", "precond", "normalization", "schedule", "vae", "weights",
             "num_classes")


def _refuse(where: str, what: str) -> ExportError:
    return ExportError(f"{where}: this format_version 1 export {what}; {REEXPORT}")


def _check_classes(d: dict, where: str) -> None:
    model, nc = d["model"], int(d["num_classes"])
    if int(model.get("num_classes", 0) or 0) != nc:
        raise _refuse(where, f"says num_classes {nc} but model.num_classes is {model.get('num_classes')}")
    if nc > 0:
        model_null = nc if model.get("null_label") is None else int(model["null_label"])
        if d.get("null_label") is None or int(d["null_label"]) != model_null:
            raise _refuse(where, f"says null_label {d.get('null_label')!r} but the model's null class is {model_null} "
                                 "(guidance would use the wrong unconditional label)")


def upgrade_v1(d: dict, where: str) -> dict:
    """The format_version 2 record of a version 1 ``model.json`` (raises :class:`ExportError`)."""
    missing = [k for k in V1_FIELDS if k not in d]
    if missing:
        raise _refuse(where, f"lacks the field(s) {', '.join(missing)}")
    sched, precond = d["schedule"], dict(d["precond"])
    if not isinstance(sched, dict) or not isinstance(d["model"], dict):
        raise _refuse(where, "has no schedule or model record")
    if sched.get("normalization") != d["normalization"]:
        raise _refuse(where, "has a 'normalization' that disagrees with 'schedule.normalization' (edited by hand)")
    if precond.get("kind") == "edm":
        sd, want = precond.pop("sigma_data", None), sched.get("sigma_data")
        if not (isinstance(sd, (int, float)) and isinstance(want, (int, float)) and math.isclose(sd, want)):
            raise _refuse(where, f"has precond.sigma_data {sd} but schedule.sigma_data {want}")
    _check_classes(d, where)
    dataset = dict(d.get("dataset") or {})
    if dataset.pop("vae", d["vae"]) != d["vae"]:
        raise _refuse(where, "names another VAE in dataset.vae than in vae")
    keep = ("model", "schedule", "vae", "weights", "step", "images_seen", "train_config", "checkpoint")
    return {"format": d["format"], "format_version": 2, "precond": precond, "dataset": dataset,
            **{k: d[k] for k in keep if k in d}}
