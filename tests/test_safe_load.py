"""Checkpoints cannot run code: a ``__reduce__`` payload planted in every file kind latentdiff reads is
refused with a message naming the file, and the payload never runs (its marker file is never created)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from crash_report import cause

from latentdiff.utils.errors import FIDError
from latentdiff.utils.safe_load import (
    DEEPSPEED_CHECKPOINT_GLOBALS,
    UnreadableFileError,
    UnsafeFileError,
    deepspeed_globals,
    load_npz,
    load_safetensors,
    safe_torch_load_scope,
    torch_load,
)

REPO = Path(__file__).resolve().parents[1]


class Plant:
    """Unpickling this object calls ``open(marker, "w")``: the marker file exists iff the payload ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path, base=None):
    """Write ``path`` as a torch file holding ``base`` (a dict) plus the payload."""
    torch.save({**(base or {}), "latentdiff_test_payload": Plant(marker)}, path)


def _refused(fn, path: Path, marker: Path, error=UnsafeFileError):
    with pytest.raises(error) as ei:
        fn()
    assert str(path) in str(ei.value), ei.value
    assert not marker.exists(), "the payload ran"
    return str(ei.value)


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    """The test's premise: this file runs code under torch.load(weights_only=False)."""
    f, marker = tmp_path / "x.pt", tmp_path / "ran"
    _plant(f, marker)
    torch.load(f, weights_only=False)
    assert marker.exists()


