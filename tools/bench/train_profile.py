#!/usr/bin/env python
"""Where a trainer step's time goes: wall time per part of ``Trainer._train_step`` and of the loop around it.

Runs the trainer of ``train_throughput.py`` (same model, data, micro-batch, EMA and power-EMA defaults)
under torchrun, wraps each part of the step with a wall-clock timer (CPU: every op is synchronous, so
wall time is the cost) and, for a few steps, runs ``torch.profiler`` to count host syncs
(``aten::_local_scalar_dense``: ``.item()`` / ``float(t)``) and collectives (``c10d``/``gloo`` events)
per optimizer step.  The parts wrapped, when the trainer has them:

* data: ``next()`` of the batch iterator (waiting for the DataLoader, incl. worker start per epoch);
* latents: ``Trainer._model_batch`` (posterior draw, normalization, label dropout);
* forward / backward / optimizer: ``edm_loss``, ``engine.backward``, ``engine.step``;
* stats: ``StepMetrics.add`` (the σ-bin statistics);
* ema / power-ema: the two EMA updates (``ema + power-ema``: the fused ``update_averages``, when present);
* stop agreement: the stop/preemption flag agreement (``agree_stop``);
* log: ``Trainer._log`` (the reduction of the window's statistics, every ``log_every`` steps);
* other: the rest of the loop iteration (fp16 watch, snapshot check, progress bar, ...).

Usage: python tools/bench/train_profile.py [--nproc 2] [--steps 40] [--out bench_out/train_profile]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from train_throughput import MODEL, make_dataset

PARTS = ("data", "latents", "forward", "backward", "optimizer", "stats", "ema", "power-ema", "ema + power-ema",
         "stop agreement", "log", "other")


class Timers:
    def __init__(self):
        self.t = collections.defaultdict(float)
        self.n = collections.defaultdict(int)
        self.on = False

    def wrap(self, name, fn):
        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[name] += time.perf_counter() - t0
                self.n[name] += 1
        return timed


def _wrap_iter(timers, it):
    while True:
        yield timers.wrap("data", next)(it)


def worker(args) -> None:
    import torch

    from latentdiff.cli.train import parse_args
    from latentdiff.training import tb as tb_mod
    from latentdiff.training import trainer as trainer_mod
    from latentdiff.training.config import TrainConfig
    from latentdiff.utils import dist as ldist
    from latentdiff.utils.config import config_from_args

    torch.set_num_threads(1)
    ldist.init_distributed(single_process_group=True)
    rank, world = ldist.get_rank(), ldist.get_world_size()
    ds = json.loads(Path(args.ds_config).read_text())
    targs = parse_args(["--config", "tiny-cpu", "--dataset", args.data, "--run-dir", args.run_dir, *MODEL,
                        "--micro-batch", str(args.batch), "--max-steps", str(args.steps), "--checkpoint-every",
                        "100000", "--log-every", "10", "--heldout-batch", "0", "--num-workers", str(args.workers),
                        "--resume", "never", "--ema-rates", "[0.999]", *args.extra])
    cfg = config_from_args(TrainConfig, targs).validate(world)
    tm = Timers()
    trainer_mod.edm_loss = tm.wrap("forward", trainer_mod.edm_loss)
    if hasattr(trainer_mod, "agree_stop"):
        trainer_mod.agree_stop = tm.wrap("stop agreement", trainer_mod.agree_stop)
    tb_mod.StepMetrics.add = tm.wrap("stats", tb_mod.StepMetrics.add)
    trainer_mod.StepMetrics = tb_mod.StepMetrics
    tr = trainer_mod.Trainer(cfg, ds, log=lambda m: None)
    eng = tr.engine
    eng.backward, eng.step = tm.wrap("backward", eng.backward), tm.wrap("optimizer", eng.step)
    if hasattr(trainer_mod, "update_averages"):  # one fused update of every EMA and power EMA
        trainer_mod.update_averages = tm.wrap("ema + power-ema", trainer_mod.update_averages)
    else:
        tr.ema.update = tm.wrap("ema", tr.ema.update)
        if tr.power_ema is not None:
            tr.power_ema.update = tm.wrap("power-ema", tr.power_ema.update)
    tr._model_batch = tm.wrap("latents", tr._model_batch)
    tr._log = tm.wrap("log", tr._log)
    real_batches = tr._batches
    tr._batches = lambda: _wrap_iter(tm, real_batches())
    # time steps [warmup, prof_start); count events of steps [prof_start, prof_start + prof_steps) with torch.profiler
    real_step = tr._train_step
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    state = {"i": 0}

    def step(*a, **k):
        i = state["i"]
        state["i"] += 1
        tm.on = args.warmup <= i < args.prof_start  # profiled steps are not timed
        if i == args.prof_start:
            prof.start()
        if i == args.prof_start + args.prof_steps:
            prof.stop()
        return real_step(*a, **k)

    tr._train_step = step
    import resource

    ru0 = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    tr.train()
    ru1 = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    cpu = [(b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime) for a, b in zip(ru0, ru1)]
    if state["i"] < args.prof_start + args.prof_steps:
        prof.stop()
    timed_steps = args.prof_start - args.warmup
    total = sum(tr.step_times[args.warmup:args.prof_start])
    known = sum(tm.t.values())
    per_step = {k: 1e3 * v / timed_steps for k, v in tm.t.items()}
    per_step["other"] = 1e3 * (total - known) / timed_steps
    events = collections.Counter()
    for e in prof.key_averages():
        name = e.key
        if name == "aten::_local_scalar_dense" or "c10d" in name or "gloo" in name or name.startswith("aten::item"):
            events[name] += e.count
    res = {"rank": rank, "world": world, "step_ms": 1e3 * total / timed_steps, "parts_ms": per_step,
           "calls": dict(tm.n), "timed_steps": timed_steps,
           # CPU seconds per step of this rank and of its (reaped) loader workers, over all steps run
           "cpu_ms": {"rank": 1e3 * cpu[0] / len(tr.step_times), "loader workers": 1e3 * cpu[1] / len(tr.step_times)},
           "per_step_events": {k: v / args.prof_steps for k, v in events.items()},
           "top_ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)}
    out = [None] * world
    if world > 1:
        import torch.distributed as dist

        dist.all_gather_object(out, res)
    else:
        out = [res]
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))
    ldist.destroy()


def report(results, header: str) -> str:
    lines = [header, "", "| part | " + " | ".join(f"rank {r['rank']} ms/step" for r in results) + " | share (rank 0) |",
             "|---|" + "---|" * (len(results) + 1)]
    r0 = results[0]
    for part in PARTS:
        vals = [r["parts_ms"].get(part) for r in results]
        if all(v is None for v in vals):
            continue
        cells = " | ".join("-" if v is None else f"{v:.2f}" for v in vals)
        lines.append(f"| {part} | {cells} | {100 * (r0['parts_ms'].get(part) or 0) / r0['step_ms']:.1f} % |")
    lines.append("| **step** | " + " | ".join(f"**{r['step_ms']:.2f}**" for r in results) + " | 100 % |")
    lines += ["", "CPU time per step (all steps, incl. warm-up and profiled): " + "; ".join(
        f"rank {r['rank']}: own {r['cpu_ms']['rank']:.1f} ms, its loader workers {r['cpu_ms']['loader workers']:.1f} ms"
        for r in results)]
    lines += ["", "host syncs and collectives per optimizer step (torch.profiler, rank 0):", ""]
    for k, v in sorted(r0["per_step_events"].items()):
        lines.append(f"* `{k}`: {v:g}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--data")
    p.add_argument("--run-dir")
    p.add_argument("--result")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--prof-start", type=int, default=30)
    p.add_argument("--prof-steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--work", default="bench_out/train_throughput/work")
    p.add_argument("--out", default="bench_out/train_profile")
    p.add_argument("extra", nargs="*", help="more latentdiff.train flags (after --)")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    data = make_dataset(work)
    result = out / "profile.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port", "29391",
           __file__, "--worker", "--ds-config", args.ds_config, "--data", str(data), "--run-dir", str(work / "run-profile"),
           "--result", str(result), "--steps", str(args.steps), "--warmup", str(args.warmup), "--prof-start",
           str(args.prof_start), "--prof-steps", str(args.prof_steps), "--batch", str(args.batch), "--workers",
           str(args.workers), "--", *args.extra]
    load0 = os.getloadavg()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    load1 = os.getloadavg()
    results = json.loads(result.read_text())
    head = (f"{args.nproc} rank(s), {Path(args.ds_config).name}, micro-batch {args.batch}, {args.workers} loader "
            f"worker(s)/rank, {args.steps} steps ({args.warmup} warm-up), flags {args.extra}; load average "
            f"{load0[0]:.2f} before, {load1[0]:.2f} after")
    md = report(results, head)
    (out / "profile.md").write_text(md + "\n\nrank 0 top ops (torch.profiler):\n\n```\n" + results[0]["top_ops"] + "\n```\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
