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
    p = subprocess.run([sys.executable, "tools/quickstart.py", "--small", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "training in pixel space" in p.stdout  # says plainly that no pretrained VAE is used
    for f in ("report.md", "report.json", "samples.png", "training_data.png", "figures/sigma_densities.png",
              "figures/wsnr_vs_sigma.png", "figures/distances.png", "sampler_benchmark/table.md", "samples/samples.npz"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert list((out / "run" / "tb").glob("events.out.tfevents.*"))
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.std() > 5, "the sample grid is constant"
    samples = np.load(out / "samples" / "samples.npz")["arr_0"]
    assert samples.shape == (16, 16, 16, 3) and samples.dtype == np.uint8
    r = json.loads((out / "report.json").read_text())
    assert r["loss_last"][1] < r["loss_first"][1], "the training loss did not decrease"
    assert r["nfe_used"] <= r["nfe_requested"] == 15
    # the report's numbers are the dataset statistics' numbers
    from latentdiff.data.stats import DatasetStats
    from latentdiff.diffusion.distances import data_driven_sigma_max
    from latentdiff.diffusion.spectral import wsnr_constant

    st = DatasetStats.load(out / "data")
    mu, sd = st.distance_stats().moments()  # pixel space: identity normalization
    assert math.isclose(r["sigma_max_data"], data_driven_sigma_max((mu, sd), 2.0), rel_tol=1e-9)
    p_model = st.sampled_latent_power  # identity normalization, std 0 in pixel space
    shift = 0.5 * math.log(float(wsnr_constant(p_model)) / float(wsnr_constant(st.rgb64_power)))
    assert math.isclose(r["wsnr_p_mean_shift"], shift, rel_tol=1e-9)
    assert r["wsnr_p_mean_shift"] < 0  # 16x16 is noisier than the 64x64 reference at equal sigma
    second = (st.channel_std**2 + st.channel_mean**2).mean().sqrt().item()
    assert math.isclose(r["sigma_data"], second, rel_tol=1e-9)
    md = (out / "report.md").read_text()
    assert f"{r['sigma_max_data']:.3f}" in md and "samples.png" in md
    # issue 15: metrics of the samples vs the held-out split, between the floor (training data) and the
    # ceiling (uniform noise); the trainer found the split and logged the held-out loss
    q = r["quality"]
    assert set(q) == {"floor", "samples", "ceiling"} and (out / "data" / "val" / "split.json").is_file()
    for key in ("fwd", "kid_wavelet", "kid_pixels"):
        value = (lambda m: m["value"] if "value" in m else m["kid"])
        assert value(q["ceiling"][key]) > value(q["floor"][key]), key
    assert q["ceiling"]["pr_pixels"]["precision"] < q["floor"]["pr_pixels"]["precision"]
    assert r["validation_loss"] and all(math.isfinite(v) for v in r["validation_loss"].values())
    assert "Sample quality against the held-out split" in md and "uniform noise (ceiling)" in md
