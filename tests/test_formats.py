"""The typed records of the encode and train stages: ``DatasetManifest`` (``dataset.json``) and
``TrainerState`` (``trainer_state.json``): one ``validate`` each, each value stored once, and the files
the previous commit wrote (``tests/fixtures/format_v1/``) still load."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil

import pytest
from v1_formats import FIXTURES, manifest_as_v1, state_as_v1

from latentdiff.contracts.manifest import DatasetManifest, ShardEntry, load_manifest
from latentdiff.data.reader import LatentShardDataset, verify_dataset
from latentdiff.training.config import TrainConfig
from latentdiff.training.schedule import resolve_schedule
from latentdiff.training.state import TrainerState, load_trainer_state
from latentdiff.utils.errors import DataError, TrainError


# ----------------------------------------------------------------------------------------------
# dataset.json


def test_v1_manifest_loads_and_its_stored_totals_equal_the_derived_ones():
    real = json.loads((FIXTURES / "dataset.json").read_text())
    m = load_manifest(FIXTURES)
    assert real["format_version"] == 1 and m.num_samples == real["num_samples"] == 48
    # everything version 1 stored is either a field or follows from the fields: the converter rebuilds it
    assert manifest_as_v1(m, real["fingerprint"]) == real
    # the current format stores each value once and reads back to the same manifest
    new = m.to_json()
    assert new["format_version"] == 2 and DatasetManifest.from_json(json.loads(json.dumps(new))) == m
    assert not {"num_samples", "num_images", "shards_hash", "images_per_chunk", "num_chunks", "fingerprint"} & set(new)
    assert "total" not in new["skipped"]


def test_v1_manifest_edited_by_hand_is_refused(tmp_path):
    real = json.loads((FIXTURES / "dataset.json").read_text())
    for key, value in (("num_images", 7), ("shards_hash", "0" * 64), ("num_samples", 47)):
        d = dict(real, **{key: value})
        (tmp_path / "dataset.json").write_text(json.dumps(d))
        with pytest.raises(DataError, match=key):
            load_manifest(tmp_path)


def test_manifest_validate_names_the_field_and_the_fix():
    m = load_manifest(FIXTURES)
    bad = [
        (dict(sample_shape=(3, 16, 16)), "latent_channels 4 != sample_shape channels 3"),
        (dict(sample_shape=(4, 8, 8)), "does not match resolution 32"),
        (dict(class_names=["a", "b"]), "2 class_names but num_classes is 3"),
        (dict(shards=[]), "'shards' is empty"),
        (dict(shards=[ShardEntry("shard-000000.tar", 0, "a" * 64, 10)]), "malformed"),
        (dict(shards=m.shards + m.shards[:1]), "lists a shard twice"),
        (dict(vae={"id": "x"}), "expected the VAE description"),
        (dict(vae="none"), "pixel space"),
        (dict(num_labelled=10**6), "num_labelled"),
    ]
    for change, msg in bad:
        with pytest.raises(DataError, match=msg) as e:
            dataclasses.replace(m, **change).validate("X/dataset.json")
        assert str(e.value).startswith("X/dataset.json: ") and "re-run tools/encode_latents.py" in str(e.value)
    d = m.to_json()
    for k, v, msg in (("format", "other", "'format' is 'other'"), ("format_version", 3, "re-encode"),
                      ("sample_shape", "4x16x16", "malformed field")):
        with pytest.raises(DataError, match=msg):
            DatasetManifest.from_json(dict(d, **{k: v}))


def test_a_v1_dataset_is_read_and_trained_on_as_before(tiny_dataset, tmp_path):
    """The shards of a dataset whose dataset.json is in the previous format are verified, read and give
    the same noise schedule as the current format."""
    old = tmp_path / "old"
    shutil.copytree(tiny_dataset, old)
    fingerprint = json.loads((old / "encode.json").read_text())
    (old / "dataset.json").write_text(json.dumps(manifest_as_v1(load_manifest(tiny_dataset), fingerprint)))
    assert json.loads((old / "dataset.json").read_text())["format_version"] == 1
    assert load_manifest(old) == load_manifest(tiny_dataset)
    assert verify_dataset(old, mode="sha256", rank=0, world_size=1)["checked"] == len(load_manifest(old).shards)
    keys = [k for _, _, _, ks in LatentShardDataset(old, 8, rank=0, world_size=1, shuffle=False, verify="none")
            for k in ks]
    assert len(keys) == len(set(keys)) > 0
    a = resolve_schedule(TrainConfig(dataset=str(old)))
    b = resolve_schedule(TrainConfig(dataset=str(tiny_dataset)))
    da, db = a.to_dict(), b.to_dict()
    for s in (da, db):
        s["wsnr"].pop("reference")  # the dataset's own path
        s["shift"].pop("reference")
    assert da == db


# ----------------------------------------------------------------------------------------------
# trainer_state.json


def test_v1_trainer_state_loads_and_its_copies_agree():
    real = json.loads((FIXTURES / "trainer_state.json").read_text())
    st = load_trainer_state(FIXTURES)
    assert "format" not in real and st.step == real["step"] == 2
    assert (st.num_classes, st.null_label, st.precond) == (real["num_classes"], real["null_label"], real["precond"])
    assert state_as_v1(st.to_json()) == real  # the converter of the slow tests reproduces the real layout
    new = json.loads(st.dumps())
    assert new["format_version"] == 2 and not {"num_classes", "null_label", "precond"} & set(new)
    assert TrainerState.from_json(new) == st


def test_trainer_state_refuses_inconsistent_or_incomplete_files(tmp_path):
    real = json.loads((FIXTURES / "trainer_state.json").read_text())
    edited = [("num_classes", 5, "num_classes 5 disagrees"), ("null_label", 0, "null_label 0 disagrees"),
              ("precond", {"kind": "edm", "sigma_data": 1.0}, "precond .* disagrees")]
    for key, value, msg in edited:
        with pytest.raises(TrainError, match=msg):
            TrainerState.from_json(dict(real, **{key: value}), "S")
    for key in ("schedule", "step"):
        d = copy.deepcopy(real)
        d.pop(key)
        with pytest.raises(TrainError, match=rf"fields \['{key}'\] are missing"):
            TrainerState.from_json(d)
    bad = copy.deepcopy(real)
    bad["schedule"]["sigma_data"] = -1.0
    with pytest.raises(TrainError, match="sigma_data"):
        TrainerState.from_json(bad)
    with pytest.raises(TrainError, match="version 9"):
        TrainerState.from_json({**real, "format": "latentdiff-trainer-state", "format_version": 9})
    (tmp_path / "trainer_state.json").write_text("{not json")
    with pytest.raises(TrainError, match="not valid JSON"):
        load_trainer_state(tmp_path)
    with pytest.raises(TrainError, match="is missing"):
        load_trainer_state(tmp_path / "nowhere")


def test_trainer_state_precond_is_the_schedules_sigma_data():
    st = load_trainer_state(FIXTURES)
    assert st.precond["kind"] == "edm" and math.isclose(st.precond["sigma_data"], st.schedule["sigma_data"])
    uncond = dataclasses.replace(st, model_config={**st.model_config, "num_classes": 0})
    assert uncond.num_classes == 0 and uncond.null_label is None


def test_force_resume_cannot_load_another_network():
    """--force-resume accepts a changed config, not a changed network (a raw size-mismatch traceback before)."""
    from latentdiff.contracts.schedule import TrainingSchedule
    from latentdiff.training.resume import check_resume

    st = load_trainer_state(FIXTURES)
    same = dict(st.model_config)
    sched = TrainingSchedule.from_dict(st.schedule)
    assert check_resume(FIXTURES, st, st.config, sched, world=1, zero_stage=2, force=False, model_config=same) == []
    lr = {**st.config, "lr": 0.5}
    assert check_resume(FIXTURES, st, lr, sched, world=1, zero_stage=2, force=True, model_config=same)
    with pytest.raises(TrainError, match="refusing to resume"):
        check_resume(FIXTURES, st, lr, sched, world=1, zero_stage=2, force=False, model_config=same)
    # a change that keeps every weight's shape (gradient checkpointing) may be forced
    ckpt = {**same, "grad_checkpointing": not same["grad_checkpointing"]}
    assert check_resume(FIXTURES, st, lr, sched, world=1, zero_stage=2, force=True, model_config=ckpt)
    wider = {**same, "width": 2 * same["width"]}
    with pytest.raises(TrainError, match=rf"another network \(width: {same['width']} -> {2 * same['width']}\).*with or without --force-resume"):
        check_resume(FIXTURES, st, st.config, sched, world=1, zero_stage=2, force=True, model_config=wider)

