"""``latentdiff-schedule-study``: which training noise distribution is best for this data?

    latentdiff-schedule-study GRID.yaml --out STUDY [--cells 0-9] [--list] [--report-only]
    sbatch --array=0-N --export=ALL,GRID=GRID.yaml,OUT=STUDY slurm/study.sbatch

The SLURM form runs one cell per array task.  A grid (:mod:`latentdiff.cli.study_grid`) names datasets, schedules (the noise fields of
``latentdiff-train``) and seeds at one training budget, one sampler and one set of metrics.  Every cell is
a real ``latentdiff-train`` run, ``latentdiff-sample`` and ``latentdiff-eval`` against the dataset's
validation split (:mod:`latentdiff.cli.study_cells`), in ``STUDY/cells/<dataset>/<schedule>/seed<k>``.
Finished cells are skipped and a killed cell resumes from its checkpoint, so re-running the same command
continues a study.  After every cell ``STUDY/study.json``, ``STUDY/study.md`` (mean +- standard error over
seeds, paired difference to the baseline with t and sign tests) and ``STUDY/study_<dataset>.png`` (each
metric against the schedule's median ln sigma, the rules' predictions marked) are rewritten.

A cell being run holds ``cell.lock``: several workers (processes or SLURM tasks) may run the same grid,
each skipping the cells another live worker holds.  A cell records the settings it was run with (``cell.json``); running it again with a different grid
(budget, train, sampler or eval settings, the schedule's fields or the dataset) is refused instead of
mixing results.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from latentdiff.cli.study_cells import CellBusy, CellFailed, cell_dir, run_cell
from latentdiff.cli.study_grid import Cell, StudyGrid, load_grid
from latentdiff.cli.study_report import write_report
from latentdiff.utils.errors import ConfigError

__all__ = ["main", "cli", "select_cells"]


def select_cells(cells: list[Cell], spec: str | None) -> list[Cell]:
    """``None``/``all`` = every cell; ``i``, ``i-j`` (inclusive) or ``i,j,k`` = those indices of the grid order."""
    if spec in (None, "", "all"):
        return cells
    idx: list[int] = []
    try:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            idx += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise ConfigError(f"--cells {spec!r}: expected all, i, i-j or i,j,k") from None
    bad = [i for i in idx if not 0 <= i < len(cells)]
    if bad:
        raise ConfigError(f"--cells {spec!r}: indices {bad} outside 0..{len(cells) - 1} (the grid has {len(cells)} cells)")
    return [cells[i] for i in idx]


def cell_settings(grid: StudyGrid, cell: Cell) -> dict:
    """What determines a cell's result (compared with the cell's ``cell.json`` on a re-run)."""
    return {"dataset": str(grid.datasets[cell.dataset]), "schedule": grid.schedules[cell.schedule], "seed": cell.seed,
            "budget_images": grid.budget_images, "train": grid.train_fields(cell.dataset), "sampler": grid.sampler, "eval": grid.eval}


def _check_settings(grid: StudyGrid, cell: Cell, out: Path) -> None:
    d = cell_dir(out, cell)
    f = d / "cell.json"
    now = json.loads(json.dumps(cell_settings(grid, cell)))
    if f.is_file():
        old = json.loads(f.read_text())
        if old != now:
            diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
            raise ConfigError(f"{cell.key}: {f} was run with other settings ({', '.join(diff)} differ); use another "
                              f"--out, or delete {d} to redo it")
        return
    d.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(now, indent=1))


def run(grid: StudyGrid, out: Path, cells: list[Cell], keep_going: bool = False) -> int:
    failed = []
    for i, c in enumerate(cells):
        _check_settings(grid, c, out)
        try:
            r = run_cell(grid, c, out)
        except CellBusy as e:
            print(f"[study] skipping {c.key}: {e}", flush=True)
            continue
        except CellFailed as e:
            print(f"[study] FAILED {e}", file=sys.stderr, flush=True)
            failed.append(c.key)
            if not keep_going:
                break
            continue
        shown = ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items())
        print(f"[study] {i + 1}/{len(cells)} {c.key}: median ln sigma {r['median_log_sigma']:+.3f}; {shown}", flush=True)
        write_report(grid, out)
    write_report(grid, out)
    if failed:
        print(f"[study] {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="latentdiff-schedule-study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="study grid YAML (see latentdiff.cli.study_grid)")
    p.add_argument("--out", required=True, help="study directory (cells/, study.json, study.md, plots)")
    p.add_argument("--cells", default=None, help="all (default), i, i-j or i,j,k: which cells (grid order) to run")
    p.add_argument("--array-task", action="store_true",
                   help="run the cell numbered $SLURM_ARRAY_TASK_ID (one cell per SLURM array task)")
    p.add_argument("--list", action="store_true", help="print the cells with their index and state, run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite study.json/md and the plots, run nothing")
    p.add_argument("--keep-going", action="store_true", help="continue with the next cell when one fails")
    args = p.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        out = Path(args.out).resolve()
        cells = grid.cells()
        spec = args.cells
        if args.array_task:
            if "SLURM_ARRAY_TASK_ID" not in os.environ:
                raise ConfigError("--array-task: SLURM_ARRAY_TASK_ID is not set (submit with sbatch --array=0-N)")
            spec = os.environ["SLURM_ARRAY_TASK_ID"]
        chosen = select_cells(cells, spec)
        if args.list:
            for i, c in enumerate(cells):
                state = "done" if (cell_dir(out, c) / "result.json").is_file() else "todo"
                print(f"{i:4d} {state} {c.key}")
            return 0
        out.mkdir(parents=True, exist_ok=True)
        if args.report_only:
            agg = write_report(grid, out)
            print(f"[study] {agg['cells_done']}/{agg['cells_total']} cells done; wrote {out / 'study.md'}")
            return 0
        return run(grid, out, chosen, keep_going=args.keep_going)
    except ConfigError as e:
        print(f"latentdiff-schedule-study: error: {e}", file=sys.stderr)
        return 2


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
