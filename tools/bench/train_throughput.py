#!/usr/bin/env python
"""Training throughput: the trainer's own overhead, multi-rank scaling, memory per ZeRO stage.

Measured side by side in the same processes (CPU timings are noisy; ratios are what count):

1. **trainer / bare engine** — images/s of the full ``Trainer`` step (webdataset loading, latent
   sampling, normalization, label dropout, EDM preconditioning + loss, the EMA and the two default
   power EMAs, the stop-flag agreement, logging every 10 steps) vs a bare DeepSpeed engine loop of the
   same ZeRO stage and gradient accumulation on the same model and batch (random tensors already in
   memory).  The two alternate in rounds inside each process (trainer, engine, trainer, engine, ...)
   so that a change of the machine's load hits both.  Goal >= 0.97.
2. **trainer / bare PyTorch** — vs a plain fwd + bwd + AdamW loop without DeepSpeed (1 rank, reported).
3. **2-rank / 1-rank** — total images/s on 2 ranks vs 1 rank, for the trainer and for the bare engine.
   Goal (ZeRO-2): >= 1.85, or within 0.05 of the bare engine's scaling in the same run.  Each rank uses
   one thread; on 2 cores a second rank has no spare core, so this needs a quiet machine.
4. **memory per rank** at ZeRO-0/1/2/3: bytes of parameters, gradients and optimizer states held by
   each rank (counted from the engine's tensors) and peak RSS (``--skip-memory`` leaves it out).

Rows: ZeRO-1, ZeRO-2, ZeRO-3 (micro-batch per rank, no accumulation) and ZeRO-2 with gradient
accumulation 2, all in one run; the load average before and after every launch is printed with them.

Usage:  python tools/bench/train_throughput.py [--steps 15] [--rounds 2] [--out bench_out/train_throughput]
It encodes a small real-image dataset with a tiny VAE first (cached in --work).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL = ["--model", "uvit-s", "--model-overrides", "{depth: 7, width: 256, num_heads: 4}"]


def make_dataset(work: Path) -> Path:
    data = work / "data"
    if (data / "dataset.json").is_file():
        return data
    from latentdiff.data.encode import EncodeConfig, encode_dataset
    from latentdiff.data.synthetic import make_tiny_vae, write_image_folder

    vae = make_tiny_vae(work / "vae")
    write_image_folder(work / "images", classes=4, per_class=96, size_range=(40, 96), seed=0)
    encode_dataset(EncodeConfig(inputs=[str(work / "images")], output=str(data), resolution=32, vae=str(vae),
                                shard_size=16, batch_size=32, workers=0, progress=False))
    return data


# ----------------------------------------------------------------------------------------------
# worker side (runs under torchrun)


def _mean(times):
    return sum(times) / len(times)


def bare_engine(args, cfg, ds, tr, world, rank):
    """A function running N steps of a bare DeepSpeed engine (same stage, batch, accumulation, model)."""
    import deepspeed
    import torch

    from latentdiff import models
    from latentdiff.diffusion.noise import LogNormalSigma
    from latentdiff.diffusion.precond import EDMPrecond, edm_loss
    from latentdiff.training.engine import build_ds_config

    torch.manual_seed(0)
    c, h, w = tr.sample_shape
    net = models.build(cfg.model, in_channels=c, resolution=h, num_classes=tr.num_classes, **cfg.model_overrides)
    den = EDMPrecond(net, 0.5)
    opt = torch.optim.AdamW(den.parameters(), lr=1e-4)
    eng, *_ = deepspeed.initialize(model=den, optimizer=opt, config=build_ds_config(cfg, ds, world))
    y = torch.randn(cfg.micro_batch, c, h, w)
    lab = torch.randint(0, max(tr.num_classes, 1), (cfg.micro_batch,)) if tr.num_classes else None
    g = torch.Generator().manual_seed(rank)

    def run(steps):
        times = []
        for _ in range(steps):
            t0 = time.time()
            for _ in range(cfg.grad_accum):
                loss, _ = edm_loss(eng, y, LogNormalSigma(), lab, generator=g)
                eng.backward(loss.mean())
                eng.step()
            times.append(time.time() - t0)
        return times

    return run


def bare_torch(args, cfg, tr, rank):
    """Per-step times of a plain fwd + bwd + clip + AdamW loop without DeepSpeed."""
    import torch

    from latentdiff import models
    from latentdiff.diffusion.noise import LogNormalSigma
    from latentdiff.diffusion.precond import EDMPrecond, edm_loss

    c, h, w = tr.sample_shape
    net = models.build(cfg.model, in_channels=c, resolution=h, num_classes=tr.num_classes, **cfg.model_overrides)
    den = EDMPrecond(net, 0.5)
    opt = torch.optim.AdamW(den.parameters(), lr=1e-4)
    y = torch.randn(cfg.micro_batch, c, h, w)
    lab = torch.randint(0, max(tr.num_classes, 1), (cfg.micro_batch,)) if tr.num_classes else None
    g = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(args.steps):
        t0 = time.time()
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.grad_accum):
            loss, _ = edm_loss(den, y, LogNormalSigma(), lab, generator=g)
            (loss.mean() / cfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(den.parameters(), 1.0)
        opt.step()
        times.append(time.time() - t0)
    return times


def worker(args) -> None:
    import torch

    from latentdiff.cli.train import parse_args
    from latentdiff.training.config import TrainConfig
    from latentdiff.training.trainer import Trainer
    from latentdiff.utils import dist as ldist
    from latentdiff.utils.config import config_from_args

    torch.set_num_threads(1)
    ldist.init_distributed(single_process_group=True)
    rank, world = ldist.get_rank(), ldist.get_world_size()
    ds = json.loads(Path(args.ds_config).read_text())
    targs = parse_args(["--config", "tiny-cpu", "--dataset", args.data, "--run-dir", args.bench_run_dir, *MODEL,
                        "--micro-batch", str(args.batch), "--grad-accum", str(args.grad_accum), "--max-steps",
                        str(args.steps), "--checkpoint-every", "100000", "--log-every", "10", "--heldout-batch", "0",
                        "--num-workers", str(args.workers), "--resume", "never", "--ema-rates", "[0.999]"])
    cfg = config_from_args(TrainConfig, targs).validate(world)
    tr = Trainer(cfg, ds, log=lambda m: None)
    res = {"world": world, "zero": tr.zero_stage, "grad_accum": cfg.grad_accum}
    if args.mode == "overhead":
        run_engine = bare_engine(args, cfg, ds, tr, world, rank)
        trainer_t, engine_t = [], []
        for _ in range(args.rounds):  # alternate: a change of the machine's load hits both
            tr.cfg.max_steps = tr.step + args.steps
            tr.train()
            trainer_t += tr.step_times[-args.steps:][args.warmup:]
            engine_t += run_engine(args.steps)[args.warmup:]
        res["trainer_step_s"], res["engine_step_s"] = _mean(trainer_t), _mean(engine_t)
        if world == 1 and args.torch_loop:
            res["torch_step_s"] = _mean(bare_torch(args, cfg, tr, rank)[args.warmup:])
    if args.mode == "memory":
        # one real step: count gradients right after backward, states after the optimizer step
        import torch as _t

        from latentdiff.diffusion.precond import edm_loss

        batches = tr._batches()
        g = _t.Generator().manual_seed(rank)
        y, labels = tr._model_batch(next(batches), g)
        loss, _ = edm_loss(tr.engine, y, tr.sigma_dist, labels, generator=g)
        tr.engine.backward(loss.mean())
        grads = grad_bytes(tr.engine)
        tr.engine.step()
        res["bytes"] = {**rank_bytes(tr.engine), "grads": grads}
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["images_per_step"] = cfg.micro_batch * cfg.grad_accum * world
    out = [None] * world
    if world > 1:
        import torch.distributed as dist

        dist.all_gather_object(out, res)
    else:
        out = [res]
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))
    ldist.destroy()


def rank_bytes(engine) -> dict:
    """Bytes of parameters / gradients / optimizer state this rank holds (partitions under ZeRO)."""
    import torch

    seen = set()

    def size(t):
        if not torch.is_tensor(t) or t.data_ptr() in seen or t.numel() == 0:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    params = sum(size(p.ds_tensor if hasattr(p, "ds_tensor") else p.data) for p in engine.module.parameters())
    opt = engine.optimizer
    state = 0
    inner = getattr(opt, "optimizer", opt)
    for st in getattr(inner, "state", {}).values():
        for v in st.values():
            state += size(v)
    master = 0
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for t in getattr(opt, name, []) or []:
            master += size(t)
    return {"params": params, "master_fp32": master, "optimizer_state": state}


def grad_bytes(engine) -> int:
    """Gradient bytes this rank holds after backward: full .grad tensors (ZeRO-0/1) or its reduced
    partitions (ZeRO-2 ``averaged_gradients``, ZeRO-3 grad partitions)."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    opt = engine.optimizer
    for name in ("averaged_gradients", "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"):
        g = getattr(opt, name, None)
        if isinstance(g, dict):
            for v in g.values():
                for t in (v if isinstance(v, (list, tuple)) else [v]):
                    add(t)
    for p in engine.module.parameters():
        add(p.grad)
    return total


