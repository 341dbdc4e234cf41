"""Tests where the latent structure matters, in the latent space of a *trained* autoencoder."""
from __future__ import annotations

import math

import numpy as np
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
        mean, _ = ae.encode(crops)
    z = (mean.double() - ae.shift_factor) * ae.scaling_factor
    # scaling/shift were measured on the training crops; the held-out crops come out near standardized
    assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.var()) < 2.0
    p_lat, p_rgb = power_spectrum(z), power_spectrum(crops.double())
    _, prof = radial_profile(p_lat)
    # a learned latent of natural images keeps their falling spectrum: far more power at the lowest
    # non-zero frequency than at the highest (white latents would have a flat profile)
    assert float(prof[1]) > 3 * float(prof[-1])
    shift = wsnr_log_factor(p_rgb, p_lat)
    print("WSNR log shift (latent vs pixel):", shift)
    assert math.isfinite(shift) and np.sign(shift) != 0
