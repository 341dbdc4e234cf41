"""``latentdiff-train``: DeepSpeed ZeRO training of a UViT / U-Net denoiser on an encoded dataset.

    deepspeed [--hostfile H] --module latentdiff.train --config tiny-cpu --dataset DATA --run-dir RUN \\
        --deepspeed_config ds_configs/zero2.json
    torchrun --nproc_per_node 8 -m latentdiff.train --config cfg.yaml --deepspeed_config ds_configs/zero2.json

Every TrainConfig field is a flag (``--lr``, ``--micro-batch``, ...); the config is validated before any
process group starts.  Re-running the same command resumes from the latest checkpoint; SIGTERM/SIGUSR1
(SLURM preemption) makes every rank save and exit 0.  A finished run writes ``RUN/export/step_N``; a run
stopped earlier (``--max-steps``, a signal) writes none: export its checkpoint with ``latentdiff-export RUN``.
"""
from __future__ import annotations

import argparse
import json
import sys

import deepspeed

from latentdiff.training.checkpoint import find_latest
from latentdiff.training.config import TrainConfig
from latentdiff.training.engine import build_ds_config, check_precision_supported
from latentdiff.training.export import export_checkpoint
from latentdiff.training.runtime import quiet_deepspeed_deprecations, use_environment_extensions_dir
from latentdiff.training.signals import install_signal_handlers
from latentdiff.training.trainer import Trainer
from latentdiff.utils import dist as ldist
from latentdiff.utils.config import add_config_flags, config_from_args
from latentdiff.utils.errors import ConfigError, LatentdiffError

__all__ = ["main", "parse_args", "cli"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="latentdiff-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, TrainConfig)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return deepspeed.add_config_arguments(p).parse_args(argv)


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


def _finish(trainer: Trainer, result: dict) -> None:
    """Rank 0: export a finished run; say that an unfinished one has no export and how to make one."""
    ckpt = find_latest(trainer.ckpt_root)
    if result["finished"]:
        out = export_checkpoint(ckpt, trainer.run_dir / "export" / ckpt.name)
        print(f"exported {out}", flush=True)
        return
    why = "a stop signal" if result["stopped"] else "--max-steps"
    print(f"stopped by {why} at step {result['step']} of {trainer.total_steps}: no export was written. Re-run the "
          f"same command to continue, or export the checkpoint now with: latentdiff-export {trainer.run_dir}",
          flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    world = ldist.env_world_size()
    try:
        cfg = config_from_args(TrainConfig, args).validate(world)  # before any process group starts
        ds_config = _read_ds_config(getattr(args, "deepspeed_config", None))
        # a conflicting batch size or an unsupported precision is refused here, not on every rank
        check_precision_supported(build_ds_config(cfg, ds_config, world))
    except ConfigError as e:
        if ldist.env_local_rank() == 0:  # every rank of a node validates the same arguments: say it once
            print(f"latentdiff-train: {e}", file=sys.stderr)
        return 2
    install_signal_handlers()  # before the (slow) setup, so a preemption signal is never lost
    use_environment_extensions_dir(log=(lambda m: print(m, flush=True)) if ldist.env_rank() == 0 else None)
    quiet_deepspeed_deprecations()
    try:
        ldist.init_distributed(cfg.comm_timeout_minutes, single_process_group=True)
        trainer = Trainer(cfg, ds_config, log=lambda m: print(m, flush=True) if ldist.is_main() else None)
        result = trainer.train()
        if ldist.is_main():
            _finish(trainer, result)
        ldist.barrier()
    except LatentdiffError as e:
        # no barrier, no destroy(): another rank may be inside a training collective (see run_entry_point)
        if ldist.get_rank() == 0 or not getattr(e, "every_rank", False):  # an error all ranks raise: once
            print(f"latentdiff-train (rank {ldist.get_rank()}): {e}", file=sys.stderr, flush=True)
        return 2
    ldist.destroy()
    return 0


def cli() -> None:
    """Console-script entry point: ``main``, then an immediate exit with its code, also after an error
    (see ``latentdiff.utils.dist.run_entry_point``): an error on one rank ends the whole job at once."""
    ldist.run_entry_point(main, "latentdiff-train")


if __name__ == "__main__":
    cli()
