"""`make quickstart` at a reduced size (`--small`, the same code path): outputs exist and are sane."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_small(tmp_path):
    out = tmp_path / "qs"
    cache = tmp_path / "ae_cache"
    p = subprocess.run([sys.executable, "tools/quickstart.py", "--small", "--out", str(out), "--ae-cache", str(cache)],
                       cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # issue 16: the default is the latent space of the small autoencoder, trained here and cached
    assert "training the small f4 autoencoder" in p.stdout
    (ae_dir,) = list(cache.iterdir())
    assert (ae_dir / "cache.json").is_file() and (ae_dir / "vae" / "config.json").is_file()
    for f in ("report.md", "report.json", "samples.png", "training_data.png", "figures/sigma_densities.png",
              "figures/wsnr_vs_sigma.png", "figures/distances.png", "sampler_benchmark/table.md", "samples/samples.npz",
              "reconstructions.png", "spectra.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert list((out / "run" / "tb").glob("events.out.tfevents.*"))
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.std() > 5, "the sample grid is constant"
    samples = np.load(out / "samples" / "samples.npz")["arr_0"]
    assert samples.shape == (16, 64, 64, 3) and samples.dtype == np.uint8  # 16x16x4 latents decoded at f4
    r = json.loads((out / "report.json").read_text())
    assert r["loss_last"][1] < r["loss_first"][1], "the training loss did not decrease"
    assert r["nfe_used"] <= r["nfe_requested"] == 15
    # the report's numbers are the dataset statistics' numbers
    from latentdiff.contracts.manifest import load_manifest
    from latentdiff.data.stats import DatasetStats
    from latentdiff.diffusion.distances import data_driven_sigma_max
    from latentdiff.diffusion.spectral import wsnr_constant
    from latentdiff.training.schedule import model_space_power, model_space_rms
    from latentdiff.vae.normalization import Normalization

    st = DatasetStats.load(out / "data")
    vae = load_manifest(out / "data").vae
    assert vae["kind"] == "AutoencoderKL" and vae["downsampling_factor"] == 4 and vae["latent_channels"] == 4
    norm = Normalization.sd(vae)  # the trained autoencoder's scaling/shift, set from its training latents
    assert norm.scale[0] != 0.18215 and r["latent"]["autoencoder"]["scaling_factor"] == vae["scaling_factor"]
    mu, sd = st.distance_stats().moments(norm.scale)
    assert math.isclose(r["sigma_max_data"], data_driven_sigma_max((mu, sd), 2.0), rel_tol=1e-9)
    p_model = model_space_power(st, norm)
    shift = 0.5 * math.log(float(wsnr_constant(p_model)) / float(wsnr_constant(st.rgb64_power)))
    assert math.isclose(r["wsnr_p_mean_shift"], shift, rel_tol=1e-9)
    assert math.isclose(r["sigma_data"], model_space_rms(st, norm), rel_tol=1e-9)
    assert 0.2 < r["sigma_data"] < 5  # the exported scaling brings the latents near unit scale
    rec = r["latent"]["reconstruction"]
    assert rec["n"] == 14 and math.isfinite(rec["psnr"]) and rec["psnr"] > 10
    md = (out / "report.md").read_text()
    assert f"{r['sigma_max_data']:.3f}" in md and "samples.png" in md
    assert "reconstructions.png" in md and "spectra.png" in md and "WSNR shift this latent space implies" in md
    # issue 15: metrics of the samples vs the held-out split, between the floor (training data) and the
    # ceiling (uniform noise); the trainer found the split and logged the held-out loss
    q = r["quality"]
    assert set(q) == {"floor", "samples", "ceiling"} and (out / "data" / "val" / "split.json").is_file()
    assert {"kid_wavelet", "kid_pixels"} <= set(q["samples"])  # FWD only when the sets are large enough at 64x64
    for key in ("fwd", "kid_wavelet", "kid_pixels"):
        if key not in q["samples"]:
            continue
        value = (lambda m: m["value"] if "value" in m else m["kid"])
        assert value(q["ceiling"][key]) > value(q["floor"][key]), key
    assert q["ceiling"]["pr_pixels"]["precision"] < q["floor"]["pr_pixels"]["precision"]
    assert r["validation_loss"] and all(math.isfinite(v) for v in r["validation_loss"].values())
    assert "Sample quality against the held-out split" in md and "uniform noise (ceiling)" in md
