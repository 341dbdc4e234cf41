"""Process-level settings of a training rank, applied before DeepSpeed starts.

* **DeepSpeed's CPU op build.**  On CPU, DeepSpeed compiles its shared-memory communication op
  (``deepspeed_shm_comm``) with torch's JIT extension builder the first time a process group starts;
  that takes about 2–3 minutes on 2 cores and prints nothing meanwhile.  torch keeps the build under
  ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), one directory shared by every Python
  environment of the user, so two environments rebuild it in turn (and a launch waits for another
  environment's build).  :func:`use_environment_extensions_dir` points ``TORCH_EXTENSIONS_DIR`` into the
  active virtual environment (``<venv>/torch_extensions``) unless it is already set, and says when the
  build is still to come.
* **Cores.**  Every rank runs its step on ``torch.get_num_threads()`` threads and feeds it from
  ``num_workers`` DataLoader processes.  When ``local ranks x (threads + workers)`` exceeds the cores
  this process may use, the workers take cores from the step while they decode (the step, not the
  loader, is then what the ranks wait for); :func:`core_budget_note` says so once at start.
* **Deprecation noise.**  DeepSpeed's ZeRO stages call ``torch.distributed.reduce_scatter_tensor`` /
  ``all_gather_into_tensor``, which torch marks deprecated with a ``FutureWarning`` issued on every
  call (every step, every rank).  Nothing a user can change; :func:`quiet_deepspeed_deprecations`
  filters exactly these messages.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

__all__ = ["EXTENSIONS_ENV", "use_environment_extensions_dir", "quiet_deepspeed_deprecations", "SHM_OP",
           "core_budget_note", "usable_cores"]

EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
SHM_OP = "deepspeed_shm_comm"
_DEPRECATED = r"`torch\.distributed\.\w+` is deprecated"


def use_environment_extensions_dir(log=None) -> Path:
    """Set ``TORCH_EXTENSIONS_DIR`` to ``<venv>/torch_extensions`` when unset and running in a virtual
    environment; returns the directory in use.  ``log`` (rank 0) gets one note when DeepSpeed's CPU
    communication op is not built there yet (the first launch compiles it)."""
    if EXTENSIONS_ENV not in os.environ and sys.prefix != sys.base_prefix:
        os.environ[EXTENSIONS_ENV] = str(Path(sys.prefix) / "torch_extensions")
    root = Path(os.environ.get(EXTENSIONS_ENV) or Path.home() / ".cache" / "torch_extensions")
    if log is not None and not any(root.glob(f"*/{SHM_OP}/{SHM_OP}*.so")):
        log(f"note: this launch builds DeepSpeed's CPU communication op ({SHM_OP}) into {root} "
            f"({EXTENSIONS_ENV}); it takes a few minutes, once per environment")
    return root


def quiet_deepspeed_deprecations() -> None:
    """Ignore torch's per-call FutureWarnings about the collectives DeepSpeed uses (see the module docstring)."""
    warnings.filterwarnings("ignore", message=_DEPRECATED, category=FutureWarning)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a SLURM allocation), else the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def core_budget_note(local_ranks: int, threads: int, workers: int, cores: int) -> str | None:
    """A note when the ranks of this node ask for more cores than there are (None otherwise)."""
    need = local_ranks * (threads + workers)
    if need <= cores:
        return None
    fit = max(0, cores // max(local_ranks, 1) - threads)
    return (f"{local_ranks} rank(s) x ({threads} compute thread(s) + {workers} loader worker(s)) = {need} > {cores} "
            f"cores: the loader workers take cores from the training step; --num-workers {fit} fits "
            "(README, 'Data loading and cores')")
