"""``latentdiff-train``: DeepSpeed ZeRO training of a UViT / U-Net denoiser on an encoded dataset.

    deepspeed [--hostfile H] --module latentdiff.train --config tiny-cpu --dataset DATA --run-dir RUN \\
        --deepspeed_config ds_configs/zero2.json
    torchrun --nproc_per_node 8 -m latentdiff.train --config cfg.yaml --deepspeed_config ds_configs/zero2.json

Every TrainConfig field is a flag (``--lr``, ``--micro-batch``, ...); the config is validated before any
process group starts.  Re-running the same command resumes from the latest checkpoint; SIGTERM/SIGUSR1
(SLURM preemption) makes every rank save and exit 0.
"""
from __future__ import annotations

import argparse
import json
import sys

from latentdiff.utils import dist as ldist
from latentdiff.utils.errors import ConfigError, LatentdiffError
from latentdiff.training.config import TrainConfig
from latentdiff.utils.config import add_config_flags, config_from_args

__all__ = ["main", "parse_args"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="latentdiff-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, TrainConfig)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    try:
        import deepspeed

        p = deepspeed.add_config_arguments(p)
    except ImportError:  # pragma: no cover - deepspeed is a hard dependency
        p.add_argument("--deepspeed_config", default=None)
    return p.parse_args(argv)


def _read_ds_config(path):
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config {path}: no such file (see ds_configs/ for zero1/zero2/zero3/zero3_offload)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON ({e})") from None


def main(argv=None) -> int:
    from latentdiff.training.trainer import install_signal_handlers

    args = parse_args(argv)
    world = ldist.env_world_size()
    try:
        cfg = config_from_args(TrainConfig, args).validate(world)  # before any process group (trap T24)
        ds_config = _read_ds_config(getattr(args, "deepspeed_config", None))
    except ConfigError as e:
        print(f"latentdiff-train: {e}", file=sys.stderr)
        return 2
    from latentdiff.training.trainer import Trainer

    install_signal_handlers()  # before the (slow) setup, so a preemption signal is never lost
    trainer = None
    try:
        ldist.init_distributed(cfg.comm_timeout_minutes, single_process_group=True)
        trainer = Trainer(cfg, ds_config, log=lambda m: print(m, flush=True) if ldist.is_main() else None)
        result = trainer.train()
        if result["finished"] and ldist.is_main():
            from latentdiff.training.export import export_checkpoint
            from latentdiff.training.checkpoint import find_latest

            ckpt = find_latest(trainer.ckpt_root)
            out = export_checkpoint(ckpt, trainer.run_dir / "export" / ckpt.name)
            print(f"exported {out}", flush=True)
        ldist.barrier()
    except LatentdiffError as e:
        print(f"latentdiff-train (rank {ldist.get_rank()}): {e}", file=sys.stderr, flush=True)
        ldist.destroy()
        return 2
    ldist.destroy()
    return 0


def cli() -> None:
    """Console-script entry point: ``main`` then a hard exit (see ``latentdiff.utils.dist.hard_exit``)."""
    ldist.hard_exit(main())


if __name__ == "__main__":
    cli()