# ----------------------------------------------------------------------------------------------
# driver


def launch(nproc, mode, ds_config, data, work, args, tag, grad_accum=1, steps=None, torch_loop=False) -> list[dict]:
    result = work / f"{tag}.json"
    run = work / f"run-{tag}"
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29400 + sum(map(ord, tag)) % 500), __file__, "--worker", "--mode", mode, "--ds-config", str(ds_config),
           "--data", str(data), "--bench-run-dir", str(run), "--steps", str(steps or args.steps), "--warmup",
           str(args.warmup if steps is None else 0), "--rounds", str(args.rounds), "--batch", str(args.batch),
           "--grad-accum", str(grad_accum), "--workers", str(args.workers), "--result", str(result)]
    cmd += ["--torch-loop"] if torch_loop else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    load0 = os.getloadavg()[0]
    p = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{p.stderr[-4000:]}")
    out = json.loads(result.read_text())
    for r in out:
        r["load"] = [load0, os.getloadavg()[0]]
    return out


CASES = [("ZeRO-1", "zero1.json", 1), ("ZeRO-2", "zero2.json", 1), ("ZeRO-3", "zero3.json", 1),
         ("ZeRO-2, grad accum 2", "zero2.json", 2)]


def overhead_rows(args, data, work) -> tuple[list[str], dict]:
    ds = REPO / "ds_configs"
    lines = ["| case | trainer/engine 1 rank | trainer/engine 2 ranks | 2-rank/1-rank trainer | 2-rank/1-rank engine "
             "| step s (1 rank: trainer, engine; 2 ranks: trainer, engine) | load avg (1-min) during 1-rank, 2-rank |",
             "|---|---|---|---|---|---|---|"]
    raw = {}
    for name, cfg, ga in CASES:
        first = name == "ZeRO-2"
        one = launch(1, "overhead", ds / cfg, data, work, args, f"o1-{cfg}-{ga}", ga, torch_loop=first)[0]
        two = launch(2, "overhead", ds / cfg, data, work, args, f"o2-{cfg}-{ga}", ga)
        t1, e1 = one["trainer_step_s"], one["engine_step_s"]
        t2, e2 = max(r["trainer_step_s"] for r in two), max(r["engine_step_s"] for r in two)
        raw[name] = {"one": one, "two": two}
        lines.append(f"| {name} | {e1 / t1:.3f} | {e2 / t2:.3f} | {2 * t1 / t2:.3f} | {2 * e1 / e2:.3f} | "
                     f"{t1:.3f}, {e1:.3f}; {t2:.3f}, {e2:.3f} | {one['load'][0]:.1f}→{one['load'][1]:.1f}, "
                     f"{two[0]['load'][0]:.1f}→{two[0]['load'][1]:.1f} |")
        if first and "torch_step_s" in one:
            raw["torch_vs_trainer_1rank"] = one["torch_step_s"] / t1
    return lines, raw


