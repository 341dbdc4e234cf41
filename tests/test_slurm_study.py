"""slurm/study.sbatch: a schedule study as a SLURM job array (one grid cell per array task).

Fast: the script's checks and the command it runs, under bash with a stand-in Python.  Slow: a 2-cell grid
as a real 2-task array on the throw-away 2-node Slurm cluster of ``test_slurm`` (same fixture), then the
same array again, which must skip both finished cells.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from test_slurm import JOB_TIMEOUT, REPO, SLURM_DIR, cluster  # noqa: F401  (the module-scoped cluster fixture)

SCRIPT = SLURM_DIR / "study.sbatch"


def test_header_and_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    lines = SCRIPT.read_text().splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#"))
    directives = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")]
    assert directives and max(directives) < first_cmd
    text = "\n".join(lines[i] for i in directives)
    for needed in ("--ntasks-per-node=1", "--nodes=1", "--requeue", "--open-mode=append", "--signal=B:USR1@",
                   "--time=", "%A_%a"):
        assert needed in text, needed
    assert "$" not in text.replace("%", "")


@pytest.fixture
def fake(tmp_path):
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    # records the arguments of the study command (the import check runs it with -c)
    (venv / "python").write_text('#!/bin/bash\n[ "$1" = -c ] && exit 0\nprintf "%s\\n" "$@" > "$FAKE_DIR/args"\n'
                                 'env > "$FAKE_DIR/env"\nexit ${FAKE_RC:-0}\n')
    (venv / "python").chmod(0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text("#!/bin/bash\nexit 0\n")
    (bindir / "scontrol").chmod(0o755)
    (tmp_path / "grid.yaml").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}", FAKE_DIR=str(tmp_path), VENV=str(tmp_path / "venv"),
               SLURM_JOB_ID="501", SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID="7", SLURM_SUBMIT_DIR=str(REPO),
               GRID=str(tmp_path / "grid.yaml"), OUT=str(tmp_path / "study"), RANK="3", MASTER_ADDR="x.invalid")
    return tmp_path, env


def _run(env, *args):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_runs_the_array_task_cell_and_passes_flags_through(fake):
    d, env = fake
    res = _run(env, "--keep-going")
    assert res.returncode == 0, res.stderr
    args = (d / "args").read_text().split("\n")
    assert args[:7] == ["-m", "latentdiff.cli.schedule_study", str(d / "grid.yaml"), "--out", str(d / "study"),
                        "--cells", "7"]
    assert "--keep-going" in args
    child_env = (d / "env").read_text()
    assert "RANK=3" not in child_env and "MASTER_ADDR" not in child_env  # a cell is one process
    assert "job 500_7" in res.stdout
    env["FAKE_RC"] = "1"
    assert _run(env).returncode == 1


@pytest.mark.parametrize("var, value, message", [
    ("GRID", "", "GRID is not set"), ("GRID", "/nonexistent.yaml", "no such file"), ("OUT", "", "OUT is not set"),
    ("CELLS", "3;rm", "CELLS=3;rm"), ("SLURM_JOB_ID", None, "submit this script with sbatch"),
])
def test_bad_variables_stop_with_exit_2(fake, var, value, message):
    d, env = fake
    if value is None:
        env.pop(var)
    else:
        env[var] = value
    res = _run(env)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (d / "args").exists()


# ----------------------------------------------------------------------------------------------
# slow: the real cluster


def _array_tasks(c, jid: str, n: int) -> dict:
    """``{task id: scontrol record}`` of the array's tasks ``jid_0 .. jid_{n-1}``."""
    out = {}
    for i in range(n):
        text = c.run("scontrol", "show", "job", f"{jid}_{i}", "-o", check=False)
        if text.strip():
            out[str(i)] = dict(re.findall(r"(\w+)=(\S*)", text.splitlines()[0]))
    return out


