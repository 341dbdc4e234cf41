"""File I/O shared by every stage: atomic writes and sha256 checksums.

Atomic writes: write a temporary file beside the target, fsync, rename.

A reader (or a resumed run) sees the old file or the new one, never a partial one.  The temporary
name (``.NAME.PID.tmp``) carries the process id, so ranks writing beside each other never share a
temporary file; a crashed writer leaves only such dot-files, which resumable stages delete.
``sync_dir=True`` also fsyncs the directory after the rename, so the new name itself survives a
power loss (checkpoints use it for the files that mark a checkpoint complete).
:func:`atomic_open` hands the temporary file to any writer (PIL, numpy); :func:`atomic_dir` does the
same for a directory written by one process.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import numpy as np

__all__ = [
    "atomic_dir",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "fsync_dir",
    "json_default",
    "read_json",
    "sha256_file",
    "sha256_files",
]


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (its entries: a rename into it is durable afterwards); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, *, sync_dir: bool = False) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces ``path`` only when the block ends without error.

    The data goes to ``.NAME.PID.tmp`` beside ``path``; on success it is flushed, fsynced and renamed
    onto ``path``; on an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, sync_dir: bool = False) -> None:
    with atomic_open(path, sync_dir=sync_dir) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, sync_dir: bool = False) -> None:
    atomic_write_bytes(path, text.encode(), sync_dir=sync_dir)


def json_default(o: Any):
    """``json.dumps(default=...)`` for numpy scalars/arrays and paths."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False,
                      sync_dir: bool = False) -> None:
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=json_default) + "\n"
    atomic_write_text(path, text, sync_dir=sync_dir)


def read_json(path: str | os.PathLike, error: type[Exception], *, missing: str, invalid: str) -> Any:
    """The JSON value in ``path``; raises ``error`` naming the file when it is missing (``missing``: the
    rest of the message, e.g. how to make it) or not valid JSON (``invalid``: what to do instead)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing{missing}")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise error(f"{path} is not valid JSON ({exn}){invalid}") from exn


def _hash_into(h, path: str | os.PathLike, chunk: int) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte blocks (constant memory for any file size)."""
    h = hashlib.sha256()
    _hash_into(h, path, chunk)
    return h.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike], chunk: int = 1 << 22) -> str:
    """Hex sha256 over several files in the given order: each file's name, then its bytes."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        _hash_into(h, p, chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh directory ``.NAME.tmp`` beside ``path`` (one writer) that replaces ``path`` when the block
    ends without error; on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
