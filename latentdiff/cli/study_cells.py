"""One cell of a schedule study: ``latentdiff-train`` -> ``latentdiff-sample`` -> ``latentdiff-eval`` as
subprocesses (the real CLIs), each stage skipped when its output is complete, then ``result.json``.

Resume: a finished cell has ``result.json`` and is skipped.  A killed cell re-runs the same train command,
which resumes from the run's latest checkpoint (``latentdiff-train`` resumes by itself); sampling skips
the PNGs that exist; the evaluation is redone when its ``metrics.json`` is missing.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from latentdiff.cli.study_grid import Cell, StudyGrid
from latentdiff.diffusion.noise import sigma_distribution_from_dict
from latentdiff.utils.errors import LatentdiffError

__all__ = ["CellBusy", "CellFailed", "cell_lock", "cell_dir", "run_cell", "train_command", "sample_command", "eval_command", "read_result"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DS = REPO / "ds_configs" / "zero2.json"


class CellFailed(LatentdiffError):
    """A stage of a cell exited non-zero (the message names the stage, the command and the log)."""


class CellBusy(LatentdiffError):
    """Another live process (here, or another SLURM task) holds the cell's ``cell.lock``."""


def _owner() -> dict:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm": f"{job}_{task}" if job and task else job}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(lock: dict, me: dict) -> bool:
    """A lock left by a dead process on this host, or by an earlier run of this very SLURM task (requeued)."""
    if lock.get("slurm") and lock.get("slurm") == me["slurm"]:
        return True
    return lock.get("host") == me["host"] and not _alive(int(lock.get("pid", -1)))


@contextlib.contextmanager
def cell_lock(d: Path):
    """Hold ``d/cell.lock`` (O_EXCL) while the cell runs; :class:`CellBusy` when a live owner has it."""
    path, me = d / "cell.lock", _owner()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                lock = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                lock = {}
            if not _stale(lock, me):
                raise CellBusy(f"{d} is being run by {lock or 'another process'} (remove {path} if that is wrong)") from None
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
        return
    raise CellBusy(f"{path}: could not take the lock")


def cell_dir(out: Path, cell: Cell) -> Path:
    return Path(out) / "cells" / cell.dataset / cell.schedule / f"seed{cell.seed}"


def _flag(k: str) -> str:
    return "--" + k.replace("_", "-")


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def train_command(grid: StudyGrid, cell: Cell, run: Path) -> list[str]:
    train = grid.train_fields(cell.dataset)
    ds = train.pop("deepspeed_config", str(DEFAULT_DS))
    cmd = [sys.executable, "-m", "latentdiff.train"]
    if "config" in train:
        cmd += ["--config", str(train.pop("config"))]
    fields = {"dataset": grid.datasets[cell.dataset], "run_dir": run, "duration_images": grid.budget_images,
              "seed": cell.seed, **train, **grid.schedules[cell.schedule]}
    for k, v in fields.items():
        cmd += [_flag(k), _value(v)]
    return cmd + ["--deepspeed_config", str(ds)]


def sample_command(grid: StudyGrid, export: Path, samples: Path) -> list[str]:
    s = grid.sampler
    return [sys.executable, "-m", "latentdiff.sample", "--export", str(export), "--out", str(samples),
            "--seeds", f"0-{int(s['samples']) - 1}", "--solver", str(s["solver"]), "--nfe", str(s["nfe"]),
            "--sigma-max", str(s["sigma_max"]), "--batch", str(s["batch"]), "--no-progress"]


def eval_command(grid: StudyGrid, cell: Cell, samples: Path, out_json: Path) -> list[str]:
    e = grid.eval
    metrics = str(e["metrics"])
    cmd = [sys.executable, "-m", "latentdiff.eval", str(samples), "--ref", str(grid.datasets[cell.dataset] / "val"),
           "--kid-subset-size", str(e["kid_subset_size"]), "--kid-subsets", str(e["kid_subsets"]),
           "--no-progress", "--out", str(out_json)]
    if e.get("fwd_level") is not None:
        cmd += ["--fwd-level", str(e["fwd_level"])]
    if e.get("inception_weights"):
        metrics = metrics if "fid" in metrics.split(",") else metrics + ",fid"
        cmd += ["--inception", "on", "--inception-weights", str(e["inception_weights"]), "--allow-small-fid", "true"]
    else:
        cmd += ["--inception", "off"]
    return cmd + ["--metrics", metrics]


