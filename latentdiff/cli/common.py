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
    then ``run(state)`` inside a process group this call starts and destroys.  0, or 2 after
    :func:`report_error` for a :class:`LatentdiffError` raised by either."""
    initialized_here = False
    try:
        state = prepare()
        if state is None:
            return 0
        initialized_here = ldist.init_distributed()
        run(state)
        return 0
    except LatentdiffError as e:
        return report_error(command, e)
    finally:
        if initialized_here:
            ldist.destroy()


def cli_exit(main: Callable[[], int]) -> None:
    """Console-script entry point: ``main()`` then a hard exit (see ``latentdiff.utils.dist.hard_exit``)."""
    ldist.hard_exit(main())
