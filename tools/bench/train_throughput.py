#!/usr/bin/env python
"""Training throughput: the trainer's own overhead, multi-rank scaling, memory per ZeRO stage.

Measured side by side in the same processes (CPU timings are noisy; ratios are what count):

1. **trainer / bare engine** — images/s of the full ``Trainer`` step (webdataset loading, latent
   sampling, normalization, label dropout, EDM preconditioning + loss, EMA, per-step stop-flag
   all-reduce, logging) vs a bare DeepSpeed engine loop of the same ZeRO stage on the same model and
   batch (random tensors already in memory).  Goal >= 0.95.
2. **trainer / bare PyTorch** — vs a plain fwd + bwd + AdamW loop without DeepSpeed (reported).
3. **2-rank ZeRO-2 / 1-rank** — total images/s of the trainer on 2 ranks vs 1 rank.  On 2 cores
   a bare engine reaches ~1.75x; goal >= 1.7.  Each rank uses one thread.
4. **memory per rank** at ZeRO-0/1/2/3: bytes of parameters, gradients and optimizer states held by
   each rank (counted from the engine's tensors) and peak RSS.

Usage:  python tools/bench/train_throughput.py [--steps 30] [--out bench_out/train_throughput]
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


def _mean_after_warmup(times, warmup):
    t = times[warmup:]
    return sum(t) / len(t)


def worker(args) -> None:
    import deepspeed
    import torch

    from latentdiff.utils import dist as ldist
    from latentdiff.cli.train import parse_args
    from latentdiff.training.config import TrainConfig
    from latentdiff.utils.config import config_from_args
    from latentdiff.training.trainer import Trainer

    torch.set_num_threads(1)
    ldist.init_distributed(single_process_group=True)
    rank, world = ldist.get_rank(), ldist.get_world_size()
    ds = json.loads(Path(args.ds_config).read_text())
    targs = parse_args(["--config", "tiny-cpu", "--dataset", args.data, "--run-dir", args.bench_run_dir, *MODEL,
                        "--micro-batch", str(args.batch), "--max-steps", str(args.steps), "--checkpoint-every", "100000",
                        "--log-every", "10", "--heldout-batch", "0", "--num-workers", "1", "--resume", "never",
                        "--ema-rates", "[0.999]"])
    cfg = config_from_args(TrainConfig, targs).validate(world)
    tr = Trainer(cfg, ds, log=lambda m: None)
    res = {"world": world, "zero": tr.zero_stage}
    if args.mode in ("overhead", "scaling"):
        tr.train()
        res["trainer_step_s"] = _mean_after_warmup(tr.step_times, args.warmup)
    if args.mode == "overhead":
        # bare engine of the same stage, same model and batch: data already in memory, no EMA/logging
        from latentdiff import models
        from latentdiff.diffusion.noise import LogNormalSigma
        from latentdiff.diffusion.precond import EDMPrecond, edm_loss

        torch.manual_seed(0)
        c, h, w = tr.sample_shape
        net = models.build(cfg.model, in_channels=c, resolution=h, num_classes=tr.num_classes, **cfg.model_overrides)
        den = EDMPrecond(net, 0.5)
        opt = torch.optim.AdamW(den.parameters(), lr=1e-4)
        from latentdiff.training.engine import build_ds_config

        eng, *_ = deepspeed.initialize(model=den, optimizer=opt, config=build_ds_config(cfg, ds, world))
        y = torch.randn(cfg.micro_batch, c, h, w)
        lab = torch.randint(0, max(tr.num_classes, 1), (cfg.micro_batch,)) if tr.num_classes else None
        g = torch.Generator().manual_seed(rank)
        times = []
        for _ in range(args.steps):
            t0 = time.time()
            loss, _ = edm_loss(eng, y, LogNormalSigma(), lab, generator=g)
            eng.backward(loss.mean())
            eng.step()
            times.append(time.time() - t0)
        res["engine_step_s"] = _mean_after_warmup(times, args.warmup)
        if world == 1:  # bare PyTorch loop
            net2 = models.build(cfg.model, in_channels=c, resolution=h, num_classes=tr.num_classes, **cfg.model_overrides)
            den2 = EDMPrecond(net2, 0.5)
            opt2 = torch.optim.AdamW(den2.parameters(), lr=1e-4)
            times = []
            for _ in range(args.steps):
                t0 = time.time()
                loss, _ = edm_loss(den2, y, LogNormalSigma(), lab, generator=g)
                opt2.zero_grad(set_to_none=True)
                loss.mean().backward()
                torch.nn.utils.clip_grad_norm_(den2.parameters(), 1.0)
                opt2.step()
                times.append(time.time() - t0)
            res["torch_step_s"] = _mean_after_warmup(times, args.warmup)
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
    res["images_per_step"] = cfg.micro_batch * world
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


def launch(nproc, mode, ds_config, data, work, steps, warmup, batch, tag) -> list[dict]:
    result = work / f"{tag}.json"
    run = work / f"run-{tag}"
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29400 + hash(tag) % 500), __file__, "--worker", "--mode", mode, "--ds-config", str(ds_config),
           "--data", str(data), "--bench-run-dir", str(run), "--steps", str(steps), "--warmup", str(warmup),
           "--batch", str(batch), "--result", str(result)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{p.stderr[-4000:]}")
    return json.loads(result.read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="overhead")
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--data")
    p.add_argument("--bench-run-dir")
    p.add_argument("--result")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16, help="micro-batch per rank")
    p.add_argument("--work", default="bench_out/train_throughput/work")
    p.add_argument("--out", default="bench_out/train_throughput")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    out = Path(args.out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = make_dataset(work)
    ds = REPO / "ds_configs"
    rows = []
    one = launch(1, "overhead", ds / "zero2.json", data, work, args.steps, args.warmup, args.batch, "overhead1")[0]
    rows.append(("trainer / bare DeepSpeed engine (ZeRO-2, 1 rank)", one["engine_step_s"] / one["trainer_step_s"], ">= 0.95"))
    rows.append(("trainer / bare PyTorch fwd+bwd+AdamW (1 rank)", one["torch_step_s"] / one["trainer_step_s"], "report"))
    two = launch(2, "overhead", ds / "zero2.json", data, work, args.steps, args.warmup, args.batch, "overhead2")
    t2 = max(r["trainer_step_s"] for r in two)
    e2 = max(r["engine_step_s"] for r in two)
    rows.append(("trainer / bare DeepSpeed engine (ZeRO-2, 2 ranks)", e2 / t2, ">= 0.95"))
    rows.append(("2-rank / 1-rank total images/s, trainer (ZeRO-2)", (2 * one["trainer_step_s"]) / t2, ">= 1.7"))
    rows.append(("2-rank / 1-rank total images/s, bare engine (ZeRO-2)", (2 * one["engine_step_s"]) / e2, "~1.75 on 2 cores"))
    lines = ["| measurement | ratio | goal |", "|---|---|---|"] + [f"| {a} | {b:.3f} | {c} |" for a, b, c in rows]
    lines.append(f"\nstep times (s): 1 rank trainer {one['trainer_step_s']:.4f}, engine {one['engine_step_s']:.4f}, "
                 f"torch {one['torch_step_s']:.4f}; 2 ranks trainer {t2:.4f}, engine {e2:.4f}; "
                 f"micro-batch {args.batch} per rank, model {' '.join(MODEL[1:])}")
    mem = {}
    if not args.skip_memory:
        lines += ["", "| ZeRO stage | params MB/rank | fp32 master MB/rank | optimizer state MB/rank | grads MB/rank | peak RSS MB (rank 0) |",
                  "|---|---|---|---|---|---|"]
        for stage in (0, 1, 2, 3):
            cfg = work / f"zero{stage}.json"
            cfg.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": False}}))
            r = launch(2, "memory", cfg, data, work, 1, 0, args.batch, f"mem{stage}")
            b = r[0]["bytes"]
            mem[stage] = r
            mb = lambda v: v / 2**20  # noqa: E731
            lines.append(f"| {stage} | {mb(b['params']):.2f} | {mb(b['master_fp32']):.2f} | {mb(b['optimizer_state']):.2f} | "
                         f"{mb(b['grads']):.2f} | {r[0]['peak_rss_mb']:.0f} |")
    md = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps({"one": one, "two": two, "rows": rows, "memory": mem}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
