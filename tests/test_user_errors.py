"""Mistakes a new user makes, each refused with a message that says what is wrong and what to do (issue 14)."""
from types import SimpleNamespace

import numpy as np
import pytest

from latentdiff.utils.errors import FIDError, SampleError


def test_nfe_above_the_documented_maximum_is_refused():
    from latentdiff.sampling.config import MAX_NFE, SampleConfig

    assert SampleConfig(export="E", out="O", nfe=MAX_NFE).validate().nfe == MAX_NFE
    for kw in ({"nfe": 100000}, {"steps": MAX_NFE + 1}):
        with pytest.raises(SampleError, match=rf"must be in \[1, {MAX_NFE}\], got"):
            SampleConfig(export="E", out="O", **kw).validate()


def test_class_label_on_an_unconditional_export_says_it_is_unconditional(monkeypatch):
    from latentdiff.sampling import source
    from latentdiff.sampling.config import SampleConfig

    monkeypatch.setattr(source, "_from_export", lambda cfg, device: SimpleNamespace(
        sigma_min=0.002, sigma_max=80.0, num_classes=0))
    with pytest.raises(SampleError, match="--class-label needs a class-conditional model; this one is unconditional"):
        source.load_source(SampleConfig(export="E", out="O", class_label=1).validate(), "cpu")


def test_a_text_file_as_fid_reference_is_named_as_such(tmp_path):
    from latentdiff.metrics.reference import load_reference

    txt = tmp_path / "ref.npz"
    txt.write_text("mu sigma\n1 2 3\n")
    with pytest.raises(FIDError, match=r"ref.npz is not an .npz file \(it starts with text\); build reference") as e:
        load_reference(txt)
    assert "pickle" not in str(e.value)
    npy = tmp_path / "ref2.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(FIDError, match=r"starts with a .npy array"):
        load_reference(npy)


def test_names_from_other_trainers_suggest_the_field_they_stand_for():
    import dataclasses

    from latentdiff.training.config import TrainConfig
    from latentdiff.utils.config import load_config
    from latentdiff.utils.errors import ConfigError

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(TrainConfig.ALIASES.values()) <= fields  # every alias points at a real field
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, "tiny-cpu", {"learning_rate": 1e-3, "epochs": 3, "max_grad_norm": 1.0,
                                              "save_every": 10, "workers": 2})
    msg = str(e.value)
    for wrong, right in (("learning_rate", "lr"), ("epochs", "duration_images"), ("max_grad_norm", "grad_clip"),
                         ("save_every", "checkpoint_every"), ("workers", "num_workers")):
        assert f"{wrong} (did you mean {right}?)" in msg, msg


def test_torch_extensions_go_into_the_environment_and_the_first_build_is_announced(tmp_path, monkeypatch):
    from latentdiff.training import runtime

    venv = tmp_path / "venv"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(runtime.sys, "prefix", str(venv))
    monkeypatch.setattr(runtime.sys, "base_prefix", "/usr")
    notes = []
    root = runtime.use_environment_extensions_dir(log=notes.append)
    assert root == venv / "torch_extensions" and runtime.os.environ["TORCH_EXTENSIONS_DIR"] == str(root)
    assert len(notes) == 1 and "builds DeepSpeed's CPU communication op" in notes[0] and str(root) in notes[0]
    op = root / "py311_cpu" / "deepspeed_shm_comm"
    op.mkdir(parents=True)
    (op / "deepspeed_shm_comm.so").write_bytes(b"")
    runtime.use_environment_extensions_dir(log=notes.append)
    assert len(notes) == 1  # built: nothing to say
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))  # a user's choice is kept
    assert runtime.use_environment_extensions_dir() == tmp_path / "mine"


def test_deepspeed_collective_deprecations_are_filtered_and_nothing_else():
    import warnings

    from latentdiff.training.runtime import quiet_deepspeed_deprecations

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_deepspeed_deprecations()
        for _ in range(4):
            warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
                          "`torch.distributed.reduce_scatter_single` instead.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
