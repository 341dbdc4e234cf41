"""Preemption and test faults: SIGTERM/SIGUSR1 make every rank save and exit 0; ``LATENTDIFF_FAULT``
kills a rank at a chosen point (tests of the resume logic only).

A signal only sets a flag (:func:`install_signal_handlers`); every ``K = stop_check_every`` optimizer
steps (the steps whose number is a multiple of K) every rank all-reduces it (:func:`agree_stop`), so all
ranks stop after the same step and save together.  Bound: a signal that reaches any rank while step
``s`` runs (or before the first step, ``s`` = the first step) is acted on after step ``ceil(s / K) * K``
(or at the end of the run, if that comes first): at most K optimizer steps, then one checkpoint.  On the
other steps nothing is communicated, so the step has no sync point of its own (K = 1: every step).
"""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from latentdiff.utils.dist import is_distributed

__all__ = ["FAULT_ENV", "install_signal_handlers", "agree_stop", "fault"]

FAULT_ENV = "LATENTDIFF_FAULT"  # test-only fault injection, e.g. "kill-after-save:4", "kill-rank:1:3", "signal-rank:1:5"
_STOP = {"requested": False}


def install_signal_handlers() -> None:
    """SIGTERM/SIGUSR1 (SLURM preemption) set the stop flag.  Installed at the very start of the train
    command, so no signal is lost during the (slow) setup."""

    def handler(signum, frame):
        _STOP["requested"] = True

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, handler)


def agree_stop(local: bool, device: torch.device, step: int = 0, every: int = 1) -> bool:
    """True on every rank when any rank got a stop signal (or ``local`` is already true), agreed after the
    optimizer steps ``step`` that are multiples of ``every`` (a collective there; False and no communication
    on the other steps, also on a rank that got the signal: it waits for the next agreement)."""
    if step % every:
        return False
    local = local or _STOP["requested"]
    if not is_distributed() or dist.get_world_size() == 1:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


def fault(kind: str, step: int, rank: int) -> None:
    """Test-only: ``LATENTDIFF_FAULT=kill-after-save:S`` (every rank, right after the save of step S),
    ``kill-rank:R:S`` (rank R at step S), ``kill-mid-save:S`` (rank 0 inside the save of step S),
    ``signal-rank:R:S`` (rank R sends itself SIGUSR1 after step S: the stop bound)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] == kind == "kill-after-save" and int(parts[1]) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if parts[0] == kind == "kill-rank" and int(parts[1]) == rank and int(parts[2]) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if parts[0] == kind == "signal-rank" and int(parts[1]) == rank and int(parts[2]) == step:
        os.kill(os.getpid(), signal.SIGUSR1)
    if parts[0] == kind == "kill-mid-save" and int(parts[1]) == step and rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
