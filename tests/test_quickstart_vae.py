"""The quickstart's ``--vae`` switch (issue 16): pixel / train (cached by recipe + data + code) / pretrained."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up; quickstart.py imports quickstart_vae by name
    spec.loader.exec_module(mod)
    return mod


qv = _load("quickstart_vae")


def _finish(plan):
    """What a finished training leaves in the cache directory."""
    (plan.cache_dir / "vae").mkdir(parents=True)
    (plan.cache_dir / "vae" / "config.json").write_text("{}")
    (plan.cache_dir / "training.json").write_text("{}")
    qv.mark_cached(plan.cache_dir, plan)


def test_none_is_pixel_space_and_a_path_or_hub_id_is_pretrained(tmp_path):
    pixel = qv.resolve_vae("none", tmp_path)
    assert (pixel.mode, pixel.vae, pixel.cache_dir) == ("pixel", "none", None)
    assert qv.resolve_vae("NONE", tmp_path).mode == "pixel"
    for spec in (str(tmp_path / "my-vae"), "stabilityai/sd-vae-ft-ema"):
        plan = qv.resolve_vae(spec, tmp_path)
        assert (plan.mode, plan.vae, plan.train_flags) == ("pretrained", spec, [])
    with pytest.raises(SystemExit, match="--vae is empty"):
        qv.resolve_vae("  ", tmp_path)
    assert not list(tmp_path.iterdir())  # resolving never writes


def test_train_is_cached_by_recipe_data_and_code(tmp_path):
    plan = qv.resolve_vae("train", tmp_path, small=True, nproc=1, data_hash="a" * 64)
    assert plan.mode == "train" and not plan.cached
    assert plan.cache_dir.parent == tmp_path and plan.vae == str(plan.cache_dir / "vae")
    assert plan.train_flags == qv.AE_FLAGS_SMALL
    # a killed training (no cache.json yet) is not reused: the same command resumes it
    plan.cache_dir.mkdir()
    (plan.cache_dir / "training.json").write_text("{}")
    assert not qv.resolve_vae("train", tmp_path, small=True, data_hash="a" * 64).cached
    _finish(plan)
    again = qv.resolve_vae("train", tmp_path, small=True, data_hash="a" * 64)
    assert again.cached and again.cache_dir == plan.cache_dir
    # other pixels, another recipe, another rank count or other trainer code: another key, not cached
    for other in (qv.resolve_vae("train", tmp_path, small=True, data_hash="b" * 64),
                  qv.resolve_vae("train", tmp_path, small=False, data_hash="a" * 64),
                  qv.resolve_vae("train", tmp_path, small=True, nproc=2, data_hash="a" * 64)):
        assert other.key != plan.key and other.cache_dir != plan.cache_dir and not other.cached
    assert qv.cache_key(plan.train_flags, 1, "a" * 64, "c" * 64) != qv.cache_key(plan.train_flags, 1, "a" * 64, "d" * 64)
    assert qv.cache_key(plan.train_flags, 1, "a" * 64) == plan.key  # the default code hash is the trainer's source
    # a cache.json of another key in the same directory (e.g. a hand-copied directory) is not trusted
    meta = json.loads((plan.cache_dir / "cache.json").read_text())
    (plan.cache_dir / "cache.json").write_text(json.dumps({**meta, "key": "0" * 64}))
    assert not qv.is_cached(plan.cache_dir, plan.key)


def test_two_ranks_split_the_batch_of_the_recipe(tmp_path):
    from latentdiff.cli.train_autoencoder import parse_args

    one = qv.resolve_vae("train", tmp_path, nproc=1, data_hash="a" * 64)
    two = qv.resolve_vae("train", tmp_path, nproc=2, data_hash="a" * 64)
    b1 = parse_args([*one.train_flags, "--output", "x"]).batch_size
    b2 = parse_args([*two.train_flags, "--output", "x"]).batch_size
    assert b1 == 2 * b2 and parse_args([*two.train_flags, "--output", "x"]).preset == "f4"


def test_the_data_hash_is_the_trainers_hash_of_the_pixels():
    from latentdiff.training.autoencoder.images import load_images

    h = qv.data_sha256(qv.AE_FLAGS_SMALL)
    assert h == load_images([], 160, 32, 0.2, 2).sha256()
    assert h != qv.data_sha256([*qv.AE_FLAGS_SMALL, "--resolution", "192"])


def test_resolution_gives_16x16_model_inputs(trained_tiny_ae):
    assert qv.resolution_for(qv.VaePlan("pixel", "none")) == 16
    assert qv.resolution_for(qv.VaePlan("pretrained", trained_tiny_ae["vae"])) == 64  # f4


def test_reconstructions_and_spectra_figures(trained_tiny_ae, tmp_path):
    from PIL import Image

    x = torch.rand(3, 3, 32, 32) * 2 - 1
    rec = qv.reconstructions(trained_tiny_ae["vae"], x, tmp_path / "rec.png")
    assert rec["n"] == 3 and math.isfinite(rec["psnr"]) and -1 <= rec["ssim"] <= 1
    assert Image.open(tmp_path / "rec.png").size == (3 * 32, 2 * 32)
    p = torch.rand(4, 16, 16, dtype=torch.float64)
    qv.spectra_figure(p, torch.rand(3, 64, 64, dtype=torch.float64), tmp_path / "s.png", "latents")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_first_images_take_one_per_class_first(tmp_path):
    from PIL import Image

    for cls, colour in (("a", 10), ("b", 200)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 48), (colour + i, 0, 0)).save(tmp_path / cls / f"{i:04d}.png")
    x = qv.first_images(tmp_path, 32, 3)
    assert x.shape == (3, 3, 32, 32)
    reds = ((x[:, 0, 0, 0] + 1) * 127.5).round().tolist()
    assert reds == [10, 200, 11]


def test_report_latent_section():
    qs = _load("quickstart")
    assert qs.latent_section(None, {}) == ""
    latent = {"vae": "/c/vae", "cached": True, "reconstruction": {"n": 14, "psnr": 25.5, "ssim": 0.8},
              "autoencoder": {"heldout_psnr": 25.1, "heldout_ssim": 0.79, "steps": 1500, "cpu_seconds": 290.0,
                              "world_size": 2, "scaling_factor": 0.6, "shift_factor": 0.1}}
    md = qs.latent_section(latent, {"sigma_factor": 0.5, "p_mean_shift": -0.69})
    assert "reused from the cache" in md and "25.10 dB" in md and "sigma x 0.5000" in md and "P_mean -0.6900" in md
    assert "reconstructions.png" in md and "spectra.png" in md