def _run(cmd: list[str], log: Path, stage: str) -> float:
    """Run ``cmd`` appending to ``log``; returns the CPU seconds of the child; raises :class:`CellFailed`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    env.setdefault("OMP_NUM_THREADS", "1")
    before = os.times()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    after = os.times()
    if p.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise CellFailed(f"{stage} failed (exit {p.returncode}); log {log}\n$ {' '.join(cmd)}\n{tail}")
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


def _validation_losses(tb_dir: Path) -> dict:
    """The last ``val/...`` scalars of the run (the held-out loss on the fixed sigma grid, validation.py)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {t[4:]: float(ea.Scalars(t)[-1].value) for t in ea.Tags()["scalars"] if t.startswith("val/")}


def flatten_metrics(m: dict) -> dict:
    """``metrics.json`` entries -> one number each (lower is better for all of them)."""
    out = {}
    for key, v in m.items():
        if key in ("fwd", "swd", "fid"):
            out[key] = float(v["value"])
        elif key.startswith("kid_"):
            out[key] = float(v["kid"])
    return out


def _export(run: Path) -> Path | None:
    ex = sorted((run / "export").glob("step_*"))
    return ex[-1] if ex and (ex[-1] / "model.json").is_file() else None


def run_cell(grid: StudyGrid, cell: Cell, out: Path, log=print) -> dict:
    """Run (or finish) one cell and return its result record (also written to ``result.json``)."""
    d = cell_dir(out, cell)
    res = d / "result.json"
    if res.is_file():
        return json.loads(res.read_text())
    d.mkdir(parents=True, exist_ok=True)
    with cell_lock(d):
        return _run_stages(grid, cell, d, log)


def _run_stages(grid: StudyGrid, cell: Cell, d: Path, log) -> dict:
    res = d / "result.json"
    if res.is_file():  # finished by another process while we waited for the lock
        return json.loads(res.read_text())
    run, samples, metrics_json, logf = d / "run", d / "samples", d / "metrics.json", d / "cell.log"
    cpu = {}
    t0 = time.time()
    if _export(run) is None:
        log(f"[study] {cell.key}: train")
        cpu["train"] = _run(train_command(grid, cell, run), logf, f"{cell.key}: latentdiff-train")
    export = _export(run)
    if export is None:
        raise CellFailed(f"{cell.key}: training finished without an export in {run / 'export'}; log {logf}")
    if not (samples / "sampling.json").is_file():
        log(f"[study] {cell.key}: sample")
        cpu["sample"] = _run(sample_command(grid, export, samples), logf, f"{cell.key}: latentdiff-sample")
    if not metrics_json.is_file():
        log(f"[study] {cell.key}: eval")
        cpu["eval"] = _run(eval_command(grid, cell, samples, metrics_json), logf, f"{cell.key}: latentdiff-eval")
    record = _record(cell, export, run, metrics_json, cpu, time.time() - t0)
    tmp = res.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(res)
    return record


def _record(cell: Cell, export: Path, run: Path, metrics_json: Path, cpu: dict, wall: float) -> dict:
    meta = json.loads((export / "model.json").read_text())
    sched = meta["schedule"]
    dist = sigma_distribution_from_dict(sched["sigma_dist"])
    val = _validation_losses(run / "tb")
    metrics = flatten_metrics(json.loads(metrics_json.read_text())["metrics"])
    ema = sorted(k for k in val if k.startswith("ema_"))
    if ema:
        metrics["val_loss"] = val[ema[0]]
    elif "raw" in val:
        metrics["val_loss"] = val["raw"]
    return {"dataset": cell.dataset, "schedule": cell.schedule, "seed": cell.seed, "steps": meta["step"],
            "images_seen": meta.get("images_seen"), "median_log_sigma": dist.median_log_sigma,
            "sigma_dist": sched["sigma_dist"], "noise": sched.get("noise"), "shift": sched.get("shift"),
            "sigma_data": sched["sigma_data"], "validation": val, "metrics": metrics,
            "cpu_seconds": cpu, "wall_seconds": wall, "finite": all(math.isfinite(v) for v in metrics.values())}


def read_result(out: Path, cell: Cell) -> dict | None:
    p = cell_dir(out, cell) / "result.json"
    return json.loads(p.read_text()) if p.is_file() else None
