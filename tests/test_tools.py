"""The command-line tools run end to end on small inputs and produce sane outputs."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(args, timeout=900):
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def test_plot_schedules_on_photos_and_a_dataset(tiny_dataset, tmp_path):
    _run(["tools/plot_schedules.py", "--photos", "--resolutions", 32, 64, "--num", 60, "--dataset", tiny_dataset,
          "--max-points", 40, "--out", tmp_path])
    for name in ("sigma_densities.png", "wsnr_vs_sigma.png", "distances.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    s = json.loads((tmp_path / "schedules.json").read_text())
    src = s["sources"]
    # larger crops of the same photos need larger sigma for the same WSNR: P_mean grows with resolution
    assert src["photos RGB 64x64"]["aligned_p_mean"] > src["photos RGB 32x32"]["aligned_p_mean"] + 0.3
    for v in src.values():
        assert v["sigma_max_alpha1"] < v["sigma_max_alpha2"] < v["sigma_max_alpha3"]
        assert 0.5 <= v["coverage_alpha1"] <= v["coverage_alpha2"] <= v["coverage_alpha3"] <= 1.0


def test_sampler_accuracy_benchmark_small(tmp_path):
    p = _run(["tools/bench/sampler_accuracy.py", "--num", 40, "--resolution", 8, "--samples", 6, "--nfe", 7, 35,
              "--ref-steps", 128, "--out", tmp_path])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["reference_check"]["rms_vs_half_steps"] < 1e-4
    for name, rows in res["solvers"].items():
        assert [r["nfe"] for r in rows] == [7, 35]
        assert all(r["used"] <= r["nfe"] for r in rows), name
        assert rows[1]["rms_sigma_min"] <= rows[0]["rms_sigma_min"] * 1.5, name  # more NFE is not (much) worse
    assert "| DPM-Solver++ 3M |" in p.stdout and (tmp_path / "sampler_accuracy.png").stat().st_size > 10_000
    assert {r["sigma_max"] for r in res["sigma_max"]} == {"EDM", "data a=1", "data a=2", "data a=3"}
