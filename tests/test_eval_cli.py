"""``latentdiff-eval``: metrics.json contents, the three kinds of reference, refusals with the number needed.

The encoded reference is the session's real tiny dataset (72 skimage-derived images through a tiny
random AutoencoderKL, ``conftest.tiny_dataset``), decoded through that VAE.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import quality_cases as qc
from latentdiff.cli import eval as eval_cli
from latentdiff.data.photos import random_crops
from latentdiff.metrics.eval_sources import EncodedDatasetImages
from latentdiff.vae.autoencoder import Autoencoder

SMALL = ["--metrics", "fwd,kid,pr", "--kid-subset-size", "40", "--kid-subsets", "4", "--no-progress",
         "--inception", "off"]


def _crops(n: int, size: int = 32, seed: int = 5) -> torch.Tensor:
    x, _ = random_crops(n, size, seed=seed)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _write_pngs(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")
    return folder


def test_encoded_dataset_reference_is_decoded_through_its_vae(tiny_dataset):
    src = EncodedDatasetImages(tiny_dataset)
    assert len(src) == 72 and src.resolution == (32, 32)
    images = src.batch([0, 5, 71])
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    # the same as decoding the stored posterior means by hand
    ae = Autoencoder.load(src.manifest.vae["id"])
    z = torch.from_numpy(src.means[[0, 5, 71]].astype(np.float32))
    by_hand = ((ae.decode(z, precision="fp32").clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(images, by_hand)
    assert src.provenance["shards_hash"] == src.manifest.shards_hash and src.provenance["images"] == 72


def test_cli_writes_metrics_json_for_each_kind_of_reference(tmp_path, tiny_dataset, capsys):
    samples = _write_pngs(tmp_path / "samples", _crops(80))
    assert eval_cli.main([str(samples), "--ref", str(tiny_dataset), *SMALL, "--save-ref", str(tmp_path / "ref.npz")]) == 0
    report = json.loads((samples / "metrics.json").read_text())
    assert report["format"] == "latentdiff-metrics/1"
    assert set(report["metrics"]) == {"fwd", "kid_pixels", "pr_pixels", "kid_wavelet", "pr_wavelet"}
    assert report["samples"]["count"] == 80 and report["samples"]["seeds"] == "0-79"
    assert report["reference"]["count"] == 72 and report["reference"]["provenance"]["type"] == "encoded dataset"
    assert report["settings"]["kid_subset_size"] == 40 and report["settings"]["seed"] == 0
    assert report["metrics"]["kid_pixels"]["features"]["name"] == "pixels"
    assert report["metrics"]["fwd"]["level"] == 4 and report["metrics"]["fwd"]["packets"] == 256
    assert report["inception"].startswith("off")
    # the saved statistics reproduce the numbers without the dataset
    out2 = tmp_path / "again.json"
    assert eval_cli.main([str(samples), "--ref", str(tmp_path / "ref.npz"), *SMALL, "--out", str(out2)]) == 0
    again = json.loads(out2.read_text())
    assert again["metrics"] == report["metrics"]
    assert again["reference"]["provenance"]["type"] == "encoded dataset"
    assert again["reference"]["provenance"]["statistics_file"] == str(tmp_path / "ref.npz")
    # an image folder as reference: the blurred samples are further from the clean folder than a twin set
    ref_dir = _write_pngs(tmp_path / "ref_images", _crops(80, seed=6))
    blurred = _write_pngs(tmp_path / "blurred", qc.blur(_crops(80), 2.0))
    assert eval_cli.main([str(samples), "--ref", str(ref_dir), *SMALL, "--out", str(tmp_path / "a.json")]) == 0
    assert eval_cli.main([str(blurred), "--ref", str(ref_dir), *SMALL, "--out", str(tmp_path / "b.json")]) == 0
    clean, blur = (json.loads((tmp_path / n).read_text())["metrics"] for n in ("a.json", "b.json"))
    assert blur["fwd"]["value"] > clean["fwd"]["value"]
    assert blur["kid_wavelet"]["kid"] > clean["kid_wavelet"]["kid"]
    assert "fwd" in capsys.readouterr().out


def test_cli_refuses_too_few_samples_and_other_resolutions_naming_the_need(tmp_path, capsys):
    samples = _write_pngs(tmp_path / "samples", _crops(80))
    ref16 = _write_pngs(tmp_path / "ref16", _crops(80, size=16))
    assert eval_cli.main([str(samples), "--ref", str(ref16), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "SWD needs >= 128" in err and "KID needs >= 1000" in err and "--metrics" in err
    assert eval_cli.main([str(samples), "--ref", str(ref16), *SMALL]) == 2
    assert "the samples are 32x32 but the reference is 16x16" in capsys.readouterr().err
    assert eval_cli.main([str(samples), "--ref", str(tmp_path / "missing"), *SMALL]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert eval_cli.main([str(samples), "--ref", str(ref16), *SMALL, "--metrics", "fwd,bogus"]) == 2
    assert "unknown bogus" in capsys.readouterr().err
    assert eval_cli.main([str(samples), "--ref", str(ref16), *SMALL, "--inception", "on",
                          "--inception-weights", str(tmp_path / "nope.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_refuses_a_wavelet_level_the_images_cannot_take(tmp_path, capsys):
    samples = _write_pngs(tmp_path / "samples", _crops(80, size=48))
    assert eval_cli.main([str(samples), "--ref", str(samples), *SMALL, "--fwd-level", "5"]) == 2
    assert "divisible by 32" in capsys.readouterr().err
