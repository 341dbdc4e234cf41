"""``latentdiff-schedule-study``: the statistics over seeds, the grid's refusals, the report, and (slow) a real
2-cell study end to end through the trainer, sampler and evaluator CLIs, resumed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from latentdiff.cli.schedule_study import main, select_cells
from latentdiff.cli.study_cells import cell_dir
from latentdiff.cli.study_grid import load_grid, parse_grid
from latentdiff.cli.study_report import write_report
from latentdiff.metrics.seed_stats import mean_se, paired_comparison, sign_test_p, t_test_p
from latentdiff.utils.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# statistics


def test_mean_and_standard_error():
    m, se, n = mean_se([1.0, 2.0, 4.0])
    assert (m, n) == (7 / 3, 3)
    s = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)  # ddof = 1
    assert se == pytest.approx(s / math.sqrt(3), rel=1e-12)
    assert math.isnan(mean_se([5.0])[1]) and mean_se([])[2] == 0
    with pytest.raises(ValueError):
        mean_se([1.0, float("nan")])


def test_paired_t_test_matches_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7):
        a, b = rng.normal(size=n), rng.normal(size=n) + 0.3
        c = paired_comparison(a, b)
        ref = sps.ttest_rel(a, b)
        assert c["t"] == pytest.approx(ref.statistic, rel=1e-10)
        assert c["p_t"] == pytest.approx(ref.pvalue, rel=1e-9)
        assert c["mean"] == pytest.approx(float(np.mean(a - b)), rel=1e-12)
        assert c["wins"] == int(((a - b) < 0).sum()) and c["n"] == n


def test_t_test_p_known_values():
    assert t_test_p(0.0, 5) == pytest.approx(1.0)
    assert t_test_p(12.706204736, 1) == pytest.approx(0.05, rel=1e-6)  # the df = 1 two-sided 5% critical value
    assert t_test_p(math.inf, 3) == 0.0 and math.isnan(t_test_p(1.0, 0))


def test_sign_test_exact_binomial():
    assert sign_test_p([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    assert sign_test_p([-1, 1]) == 1.0
    assert sign_test_p([1, 2, 0, -3]) == pytest.approx(min(1, 2 * (1 + 3) / 8))  # zero dropped: n' = 3, k = 1
    assert math.isnan(sign_test_p([0.0, 0.0]))
    for n, k in ((6, 1), (9, 2), (10, 5)):  # against scipy's exact binomial test
        d = [1.0] * (n - k) + [-1.0] * k
        assert sign_test_p(d) == pytest.approx(sps.binomtest(k, n, 0.5).pvalue, rel=1e-12)


def test_paired_comparison_degenerate_spreads():
    c = paired_comparison([1.0, 2.0], [2.0, 3.0])  # every difference -1: zero spread
    assert c["t"] == -math.inf and c["p_t"] == 0.0 and c["wins"] == 2
    z = paired_comparison([1.0, 2.0], [1.0, 2.0])
    assert math.isnan(z["t"]) and math.isnan(z["p_sign"])
    with pytest.raises(ValueError, match="same seeds"):
        paired_comparison([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------------------------
# the grid


def _fake_dataset(root: Path, val: bool = True) -> Path:
    for d in ([root, root / "val"] if val else [root]):
        d.mkdir(parents=True, exist_ok=True)
        (d / "dataset.json").write_text("{}")
    return root


def _grid(tmp_path, **over):
    g = {"budget_images": 64, "seeds": [0, 1], "baseline": "edm",
         "datasets": {"a": {"path": str(_fake_dataset(tmp_path / "a"))}},
         "schedules": {"edm": {"noise": "edm"}, "wsnr": {"noise": "wsnr", "wsnr_include_dc": False}}}
    g.update(over)
    return g


@pytest.mark.parametrize("over, needle", [
    ({"schedules": {"edm": {"noise": "edm", "p_mena": -1}}}, "unknown schedule field(s) ['p_mena']"),
    ({"datasets": {"a": {"path": "/nonexistent/dir"}}}, "/nonexistent/dir/dataset.json not found"),
    ({"baseline": "vp"}, "baseline"),
    ({"seeds": [0, 0]}, "repeated"),
    ({"budget_images": 0}, "budget_images"),
    ({"train": {"seed": 3}}, "set per cell"),
    ({"sampler": {"solvr": "heun"}}, "unknown field(s) ['solvr']"),
    ({"bugdet": 3}, "unknown field(s) ['bugdet']"),
    ({"schedules": {"a/b": {}}}, "directory name"),
])
def test_bad_grids_are_refused_naming_the_field(tmp_path, over, needle):
    with pytest.raises(ConfigError) as e:
        parse_grid(_grid(tmp_path, **over), tmp_path)
    assert needle in str(e.value)


def test_grid_needs_a_validation_split_and_orders_cells_dataset_seed_schedule(tmp_path):
    g = _grid(tmp_path)
    g["datasets"]["b"] = {"path": str(_fake_dataset(tmp_path / "b", val=False))}
    with pytest.raises(ConfigError, match="val/dataset.json not found"):
        parse_grid(g, tmp_path)
    g["datasets"]["b"] = {"path": "b", "train": {"model_overrides": {"patch_size": 4}}}  # relative to the YAML
    _fake_dataset(tmp_path / "b")
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(dict(g, train={"model_overrides": {"width": 8}})))
    grid = load_grid(tmp_path / "grid.yaml")
    assert [c.key for c in grid.cells()][:5] == ["a/edm/seed0", "a/wsnr/seed0", "a/edm/seed1", "a/wsnr/seed1",
                                                 "b/edm/seed0"]
    assert grid.train_fields("b")["model_overrides"] == {"width": 8, "patch_size": 4}
    assert grid.train_fields("a")["model_overrides"] == {"width": 8}
    cells = grid.cells()
    assert select_cells(cells, "1-2,7") == [cells[1], cells[2], cells[7]] and select_cells(cells, None) == cells
    with pytest.raises(ConfigError, match="outside"):
        select_cells(cells, "8")


# ----------------------------------------------------------------------------------------------
# the report, from recorded results


def test_report_means_paired_differences_and_plot(tmp_path):
    grid = parse_grid(_grid(tmp_path, seeds=[0, 1, 2]), tmp_path)
    out = tmp_path / "study"
    vals = {"edm": [1.0, 2.0, 3.0], "wsnr": [1.5, 2.7, 3.2]}
    for c in grid.cells():
        d = cell_dir(out, c)
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({
            "dataset": c.dataset, "schedule": c.schedule, "seed": c.seed,
            "median_log_sigma": -1.2 if c.schedule == "edm" else -2.6,
            "metrics": {"fwd": vals[c.schedule][c.seed], "val_loss": 0.5}, "cpu_seconds": {"train": 1.0}}))
    agg = write_report(grid, out)
    w = agg["datasets"]["a"]["wsnr"]["metrics"]["fwd"]
    assert w["mean"] == pytest.approx(np.mean(vals["wsnr"])) and w["n"] == 3
    d = np.subtract(vals["wsnr"], vals["edm"])
    assert w["vs_baseline"]["mean"] == pytest.approx(d.mean())
    assert w["vs_baseline"]["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    assert w["vs_baseline"]["wins"] == 0
    md = (out / "study.md").read_text()
    assert "6 of 6 cells finished" in md and "| wsnr (n=3) | -2.600 |" in md and "wins 0/3" in md
    assert (out / "study_a.png").stat().st_size > 1000
    assert json.loads((out / "study.json").read_text())["cells_done"] == 6


# ----------------------------------------------------------------------------------------------
# end to end (real CLIs)


@pytest.fixture(scope="module")
def pixel_dataset(tmp_path_factory):
    from latentdiff.data.encode import EncodeConfig, encode_dataset
    from latentdiff.data.synthetic import write_image_folder

    root = tmp_path_factory.mktemp("study_data")
    write_image_folder(root / "images", classes=2, per_class=24, size_range=(20, 40), seed=0)
    encode_dataset(EncodeConfig(inputs=[str(root / "images")], output=str(root / "px8"), resolution=8, vae="none",
                                shard_size=16, batch_size=16, workers=0, progress=False, val_fraction=0.25))
    return root / "px8"


@pytest.mark.slow
def test_two_cell_study_end_to_end_and_resume(pixel_dataset, tmp_path, capsys):
    grid = {"budget_images": 64, "seeds": [0], "baseline": "edm",
            "train": {"config": "tiny-cpu", "micro_batch": 16, "checkpoint_every": 2, "heldout_batch": 0,
                      "val_samples": 16, "power_ema_sigma_rels": [], "normalization": "sd"},
            "sampler": {"solver": "euler", "nfe": 3, "samples": 12, "batch": 12},
            "eval": {"metrics": "fwd,kid", "kid_subset_size": 6, "kid_subsets": 4, "fwd_level": 3},
            "datasets": {"px8": {"path": str(pixel_dataset)}},
            "schedules": {"edm": {"noise": "edm"}, "res": {"noise": "resolution", "resolution_ref": 64}}}
    gy = tmp_path / "grid.yaml"
    gy.write_text(yaml.safe_dump(grid))
    out = tmp_path / "study"
    assert main([str(gy), "--out", str(out)]) == 0
    agg = json.loads((out / "study.json").read_text())
    assert agg["cells_done"] == 2
    res = agg["datasets"]["px8"]
    assert res["res"]["median_log_sigma"] == pytest.approx(-1.2 + math.log(8 / 64))
    assert res["edm"]["median_log_sigma"] == pytest.approx(-1.2)
    for s in ("edm", "res"):
        assert set(res[s]["metrics"]) == {"fwd", "kid_pixels", "kid_wavelet", "val_loss"}
        assert all(math.isfinite(m["mean"]) for m in res[s]["metrics"].values())
    r = json.loads((cell_dir(out, load_grid(gy).cells()[1]) / "result.json").read_text())
    assert r["shift"]["rule"] == "resolution" and r["steps"] == 4
    # finished cells are skipped
    capsys.readouterr()
    assert main([str(gy), "--out", str(out)]) == 0
    assert ": train" not in capsys.readouterr().out
    # a cell killed after a checkpoint resumes from it (no export, no samples, no result yet)
    import shutil
    d = cell_dir(out, load_grid(gy).cells()[0])
    for p in ("result.json", "metrics.json"):
        (d / p).unlink()
    for p in ("samples", "run/export"):
        shutil.rmtree(d / p)
    ckpts = sorted((d / "run" / "checkpoints").glob("step_*"))
    assert ckpts, "the trainer kept no checkpoint to resume from"
    assert main([str(gy), "--out", str(out), "--cells", "0"]) == 0
    assert "resumed from" in (d / "cell.log").read_text()
    # the same cell under other settings is refused, not mixed
    grid["budget_images"] = 96
    gy.write_text(yaml.safe_dump(grid))
    assert main([str(gy), "--out", str(out), "--cells", "0"]) == 2
    assert "budget_images" in capsys.readouterr().err


def test_cell_lock_skips_a_live_owner_and_takes_over_a_dead_one(tmp_path, monkeypatch):
    import os
    import socket
    import subprocess
    import sys

    from latentdiff.cli.study_cells import CellBusy, cell_lock

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    lock = tmp_path / "cell.lock"
    with cell_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(CellBusy, match="being run by"):  # a second worker (here: this same live pid)
            with cell_lock(tmp_path):
                pass
    assert not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "slurm": None}))
    with cell_lock(tmp_path):  # the owner died (killed cell): taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"host": "another-node", "pid": 1, "slurm": "77_3"}))
    with pytest.raises(CellBusy):
        with cell_lock(tmp_path):
            pass
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with cell_lock(tmp_path):  # the same array task, requeued on another node
        pass


def test_sweep_optimum_is_the_parabola_vertex():
    from latentdiff.cli.study_report import sweep_optimum

    xs = [-3.0, -2.0, -1.0, 0.0, 0.5]
    ys = [(x + 1.3) ** 2 + 2.0 for x in xs]  # an exact parabola: the vertex is recovered exactly
    x, interior = sweep_optimum(xs[::-1], ys[::-1])
    assert interior and x == pytest.approx(-1.3, abs=1e-12)
    assert sweep_optimum(xs, [5, 4, 3, 2, 1]) == (0.5, False)  # monotone: the end of the sweep
    assert sweep_optimum([0.0, 1.0], [2.0, 1.0]) == (1.0, False)
