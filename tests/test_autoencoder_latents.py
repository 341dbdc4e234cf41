"""Tests where the latent structure matters, in the latent space of a *trained* autoencoder."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentdiff.diffusion.shift import wsnr_log_factor
from latentdiff.diffusion.spectral import power_spectrum, radial_profile
from latentdiff.training.autoencoder.images import load_images
from latentdiff.training.autoencoder.loop import evaluate
from latentdiff.training.autoencoder.model import build_autoencoder
from latentdiff.vae.autoencoder import Autoencoder


def _heldout():
    return load_images([], 160, 32, 0.2, 2)


def test_trained_autoencoder_reconstructs_heldout_crops(trained_tiny_ae):
    ae = Autoencoder.load(trained_tiny_ae["vae"])
    crops = _heldout().heldout_crops()
    trained = evaluate(ae.vae, crops)
    untrained = evaluate(build_autoencoder(trained_tiny_ae["architecture"], 0).float().eval(), crops)
    print("held-out", trained, "untrained", untrained)
    # 150 steps of a 3-level, 8-16-16-channel model: ~13.8 dB and SSIM ~0.36 vs ~11.0 dB / 0.06 untrained
    assert trained["psnr"] > untrained["psnr"] + 2
    assert trained["ssim"] > untrained["ssim"] + 0.2


def test_normalized_latents_are_standardized_and_low_pass(trained_tiny_ae):
    ae = Autoencoder.load(trained_tiny_ae["vae"])
    crops = _heldout().heldout_crops()
    with torch.no_grad():
        mean, std = ae.encode(crops)
    z = (mean.double() - ae.shift_factor) * ae.scaling_factor
    # scaling/shift were measured on the sampled latents of the training crops (Var = Var[m] + E[s^2]);
    # the sampled latents of the held-out crops come out near standardized
    sampled_var = float(z.var(unbiased=False) + (std.double() * ae.scaling_factor).pow(2).mean())
    assert abs(float(z.mean())) < 0.5 and 0.5 < sampled_var < 2.0
    p_lat, p_rgb = power_spectrum(z), power_spectrum(crops.double())
    _, prof = radial_profile(p_lat)
    # a learned latent of natural images keeps their falling spectrum: far more power at the lowest
    # non-zero frequency than at the highest (white latents would have a flat profile)
    assert float(prof[1]) > 3 * float(prof[-1])
    shift = wsnr_log_factor(p_rgb, p_lat)
    print("WSNR log shift (latent vs pixel):", shift)
    assert math.isfinite(shift) and np.sign(shift) != 0


@pytest.mark.slow  # a DeepSpeed training subprocess (single rank) plus encode and sample: ~a minute on a loaded CPU
def test_encode_train_sample_decode_round_trip_in_the_trained_latent_space(trained_tiny_ae, tmp_path):
    """Issue 16 point 4: images -> trained-AE latents (shards) -> latentdiff.train -> export -> sample ->
    decoded through the same autoencoder, with its own scaling/shift and its own latent spectrum."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from latentdiff.cli.sample import main as sample_main
    from latentdiff.contracts.export import load_export
    from latentdiff.contracts.manifest import load_manifest
    from latentdiff.data.encode import EncodeConfig, encode_dataset
    from latentdiff.data.photos import random_crops
    from latentdiff.data.stats import DatasetStats
    from latentdiff.training.schedule import model_space_power, model_space_rms
    from latentdiff.vae.decode import decode_to_uint8, to_uint8
    from latentdiff.vae.normalization import Normalization

    repo = Path(__file__).resolve().parents[1]
    vae_dir = trained_tiny_ae["vae"]
    ae = Autoencoder.load(vae_dir)
    # 1. encode with the trained autoencoder
    crops, idx = random_crops(24, 48, seed=1)  # photo crops, as the autoencoder was trained on (2 classes)
    for i, (img, k) in enumerate(zip(to_uint8(crops), idx)):
        folder = tmp_path / "images" / f"class{int(k) % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    data = tmp_path / "data"
    encode_dataset(EncodeConfig(inputs=[str(tmp_path / "images")], output=str(data), resolution=32, vae=vae_dir,
                                shard_size=8, batch_size=8, workers=0, progress=False))
    desc = load_manifest(data).vae
    assert desc["weights_sha256"] == ae.weights_sha256 and desc["latent_channels"] == 4
    assert desc["scaling_factor"] == pytest.approx(trained_tiny_ae["scaling_factor"])  # from the data, not 0.18215
    stats = DatasetStats.load(data)
    assert tuple(stats.sample_shape) == (4, 8, 8)
    norm = Normalization.sd(desc)
    assert 0.3 < model_space_rms(stats, norm) < 3  # the exported scaling standardizes these latents too
    # 2. train a few steps on the latents (sd normalization = the autoencoder's scaling/shift) and export
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for cmd in (["-m", "latentdiff.train", "--config", "tiny-cpu", "--dataset", data, "--run-dir", run,
                 "--normalization", "sd", "--max-steps", 4, "--checkpoint-every", 4, "--heldout-batch", 0,
                 "--deepspeed_config", repo / "ds_configs" / "zero2.json"],
                ["-m", "latentdiff.cli.export", run]):
        p = subprocess.run([sys.executable, *map(str, cmd)], env=env, capture_output=True, text=True, timeout=600,
                           cwd=repo, check=False)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    export = run / "export" / "step_00000004"
    meta = load_export(export)[1].meta
    assert meta.vae["weights_sha256"] == ae.weights_sha256
    assert meta.normalization.scale == norm.scale and meta.normalization.shift == norm.shift
    # the WSNR alignment was computed on the trained latent space's spectrum (Eq. 2-3)
    model = json.loads((export / "model.json").read_text())
    shift = wsnr_log_factor(stats.rgb64_power, model_space_power(stats, norm))
    assert model["schedule"]["wsnr"]["sigma_factor"] == pytest.approx(math.exp(shift), rel=1e-9)
    # 3. sample, decoded through the trained autoencoder
    out = tmp_path / "samples"
    assert sample_main(["--export", str(export), "--out", str(out), "--seeds", "0-3", "--nfe", "5", "--no-progress"]) == 0
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (4, 32, 32, 3) and arr.dtype == np.uint8 and arr.std() > 0
    # 4. the decode the sampler uses is the exact inverse of the encode: model-space latents of real crops
    # come back as the autoencoder's own reconstructions
    x = random_crops(4, 32, seed=5)[0].float()
    mean, _ = ae.encode(x)
    back = decode_to_uint8(meta.normalization.to_model(mean.double()).float(), meta.normalization, meta.vae)
    assert (back.int() - to_uint8(ae.decode(mean)).int()).abs().max() <= 1
