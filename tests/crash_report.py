"""Failure messages for tests that run subprocesses: the crash's cause, not the launcher's noise.

``cause(p)`` returns the return code and the last lines a rank (or the program) wrote to stderr/stdout
that are not torchrun's ``ChildFailedError`` report, DeepSpeed's log banners or progress bars, so an
assertion on a subprocess shows the exception that ended it.
"""
import re

_NOISE = re.compile(
    r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|WARNING)\]"  # DeepSpeed's log lines
    r"|^[EWI]\d{4} [\d:.]+ \d+ torch/distributed/"  # torchrun's own log lines
    r"|^(W|I)\d{4} "
)


def _launcher_report_start(lines):
    """Index of torchrun's final 'Traceback ... ChildFailedError' report (which names no cause), or len."""
    for i in range(len(lines) - 1, -1, -1):
        if "ChildFailedError" in lines[i]:
            for j in range(i, -1, -1):
                if lines[j].startswith("Traceback (most recent call last)"):
                    return j
            return i
    return len(lines)


def cause(p, lines: int = 40) -> str:
    """``rc=N`` and the last ``lines`` meaningful lines of a finished ``subprocess.run`` result."""
    err = (p.stderr or "").replace("\r", "\n").splitlines()
    err = err[: _launcher_report_start(err)]
    keep = [ln for ln in err if ln.strip() and not _NOISE.match(ln) and "step/s]" not in ln and "it/s]" not in ln]
    out = [ln for ln in (p.stdout or "").splitlines() if ln.strip()][-10:]
    return (f"rc={p.returncode}\n--- stderr (cause; launcher noise removed) ---\n" + "\n".join(keep[-lines:])
            + "\n--- stdout tail ---\n" + "\n".join(out))