def _submit_array(c, out_dir: Path, spec: str, **variables) -> str:
    cmd = ["sbatch", "--parsable", f"--array={spec}", f"--output={out_dir}/%x-%A_%a.out", str(SCRIPT)]
    res = subprocess.run(cmd, env=c.env(**variables), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, f"sbatch failed: {res.stdout}\n{res.stderr}\n{c.logs()}"
    return res.stdout.strip().split(";")[0]


def _wait_array(c, jid: str, logs: Path, n: int) -> dict:
    t0 = time.time()
    while c.run("squeue", "-h", "-j", jid, check=False).strip():
        if time.time() - t0 > 2 * JOB_TIMEOUT:
            pytest.fail(f"array {jid} still queued after {2 * JOB_TIMEOUT:.0f} s\n{_logs(logs, jid)[-6000:]}")
        time.sleep(0.5)
    return _array_tasks(c, jid, n)


def _logs(d: Path, jid: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(d.glob(f"*-{jid}_*.out")))


@pytest.mark.slow
def test_study_array_on_two_nodes_then_skips_finished_cells(cluster):  # noqa: F811
    from latentdiff.data.encode import EncodeConfig, encode_dataset
    from latentdiff.data.synthetic import write_image_folder

    root = cluster.dir / "study-work"
    write_image_folder(root / "images", classes=2, per_class=24, size_range=(20, 40), seed=0)
    encode_dataset(EncodeConfig(inputs=[str(root / "images")], output=str(root / "px8"), resolution=8, vae="none",
                                shard_size=16, batch_size=16, workers=0, progress=False, val_fraction=0.25))
    grid = {"budget_images": 32, "seeds": [0], "baseline": "edm",
            "train": {"config": "tiny-cpu", "micro_batch": 16, "checkpoint_every": 2, "heldout_batch": 0,
                      "val_samples": 16, "power_ema_sigma_rels": [], "normalization": "sd"},
            "sampler": {"solver": "euler", "nfe": 3, "samples": 12, "batch": 12},
            "eval": {"metrics": "fwd,kid", "kid_subset_size": 6, "kid_subsets": 4, "fwd_level": 3},
            "datasets": {"px8": {"path": str(root / "px8")}},
            "schedules": {"edm": {"noise": "edm"}, "wsnr": {"noise": "wsnr"}}}
    gy = root / "grid.yaml"
    gy.write_text(yaml.safe_dump(grid))
    study, logs = root / "study", root / "logs"
    logs.mkdir()
    jid = _submit_array(cluster, logs, "0-1", GRID=gy, OUT=study)
    tasks = _wait_array(cluster, jid, logs, 2)
    log = _logs(logs, jid)
    assert sorted(tasks) == ["0", "1"], f"{tasks}\n{log[-6000:]}"
    assert sorted(p.name for p in logs.glob(f"*-{jid}_*.out")) == [f"latentdiff-study-{jid}_{i}.out" for i in (0, 1)]
    for t in tasks.values():
        assert t.get("JobState") == "COMPLETED" and t.get("ExitCode") == "0:0", f"{t}\n{log[-8000:]}\n{cluster.logs()}"
    for key in ("px8/edm/seed0", "px8/wsnr/seed0"):
        assert re.search(rf"\[study\] 1/1 {key}: median ln sigma", log), log[-6000:]
    agg = json.loads((study / "study.json").read_text())
    assert agg["cells_done"] == 2 and set(agg["datasets"]["px8"]) == {"edm", "wsnr"}
    assert (study / "study_px8.png").is_file()
    assert log.count("study step exited with 0") == 2
    # the same task again: its cell is finished and nothing is trained
    jid2 = _submit_array(cluster, logs, "1", GRID=gy, OUT=study)
    tasks2 = _wait_array(cluster, jid2, logs, 2)
    log2 = _logs(logs, jid2)
    assert tasks2["1"].get("JobState") == "COMPLETED", f"{tasks2}\n{log2[-6000:]}"
    assert ": train" not in log2 and "study step exited with 0" in log2 and "1/1 px8/wsnr/seed0" in log2, log2[-4000:]