def test_torch_load_refuses_a_payload_and_allows_only_the_named_deepspeed_classes(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    f, marker = tmp_path / "model.pt", tmp_path / "ran"
    _plant(f, marker, {"w": torch.ones(2)})
    msg = _refused(lambda: torch_load(f, allow=deepspeed_globals()), f, marker)
    assert "(it needs io.open)" in msg and "weights_only" in msg  # the global the payload would import
    # what a real DeepSpeed checkpoint holds loads, but only when allowed
    ok = tmp_path / "ds.pt"
    torch.save({"ls": LossScaler(2.0), "dls": DynamicLossScaler(init_scale=4.0, scale_window=10, min_scale=1.0, delayed_shift=1, consecutive_hysteresis=False), "stage": ZeroStageEnum(2),
                "frag": fragment_address(numel=3, start=1), "t": torch.arange(3)}, ok)
    d = torch_load(ok, allow=deepspeed_globals())
    assert d["ls"].cur_scale == 2.0 and d["dls"].cur_scale == 4.0 and d["stage"] == ZeroStageEnum(2)
    assert d["frag"].numel == 3 and torch.equal(d["t"], torch.arange(3))
    with pytest.raises(UnsafeFileError, match="LossScaler"):
        torch_load(ok)
    assert [c.__module__ + "." + c.__name__ for c in deepspeed_globals()] == list(DEEPSPEED_CHECKPOINT_GLOBALS)


def test_deepspeed_loaders_inside_the_scope_refuse_both_checkpoint_files(tmp_path):
    """The calls DeepSpeed makes on resume (its checkpoint engine) and in zero_to_fp32 (model and optimizer
    states) pass weights_only=False; inside the scope they are weights_only and refuse the payload."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )
    from deepspeed.utils import zero_to_fp32

    real_load = torch.load
    model, optim, marker = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "ran"
    _plant(model, marker, {"module": {"model.w": torch.ones(2)}})
    _plant(optim, marker, {"optimizer_state_dict": {}})
    engine = TorchCheckpointEngine()
    with safe_torch_load_scope():
        for f in (model, optim):
            _refused(lambda f=f: engine.load(str(f), map_location="cpu"), f, marker)
        _refused(lambda: zero_to_fp32.parse_model_states([str(model)]), model, marker)
        _refused(lambda: zero_to_fp32.parse_optim_states([str(optim)], str(tmp_path)), optim, marker)
    assert torch.load is real_load  # the scope restores torch.load
    with pytest.raises(UnsafeFileError), safe_torch_load_scope():
        engine.load(str(model))
    assert torch.load is real_load  # also after an error


def test_export_of_a_planted_checkpoint_is_refused(tmp_path):
    """``latentdiff-export``'s two paths: ZeRO-0 module states (own load) and zero_to_fp32 (ZeRO-1/2/3)."""
    from latentdiff.training.export import _raw_weights

    marker = tmp_path / "ran"
    z0 = tmp_path / "z0" / "step_00000002"
    z0.mkdir(parents=True)
    _plant(z0 / "mp_rank_00_model_states.pt", marker, {"module": {"model.w": torch.ones(2)}})
    _refused(lambda: _raw_weights(z0), z0 / "mp_rank_00_model_states.pt", marker)
    z2 = tmp_path / "z2" / "step_00000002"
    z2.mkdir(parents=True)
    # zero_to_fp32 reads the model states first (the optimizer states' own refusal: the test above)
    _plant(z2 / "mp_rank_00_model_states.pt", marker, {"module": {}})
    torch.save({"optimizer_state_dict": {}}, z2 / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (z2.parent / "latest").write_text(z2.name)
    with pytest.raises(UnsafeFileError) as ei:
        _raw_weights(z2)
    assert "_states.pt" in str(ei.value) and str(z2) in str(ei.value) and not marker.exists()


def test_ema_files_that_are_pickles_or_corrupt_are_refused_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    from latentdiff.training.ema import consolidate

    ck, marker = tmp_path / "step_00000002", tmp_path / "ran"
    ck.mkdir()
    _plant(ck / "ema.safetensors", marker)  # a pickle under the EMA's name
    _refused(lambda: consolidate(ck), ck / "ema.safetensors", marker, error=UnreadableFileError)  # safetensors never unpickles
    save_file({"a": torch.ones(3)}, str(ck / "ema.safetensors"))
    data = bytearray((ck / "ema.safetensors").read_bytes())
    data[8:20] = b"{corrupt!!!!"  # inside the JSON header
    (ck / "ema.safetensors").write_bytes(bytes(data))
    msg = _refused(lambda: consolidate(ck), ck / "ema.safetensors", marker, error=UnreadableFileError)
    assert "not a valid safetensors file" in msg


def test_export_weights_checksums_and_payloads(real_export_dir):
    """model.json records each weight file's sha256; a flipped byte, a corrupt header and a pickle under a
    weight file's name are refused naming the file; the payload never runs."""
    from latentdiff.contracts.export import load_export
    from latentdiff.utils.errors import ExportError
    from latentdiff.utils.io import sha256_file

    d = real_export_dir
    meta = json.loads((d / "model.json").read_text())
    sums = meta["weights"]["sha256"]
    assert set(sums) == {meta["weights"]["raw"], *meta["weights"]["ema"].values()}
    assert all(sums[f] == sha256_file(d / f) for f in sums)
    load_export(d, weights="raw")
    raw = d / meta["weights"]["raw"]
    good = raw.read_bytes()
    flipped = bytearray(good)
    for i in range(len(good) - 1000, len(good)):  # 1000 bytes inside the tensor data
        flipped[i] ^= 0xFF
    raw.write_bytes(bytes(flipped))
    with pytest.raises(ExportError, match="sha256") as ei:
        load_export(d, weights="raw")
    assert str(raw) in str(ei.value)
    # with a matching checksum, the reader itself refuses a corrupt header and a pickle (named)
    marker = d.parent / "ran"
    corrupt = bytearray(good)
    corrupt[8:20] = b"{corrupt!!!!"
    for content in (bytes(corrupt), None):
        if content is None:
            _plant(raw, marker)
        else:
            raw.write_bytes(content)
        meta["weights"]["sha256"][raw.name] = sha256_file(raw)
        (d / "model.json").write_text(json.dumps(meta))
        _refused(lambda: load_export(d, weights="raw"), raw, marker, error=Exception)
    raw.write_bytes(good)


@pytest.fixture
def real_export_dir(tmp_path):
    """A copy of an export written by ``export_checkpoint`` from a fabricated ZeRO-0 checkpoint."""
    from latentdiff.models import from_config
    from latentdiff.training.export import export_checkpoint
    from latentdiff.training.state import STATE_FILE

    fixture = REPO / "tests" / "fixtures" / "format_v1"
    states = sorted(fixture.glob("trainer_state.json"))
    assert states, f"the committed fixture {fixture}/trainer_state.json is missing"
    state = json.loads(states[0].read_text())
    ck = tmp_path / "run" / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    shutil.copy(states[0], ck / STATE_FILE)
    net = from_config(state["model_config"])
    torch.save({"module": {"model." + k: v for k, v in net.state_dict().items()}}, ck / "mp_rank_00_model_states.pt")
    from safetensors.torch import save_file

    from latentdiff.training.ema import _key

    rates = [0.9]
    tensors = {_key(r, n): p.detach().float().contiguous() for r in rates for n, p in net.named_parameters()}
    meta = {"rates": json.dumps(rates), "zero3": "false", "world_size": "1", "rank": "0",
            "shapes": json.dumps({n: list(p.shape) for n, p in net.named_parameters()}),
            "numels": json.dumps({n: p.numel() for n, p in net.named_parameters()})}
    save_file(tensors, str(ck / "ema.safetensors"), metadata=meta)
    return export_checkpoint(ck, tmp_path / "export")


def test_reference_statistics_with_pickled_arrays_are_refused(tmp_path):
    from latentdiff.metrics.reference import load_reference, save_reference

    marker = tmp_path / "ran"
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(3), sigma=np.array([Plant(marker)], dtype=object))
    msg = _refused(lambda: load_reference(ref), ref, marker)
    assert "'sigma'" in msg
    with open(ref, "wb") as f:  # a pickle under an .npz name
        import pickle

        pickle.dump({"mu": Plant(marker)}, f)
    assert "pickle" in _refused(lambda: load_reference(ref), ref, marker, error=FIDError)
    save_reference(ref, np.zeros(3), np.eye(3))
    assert load_npz(ref)["sigma"].shape == (3, 3)


def test_inception_weights_with_a_payload_are_refused(tmp_path):
    from latentdiff.metrics.inception import load_feature_extractor

    f, marker = tmp_path / "weights-inception-2015-12-05-6726825d.pth", tmp_path / "ran"
    _plant(f, marker, {"fc.weight": torch.zeros(2)})
    _refused(lambda: load_feature_extractor(f), f, marker)


def test_load_safetensors_names_a_truncated_file(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(100)}, str(f))
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(UnreadableFileError, match="not a valid safetensors file") as ei:
        load_safetensors(f)
    assert str(f) in str(ei.value)