def verdict(raw) -> str:
    z = raw["ZeRO-2"]
    t1, e1 = z["one"]["trainer_step_s"], z["one"]["engine_step_s"]
    t2, e2 = max(r["trainer_step_s"] for r in z["two"]), max(r["engine_step_s"] for r in z["two"])
    ratio, st, se = e2 / t2, 2 * t1 / t2, 2 * e1 / e2
    ok_ratio, ok_scale = ratio >= 0.97, st >= 1.85 or st >= se - 0.05
    text = (f"ZeRO-2 goals: trainer/engine (2 ranks) {ratio:.3f} (>= 0.97: {'met' if ok_ratio else 'NOT met'}); "
            f"2-rank scaling {st:.3f} vs bare engine {se:.3f} (>= 1.85 or within 0.05 of the engine: "
            f"{'met' if ok_scale else 'NOT met'})")
    # two ranks cannot do more than twice the work, nor the trainer more than the bare engine
    if max(st, se) > 2.02 or ratio > 1.02:
        text += ("\nIMPLAUSIBLE (scaling above 2 or trainer faster than the bare engine): the machine's load changed "
                 "during the run, so these ratios are not evidence; rerun on a quiet machine")
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="overhead")
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--data")
    p.add_argument("--bench-run-dir")
    p.add_argument("--result")
    p.add_argument("--torch-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=15, help="optimizer steps per round (trainer and engine each)")
    p.add_argument("--rounds", type=int, default=2, help="trainer/engine rounds per process")
    p.add_argument("--warmup", type=int, default=3, help="steps of each round left out of the mean")
    p.add_argument("--batch", type=int, default=16, help="micro-batch per rank")
    p.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per rank of the trainer (default: "
                   "what README 'Data loading and cores' says fits 2 one-thread ranks on this machine's cores)")
    p.add_argument("--work", default="bench_out/train_throughput/work")
    p.add_argument("--out", default="bench_out/train_throughput")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.workers is None:
        from latentdiff.training.runtime import usable_cores

        args.workers = max(0, usable_cores() // 2 - 1)
    out = Path(args.out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = make_dataset(work)
    lines, raw = overhead_rows(args, data, work)
    lines.append(f"\n{verdict(raw)}")
    if "torch_vs_trainer_1rank" in raw:
        lines.append(f"trainer / bare PyTorch fwd+bwd+AdamW (ZeRO-2 row, 1 rank): {raw['torch_vs_trainer_1rank']:.3f}")
    lines.append(f"micro-batch {args.batch} per rank, model {' '.join(MODEL[1:])}, {args.workers} loader worker(s) per "
                 f"rank, {args.rounds} rounds x {args.steps} steps ({args.warmup} left out per round), "
                 f"{os.cpu_count()} CPUs")
    mem = {}
    if not args.skip_memory:
        lines += ["", "| ZeRO stage | params MB/rank | fp32 master MB/rank | optimizer state MB/rank | grads MB/rank | peak RSS MB (rank 0) |",
                  "|---|---|---|---|---|---|"]
        for stage in (0, 1, 2, 3):
            cfg = work / f"zero{stage}.json"
            cfg.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": False}}))
            r = launch(2, "memory", cfg, data, work, args, f"mem{stage}", steps=1)
            b = r[0]["bytes"]
            mem[stage] = r

            def mb(v):
                return v / 2**20

            lines.append(f"| {stage} | {mb(b['params']):.2f} | {mb(b['master_fp32']):.2f} | {mb(b['optimizer_state']):.2f} | "
                         f"{mb(b['grads']):.2f} | {r[0]['peak_rss_mb']:.0f} |")
    md = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps({"overhead": raw, "memory": mem}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
