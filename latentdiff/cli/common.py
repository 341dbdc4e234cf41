"""What every command-line entry point shares: one way to report a refused input and end the process.

A :class:`~latentdiff.utils.errors.LatentdiffError` (any stage's error type) is one line on stderr,
``latentdiff-<stage>[rank r]: error: <message naming the file/field and the fix>``, and exit code 2; no
traceback, since the message is the diagnosis.  Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from latentdiff.utils import dist as ldist
from latentdiff.utils.errors import LatentdiffError

__all__ = ["report_error", "run_distributed", "cli_exit"]

T = TypeVar("T")


def report_error(command: str, e: BaseException) -> int:
    """Print ``e`` as the one-line refusal of ``command`` (with the rank when several run); return 2."""
    rank = f"[rank {ldist.get_rank()}]" if ldist.get_world_size() > 1 else ""
    print(f"{command}{rank}: error: {e}", file=sys.stderr, flush=True)
    return 2


def run_distributed(command: str, prepare: Callable[[], T | None], run: Callable[[T], None]) -> int:
    """``prepare()`` (config and input checks, before any process group; ``None`` = nothing more to do),
    then ``run(state)`` inside a process group this call starts and, after success, destroys.  0, or 2 after
    :func:`report_error` for a :class:`LatentdiffError` raised by either."""
    try:
        state = prepare()
        if state is None:
            return 0
        initialized_here = ldist.init_distributed()
        run(state)
    except LatentdiffError as e:
        # no barrier, no destroy() after an error: another rank may be inside a collective (run_entry_point)
        return report_error(command, e)
    if initialized_here:
        ldist.destroy()
    return 0


def cli_exit(main: Callable[[], int], prog: str) -> None:
    """Console-script entry point: ``main()``, then an immediate exit with its code, also after an error
    (:func:`latentdiff.utils.dist.run_entry_point`: no barrier, ends with its launcher)."""
    ldist.run_entry_point(main, prog)
