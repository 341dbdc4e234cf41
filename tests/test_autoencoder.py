"""The autoencoder trainer: SSIM against scikit-image, the split, bad input, resume, the export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from latentdiff.data.photos import load_photo
from latentdiff.training.autoencoder import loop
from latentdiff.training.autoencoder.config import AutoencoderConfig
from latentdiff.training.autoencoder.images import load_images
from latentdiff.training.autoencoder.losses import psnr, ssim
from latentdiff.training.autoencoder.model import build_autoencoder, latent_statistics
from latentdiff.utils.errors import ConfigError, TrainError
from latentdiff.vae.autoencoder import Autoencoder

TINY = {"resolution": 96, "crop": 16, "block_out_channels": [8, 16], "stat_crops": 16, "batch_size": 4, "eval_every": 0,
            "progress": False, "precision": "fp32"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions: two OpenMP threads on a loaded 2-core machine cost ~10x one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _photo_folder(root, names=("astronaut", "coffee", "chelsea"), size=96):
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(load_photo(n)).resize((size, size), Image.BICUBIC).save(root / f"{n}.png")
    return root


def _to_unit_np(t):
    return ((t.permute(1, 2, 0).double().numpy() + 1) / 2)


@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_ssim_matches_scikit_image(noise):
    x = torch.from_numpy(load_photo("astronaut")[100:164, 150:230]).permute(2, 0, 1).float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ref = structural_similarity(_to_unit_np(x), _to_unit_np(y), data_range=1.0, channel_axis=2,
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    ours = float(ssim(x[None], y[None])[0])
    assert abs(ours - ref) < 1e-4, (ours, ref)
    assert float(ssim(x[None], x[None])[0]) == pytest.approx(1.0, abs=1e-6)


def test_psnr_is_ten_log_ratio():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 with L = 2: 10 log10(4 / 0.01)
    y[1] += 0.2
    assert torch.allclose(psnr(y, x), torch.tensor([10 * np.log10(400.0), 10 * np.log10(100.0)]).float())


def test_heldout_columns_never_trained_on():
    images = load_images([], 128, 16, 0.2, 2)
    images.images[:] = 0
    images.images[:, :, -images.val_width:] = 255  # the held-out strip is white, the rest black
    crops = images.train_crops(500, np.random.default_rng(0))
    assert float(crops.max()) == -1.0
    assert float(images.heldout_crops().min()) == 1.0
    assert len(images.heldout_crops()) == len(images.names) * (128 // 16)


def test_bad_inputs_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="--min-images"):
        load_images([str(_photo_folder(tmp_path / "one", names=("coffee",)))], 64, 16, 0.2, 2)
    small = _photo_folder(tmp_path / "small")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(small / "tiny.png")
    with pytest.raises(ConfigError, match="smaller than --crop 16.*tiny.png"):
        load_images([str(small)], 64, 16, 0.2, 2)
    with pytest.raises(ConfigError, match="raise --resolution"):
        load_images([], 64, 32, 0.2, 2)
    with pytest.raises(ConfigError, match="divisible by the downsampling factor 4"):
        AutoencoderConfig(output="x", crop=18).validate()
    with pytest.raises(ConfigError, match="--norm-num-groups 3"):
        AutoencoderConfig(output="x", norm_num_groups=3).validate()


def _cfg(tmp_path, inputs, **kw):
    return AutoencoderConfig(inputs=[str(inputs)], output=str(tmp_path / "out"), **{**TINY, **kw})


def test_export_loads_with_vae_dir_and_sets_scaling_from_data(tmp_path):
    src = _photo_folder(tmp_path / "in")
    summary = loop.train_autoencoder(_cfg(tmp_path, src, steps=4))
    saved = json.loads((tmp_path / "out" / "training.json").read_text())
    assert saved["command"] and len(saved["data_sha256"]) == 64 and saved["steps"] == 4
    assert np.isfinite(saved["heldout_psnr"]) and 0 < saved["heldout_ssim"] <= 1
    ae = Autoencoder.load(summary["vae"])
    assert ae.downsampling_factor == 2 and ae.latent_channels == 4
    images = load_images([str(src)], 96, 16, 0.2, 2)
    crops = images.train_crops(16, np.random.default_rng([0, 1 << 20]))
    mean, std = latent_statistics(ae.vae, crops)
    assert ae.scaling_factor == pytest.approx(1 / std, rel=1e-5) and ae.scaling_factor != 0.18215
    assert ae.shift_factor == pytest.approx(mean, rel=1e-5, abs=1e-7)


def test_latent_statistics_are_the_exact_moments_of_the_sampled_latents():
    torch.manual_seed(0)
    vae = build_autoencoder(AutoencoderConfig(output="x", block_out_channels=[8, 8]).architecture(), 0).eval()
    crops = torch.rand(5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        d = vae.encode(crops).latent_dist
        m, s = d.mean.double(), d.std.double()
        mean, std = latent_statistics(vae, crops, batch=2)  # batching does not change the moments
        # Monte Carlo check of Var[m + s eps] = Var[m] + E[s^2]
        z = m + s * torch.randn((400, *m.shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert mean == pytest.approx(float(m.mean()), rel=1e-6)
    assert std == pytest.approx(float((m.var(unbiased=False) + s.pow(2).mean()).sqrt()), rel=1e-6)
    assert std == pytest.approx(float(z.std()), rel=0.01) and std > float(m.std()) * 1.01


def test_encode_stage_accepts_the_trained_vae(tmp_path):
    from latentdiff.data.encode import EncodeConfig, encode_dataset

    src = _photo_folder(tmp_path / "in")
    summary = loop.train_autoencoder(_cfg(tmp_path, src, steps=2))
    out = tmp_path / "latents"
    enc = encode_dataset(EncodeConfig(inputs=[str(src)], output=str(out), resolution=32, vae=summary["vae"],
                                      workers=0, progress=False, batch_size=4))
    assert enc["encoded"] == 3 if "encoded" in enc else (out / "dataset.json").is_file()
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["vae"]["scaling_factor"] == pytest.approx(summary["scaling_factor"])


def test_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    src = _photo_folder(tmp_path / "in")
    ref = loop.train_autoencoder(_cfg(tmp_path / "a", src, steps=6))
    real_step = loop._step

    def dying(cfg, fwd, images, opt, sched, step, device):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return real_step(cfg, fwd, images, opt, sched, step, device)

    monkeypatch.setattr(loop, "_step", dying)
    with pytest.raises(KeyboardInterrupt):
        loop.train_autoencoder(_cfg(tmp_path / "b", src, steps=6, checkpoint_every=2))
    assert json.loads((tmp_path / "b" / "out" / "checkpoint" / "state.json").read_text())["step"] == 4
    monkeypatch.setattr(loop, "_step", real_step)
    resumed = loop.train_autoencoder(_cfg(tmp_path / "b", src, steps=6, checkpoint_every=2))
    a, b = Autoencoder.load(ref["vae"]).vae, Autoencoder.load(resumed["vae"]).vae
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name
    with pytest.raises(TrainError, match="another architecture.*block_out_channels"):
        loop.train_autoencoder(_cfg(tmp_path / "b", src, steps=6, block_out_channels=[8, 32]))


@pytest.mark.slow  # two processes under torchrun
def test_two_ranks_under_torchrun(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = _photo_folder(tmp_path / "in")
    tool = Path(__file__).resolve().parents[1] / "tools" / "train_autoencoder.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    args = ["--input", str(src), "--output", str(tmp_path / "out"), "--resolution", "96", "--crop", "16",
            "--block-out-channels", "[8, 16]", "--steps", "3", "--stat-crops", "8", "--precision", "fp32",
            "--progress", "false"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tool), *args], check=False, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert Autoencoder.load(summary["vae"]).latent_channels == 4
