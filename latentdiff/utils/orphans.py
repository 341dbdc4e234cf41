"""A launched rank ends when its launcher ends.

torchrun and the deepspeed launcher start every rank in a session of its own, so killing the launcher's
process group (``kill -9 -PGID``, a closed terminal, a job step cancelled without its children) leaves
the ranks running: training, writing and pruning checkpoints with nobody to collect their exit code.
:func:`exit_with_launcher` starts a daemon thread that checks, once per ``interval`` seconds, whether the
process has been re-parented (``os.getppid()`` changed: the launcher is gone and init or a subreaper
adopted the rank); then it prints one line and ends the process at once (``os._exit``), as a killed
launcher would have done.  Polling the parent pid works on every POSIX system and, unlike Linux's
``PR_SET_PDEATHSIG``, does not fire when only the launcher's *thread* that spawned the rank ends.

Only ranks started by a launcher watch (``LOCAL_RANK`` in the environment: torchrun, deepspeed, srun
with several tasks); a command run by hand keeps running under ``nohup`` after its shell closes.
"""
from __future__ import annotations

import os
import sys
import threading
import time

__all__ = ["exit_with_launcher", "launched"]

_WATCH = {"thread": None}


def launched() -> bool:
    """Was this process started by a multi-process launcher (torchrun, deepspeed, srun tasks)?"""
    return "LOCAL_RANK" in os.environ


def _watch(parent: int, interval: float, prog: str) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            try:
                print(f"{prog} (pid {os.getpid()}): the launcher (pid {parent}) has ended; exiting",
                      file=sys.stderr, flush=True)
            finally:
                os._exit(1)


def exit_with_launcher(prog: str, *, interval: float = 1.0, force: bool = False) -> bool:
    """Watch the parent process (see the module docstring); returns True when a watch runs.

    Idempotent.  ``force`` watches even without a launcher (tests)."""
    if _WATCH["thread"] is not None:
        return True
    if not (force or launched()) or os.name != "posix":
        return False
    parent = os.getppid()
    if parent <= 1:  # already adopted by init: nothing to watch
        return False
    t = threading.Thread(target=_watch, args=(parent, float(interval), prog), name="exit-with-launcher", daemon=True)
    t.start()
    _WATCH["thread"] = t
    return True
