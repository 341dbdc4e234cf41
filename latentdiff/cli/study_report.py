"""Aggregate a schedule study's finished cells: ``study.json``, ``study.md`` and one plot per dataset.

Per (dataset, schedule): every metric's mean +- standard error over the seeds that finished, and the
paired difference to the baseline schedule over the seeds both finished (t and sign test,
:mod:`latentdiff.metrics.seed_stats`).  Lower is better for every metric.  The plots put each metric
against the schedule's median ln sigma (the training distribution's location after its shift), the
unshifted log-normal points joined as the P_mean sweep and the shift rules' predictions as vertical lines.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from latentdiff.cli.study_cells import read_result
from latentdiff.cli.study_grid import StudyGrid
from latentdiff.metrics.seed_stats import mean_se, paired_comparison

__all__ = ["aggregate", "write_report", "is_sweep_point", "METRIC_LABELS"]

METRIC_LABELS = {"val_loss": "validation loss (fixed sigma grid)", "fwd": "FWD", "swd": "SWD x1e3",
                 "kid_pixels": "KID (pixels)", "kid_wavelet": "KID (wavelet)", "fid": "FID",
                 "kid_inception": "KID (Inception)"}


def is_sweep_point(fields: dict) -> bool:
    """An unshifted EDM log-normal (the P_mean sweep)."""
    return fields.get("noise", "wsnr") == "edm" and fields.get("noise_base", "lognormal") == "lognormal"


def sweep_optimum(xs, ys) -> tuple[float, bool]:
    """``(x*, interior)``: the vertex of the parabola through the best point and its two neighbours
    (Lagrange interpolation; a three-point estimate of the minimum's location), clipped to them; at an
    end of the sweep (or with fewer than 3 points) the best point itself and ``interior = False``."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    x = [float(xs[i]) for i in order]
    y = [float(ys[i]) for i in order]
    k = min(range(len(y)), key=lambda i: y[i])
    if len(x) < 3 or k in (0, len(x) - 1):
        return x[k], False
    (x0, x1, x2), (y0, y1, y2) = x[k - 1:k + 2], y[k - 1:k + 2]
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
    if a <= 0:
        return x1, True
    return min(max(-b / (2 * a), x0), x2), True


def _optima(per: dict, schedules: dict, metrics: list[str]) -> dict:
    """Per metric: the sweep's optimum in median ln sigma and each rule's distance from it."""
    out = {}
    for m in metrics:
        pts = [(v["median_log_sigma"], v["metrics"][m]["mean"]) for s, v in per.items()
               if is_sweep_point(schedules[s]) and m in v["metrics"] and not math.isnan(v["metrics"][m]["mean"])]
        if len(pts) < 2:
            continue
        x, interior = sweep_optimum([p[0] for p in pts], [p[1] for p in pts])
        rules = {s: v["median_log_sigma"] - x for s, v in per.items() if not is_sweep_point(schedules[s])}
        out[m] = {"log_sigma": x, "interior": interior, "rule_offsets": rules}
    return out


def _cell_stats(rows: list[dict], base_rows: dict, metrics: list[str]) -> dict:
    out = {"seeds": [r["seed"] for r in rows], "median_log_sigma": rows[0]["median_log_sigma"], "metrics": {}}
    for m in metrics:
        vals = [r["metrics"][m] for r in rows if m in r["metrics"]]
        mean, se, n = mean_se(vals) if vals else (math.nan, math.nan, 0)
        entry = {"mean": mean, "se": se, "n": n, "values": vals}
        pairs = [(r["metrics"][m], base_rows[r["seed"]]["metrics"][m]) for r in rows
                 if r["seed"] in base_rows and m in r["metrics"] and m in base_rows[r["seed"]]["metrics"]]
        if pairs:
            entry["vs_baseline"] = paired_comparison([a for a, _ in pairs], [b for _, b in pairs])
        out["metrics"][m] = entry
    return out


def aggregate(grid: StudyGrid, out: Path) -> dict:
    """``{"grid", "cells_done", "cells_total", "datasets": {name: {schedule: stats}}}`` of finished cells."""
    results = {c.key: r for c in grid.cells() if (r := read_result(out, c)) is not None}
    metrics = sorted({m for r in results.values() for m in r["metrics"]}, key=lambda m: list(METRIC_LABELS).index(m)
                     if m in METRIC_LABELS else 99)
    data, optima = {}, {}
    for d in grid.datasets:
        base_rows = {r["seed"]: r for r in results.values() if r["dataset"] == d and r["schedule"] == grid.baseline}
        per = {}
        for s in grid.schedules:
            rows = [r for r in results.values() if r["dataset"] == d and r["schedule"] == s]
            if rows:
                per[s] = _cell_stats(sorted(rows, key=lambda r: r["seed"]), base_rows, metrics)
        data[d] = per
        optima[d] = _optima(per, grid.schedules, metrics)
    cpu = [sum(r["cpu_seconds"].values()) for r in results.values() if r.get("cpu_seconds")]
    return {"grid": grid.to_dict(), "cells_done": len(results), "cells_total": len(grid.cells()), "metrics": metrics,
            "cpu_seconds_per_cell": mean_se(cpu)[0] if cpu else None, "datasets": data, "optima": optima}


def _fmt(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "-"
    digits = 3 if abs(mean) >= 1 else 4
    return f"{mean:.{digits}g} ± {se:.2g}" if not math.isnan(se) else f"{mean:.{digits}g}"


def _diff_text(c: dict | None) -> str:
    if not c or c["n"] == 0:
        return "-"
    p = c["p_t"]
    return (f"{c['mean']:+.3g} ± {c['se']:.2g} (wins {c['wins']}/{c['n']}, "
            f"t p={p:.2g}, sign p={c['p_sign']:.2g})" if not math.isnan(p) else f"{c['mean']:+.3g} (n={c['n']})")


def _best(per: dict, metric: str) -> str:
    cand = [(v["metrics"][metric]["mean"], s) for s, v in per.items()
            if metric in v["metrics"] and not math.isnan(v["metrics"][metric]["mean"])]
    return min(cand)[1] if cand else "-"


def study_markdown(agg: dict) -> str:
    g = agg["grid"]
    lines = [f"# Schedule study\n\n{agg['cells_done']} of {agg['cells_total']} cells finished; budget "
             f"{g['budget_images']} training images per cell; seeds {g['seeds']}; sampler {g['sampler']['solver']} "
             f"NFE {g['sampler']['nfe']} sigma_max {g['sampler']['sigma_max']}, {g['sampler']['samples']} samples "
             f"against the validation split. Mean ± standard error over seeds; lower is better for every metric; "
             f"'vs {g['baseline']}' is the paired difference over common seeds.\n"]
    for d, per in agg["datasets"].items():
        if not per:
            continue
        lines.append(f"\n## {d}\n")
        head = "| schedule | median ln σ | " + " | ".join(METRIC_LABELS.get(m, m) for m in agg["metrics"]) + " |"
        lines += [head, "|" + "---|" * (2 + len(agg["metrics"]))]
        for s, v in sorted(per.items(), key=lambda kv: kv[1]["median_log_sigma"]):
            cells = [_fmt(v["metrics"][m]["mean"], v["metrics"][m]["se"]) if m in v["metrics"] else "-"
                     for m in agg["metrics"]]
            lines.append(f"| {s} (n={len(v['seeds'])}) | {v['median_log_sigma']:+.3f} | " + " | ".join(cells) + " |")
        lines += ["", "Best mean: " + ", ".join(f"{METRIC_LABELS.get(m, m)}: **{_best(per, m)}**"
                                                 for m in agg["metrics"]) + "."]
        lines += _optima_lines(agg.get("optima", {}).get(d, {}))
        lines += ["", f"| paired difference vs {g['baseline']} | " + " | ".join(METRIC_LABELS.get(m, m)
                                                                          for m in agg["metrics"]) + " |",
                  "|" + "---|" * (1 + len(agg["metrics"]))]
        for s, v in sorted(per.items(), key=lambda kv: kv[1]["median_log_sigma"]):
            if s != g["baseline"]:
                lines.append(f"| {s} | " + " | ".join(_diff_text(v["metrics"].get(m, {}).get("vs_baseline"))
                                                       for m in agg["metrics"]) + " |")
    return "\n".join(lines) + "\n"


def _optima_lines(opt: dict) -> list[str]:
    if not opt:
        return []
    lines = ["", "Optimum of the P_mean sweep in median ln σ (vertex of the parabola through the best sweep point and its neighbours) "
                 "and each rule's offset from it:", ""]
    for m, o in opt.items():
        x = f"{o['log_sigma']:+.2f}" if o["interior"] else f"at the sweep end {o['log_sigma']:+.2f}"
        offs = ", ".join(f"{s} {dx:+.2f}" for s, dx in o["rule_offsets"].items())
        lines.append(f"- {METRIC_LABELS.get(m, m)}: {x}; {offs}")
    return lines + [""]


def plot_dataset(agg: dict, dataset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per, g, metrics = agg["datasets"][dataset], agg["grid"], agg["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    sweep = sorted((v["median_log_sigma"], s) for s, v in per.items() if is_sweep_point(g["schedules"][s]))
    rules = [(s, v) for s, v in per.items() if not is_sweep_point(g["schedules"][s])]
    for ax, m in zip(axes[0], metrics):
        xs = [x for x, s in sweep if m in per[s]["metrics"]]
        ys = [per[s]["metrics"][m] for _, s in sweep if m in per[s]["metrics"]]
        ax.errorbar(xs, [y["mean"] for y in ys], yerr=[0 if math.isnan(y["se"]) else y["se"] for y in ys],
                    fmt="o-", color="k", capsize=3, label="log-normal P_mean sweep")
        for i, (s, v) in enumerate(rules):
            y = v["metrics"].get(m)
            if y is None:
                continue
            c = f"C{i}"
            ax.errorbar([v["median_log_sigma"]], [y["mean"]], yerr=[0 if math.isnan(y["se"]) else y["se"]],
                        fmt="s", color=c, capsize=3, label=s)
            if g["schedules"][s].get("noise") in ("wsnr", "resolution"):
                ax.axvline(v["median_log_sigma"], color=c, ls="--", lw=0.8)
        ax.set_xlabel("median ln σ of the training distribution")
        ax.set_title(METRIC_LABELS.get(m, m), fontsize=9)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{dataset}: metric vs training-noise location (mean ± s.e. over seeds; dashed: rule predictions)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename: concurrent writers (SLURM array tasks) never leave a torn file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    tmp.replace(path)


def write_report(grid: StudyGrid, out: Path) -> dict:
    agg = aggregate(grid, out)
    out = Path(out)
    _atomic(out / "study.json", lambda p: p.write_text(json.dumps(agg, indent=1, allow_nan=True)))
    md = study_markdown(agg) + "".join(f"\n![{d}](study_{d}.png)\n" for d, per in agg["datasets"].items() if per)
    _atomic(out / "study.md", lambda p: p.write_text(md))
    for d, per in agg["datasets"].items():
        if per and agg["metrics"]:
            _atomic(out / f"study_{d}.png", lambda p, d=d: plot_dataset(agg, d, p))
    return agg