# ----------------------------------------------------------------------------------------------
# end to end on real checkpoints: resume (DeepSpeed's engine) and latentdiff-export (zero_to_fp32)


def _torchrun(args, port):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("LATENTDIFF_FAULT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port),
           "-m", "latentdiff.train", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO, check=False)


@pytest.mark.slow
def test_resume_and_export_refuse_a_payload_in_real_deepspeed_checkpoints(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    args = ["--config", "tiny-cpu", "--dataset", tiny_dataset, "--run-dir", run, "--heldout-batch", 0,
            "--deepspeed_config", REPO / "ds_configs" / "zero2.json", "--checkpoint-every", 2]
    port = 29400 + os.getpid() % 300
    p = _torchrun([*args, "--max-steps", 2], port)
    assert p.returncode == 0, cause(p)
    ck = run / "checkpoints" / "step_00000002"
    marker = tmp_path / "ran"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        f = ck / name
        good = f.read_bytes()
        _plant(f, marker, torch.load(f, weights_only=False))  # the real content plus the payload
        p = _torchrun([*args, "--max-steps", 4], port + 1)
        assert p.returncode != 0 and f"refusing to load {f}" in p.stderr, cause(p)
        assert not marker.exists() and not (run / "checkpoints" / "step_00000004").exists()
        e = subprocess.run([sys.executable, "-m", "latentdiff.cli.export", str(run), "--out", str(tmp_path / "exp")],
                           capture_output=True, text=True, timeout=120, cwd=REPO,
                           env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert e.returncode == 2 and f"refusing to load {f}" in e.stderr, cause(e)
        assert not marker.exists() and not (tmp_path / "exp").exists()
        f.write_bytes(good)
    p = _torchrun([*args, "--max-steps", 4], port + 2)  # the untouched checkpoint resumes through the same loader
    assert p.returncode == 0 and "resumed from" in p.stdout, cause(p)


def test_dataset_statistics_sidecars_with_pickled_arrays_are_refused(tmp_path):
    """The encoder's per-chunk ``*.stats.npz`` (read on resume and by tools/dataset_stats.py)."""
    from latentdiff.data.encode_chunks import read_sidecar

    marker, f = tmp_path / "ran", tmp_path / "shard-000000.stats.npz"
    np.savez(f, n=np.array(3), meta_json=np.array([Plant(marker)], dtype=object))
    assert "'meta_json'" in _refused(lambda: read_sidecar(f), f, marker)
