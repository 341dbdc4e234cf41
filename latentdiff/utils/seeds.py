"""Seed lists as users write them: ``"0-49999"``, ``"0-9,20,30-39"`` (inclusive ranges), an int or a list.

One parser for the sampler (``--seeds``: the order is kept, a repeated seed is refused) and the FID
stage (``--seeds``: a set of seeds, returned sorted and unique); one compact formatter for the records;
:func:`step_seed`, the trainer's per-(step, micro-batch, rank) seed.
"""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np

__all__ = ["parse_seeds", "format_seeds", "step_seed"]

_PART = re.compile(r"^(\d+)(?:\s*-\s*(\d+))?$")


def parse_seeds(spec, *, as_set: bool = False, error: type[Exception] = ValueError, flag: str = "--seeds") -> list[int]:
    """``spec`` -> list of non-negative ints.

    ``as_set=False``: in the given order, a seed listed twice is an error.  ``as_set=True``: sorted
    and unique.  Errors are raised as ``error`` with a message that names ``flag`` and the fix.
    """
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        parts: list[str] = [str(int(spec))]
    elif isinstance(spec, str):
        parts = spec.split(",")
    else:
        try:
            parts = [str(int(s)) for s in spec]
        except (TypeError, ValueError):
            raise error(f"{flag} {spec!r}: expected seeds like 0-49999 or 0-9,20,30-39") from None
    out: list[int] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        m = _PART.match(part)
        if m is None:
            raise error(
                f"{flag} {spec!r}: {part!r} is neither a seed N nor a range A-B of non-negative integers; "
                "use inclusive ranges and single seeds separated by commas, e.g. 0-49999 or 0-9,20,30-39"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise error(f"{flag} {spec!r}: range {part} is empty (end < start)")
        out.extend(range(lo, hi + 1))
    if not out:
        raise error(f"{flag} {spec!r} selects no seed; use e.g. 0-49999")
    if as_set:
        return sorted(set(out))
    if len(set(out)) != len(out):
        raise error(f"{flag} {spec!r} lists a seed twice")
    return out


def format_seeds(seeds: Iterable[int] | None, *, ordered: bool = False) -> str | None:
    """Compact inclusive ranges: ``[0, 1, 2, 5]`` -> ``"0-2,5"`` (what :func:`parse_seeds` reads back).

    ``ordered=False``: of the sorted unique seeds.  ``ordered=True``: in the given order, ranges of
    consecutive ascending seeds only (``[7, 3, 4, 5]`` -> ``"7,3-5"``).
    """
    if seeds is None:
        return None
    s = [int(x) for x in seeds] if ordered else sorted(set(int(x) for x in seeds))
    if not s:
        return ""
    parts = []
    lo = prev = s[0]
    for x in s[1:]:
        if x == prev + 1:
            prev = x
            continue
        parts.append(f"{lo}-{prev}" if prev > lo else f"{lo}")
        lo = prev = x
    parts.append(f"{lo}-{prev}" if prev > lo else f"{lo}")
    return ",".join(parts)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A 63-bit seed mixing (seed, step, micro, rank) (numpy ``SeedSequence`` hashing): the same tuple
    always gives the same seed, different tuples (other ranks, steps, micro-batches) different ones."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint32).astype(np.uint64)
    return int(state.dot(np.array([1, 1 << 31], dtype=np.uint64)))
