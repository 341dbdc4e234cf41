"""Webdataset shard files: deterministic writing, reading back, checksums.

A shard ``shard-%06d.tar`` holds, per sample ``<key>``, contiguous members
``<key>.mean.npy``, ``<key>.std.npy`` (float16, raw VAE space), ``<key>.cls`` (ASCII integer, only
when the label is known), ``<key>.json`` and ``<key>.sha256``: the checksum of the sample's other members
(:func:`sample_digest`), verified as the sample is read (:func:`check_sample`), so corrupted content is
caught by the reader at the cost of one sha256 over data it reads anyway.  Keys contain no dots (webdataset splits the key at the
first dot of the base name).  Tar headers are normalized (mtime 0, uid/gid 0, mode 0444) so the same
samples always give the same bytes and the same sha256.

Shards are written to a temporary name in the same directory and renamed into place only when
complete; the writer is always closed, also when writing fails.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from latentdiff.utils.errors import DataError
from latentdiff.utils.io import atomic_open

__all__ = [
    "SHARD_PATTERN",
    "shard_name",
    "sidecar_name",
    "ShardSample",
    "npy_bytes",
    "npy_load",
    "write_shard",
    "iter_tar",
    "read_shard_verified",
    "CHECKSUM_MEMBER",
    "sample_digest",
    "check_sample",
]

CHECKSUM_MEMBER = "sha256"  # the member holding a sample's checksum (hex, ASCII)
_NOT_CONTENT = ("__key__", "__url__", CHECKSUM_MEMBER)

SHARD_PATTERN = "shard-%06d.tar"


def shard_name(index: int) -> str:
    return SHARD_PATTERN % index


def sidecar_name(index: int) -> str:
    return "shard-%06d.stats.npz" % index


class ShardSample:
    __slots__ = ("key", "mean", "std", "label", "meta")

    def __init__(self, key: str, mean: np.ndarray, std: np.ndarray, label: int, meta: dict):
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        self.key, self.mean, self.std, self.label, self.meta = key, mean, std, label, meta


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def sample_digest(members: dict) -> str:
    """sha256 (hex) of one sample's members, i.e. every entry except ``__key__``, ``__url__`` and the
    checksum member itself: for each member in sorted suffix order, ``suffix``, a NUL byte, the payload
    length as 8 little-endian bytes, the payload.  A lost, renamed or altered member changes it."""
    h = hashlib.sha256()
    for suffix in sorted(k for k in members if k not in _NOT_CONTENT):
        payload = members[suffix]
        h.update(suffix.encode() + b"\0" + len(payload).to_bytes(8, "little"))
        h.update(payload)
    return h.hexdigest()


def check_sample(smp: dict, shard: str) -> None:
    """Raise :class:`DataError` naming the shard, the sample and the fix unless ``smp``'s checksum member
    matches its content (:func:`sample_digest`)."""
    fix = (f"the shard is corrupt: restore {shard} from a copy, or delete it and its .stats.npz sidecar and re-run "
           "the same tools/encode_latents.py command (it re-encodes only the missing shard)")
    stored = smp.get(CHECKSUM_MEMBER)
    if stored is None:
        raise DataError(f"shard {shard}: sample {smp.get('__key__')!r} has no {CHECKSUM_MEMBER} member; {fix}")
    if stored.decode("ascii", "replace").strip() != sample_digest(smp):
        raise DataError(f"shard {shard}: sample {smp.get('__key__')!r} does not match its checksum; {fix}")


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, b):
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)
        return len(b)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tf.addfile(ti, io.BytesIO(data))


def write_shard(path: str | Path, samples: list[ShardSample]) -> dict:
    """Write ``samples`` to ``path`` atomically (temp file + rename).  Returns {count, sha256, bytes}."""
    if not samples:
        raise ValueError(f"refusing to write an empty shard {path} (no empty shards)")
    with atomic_open(path) as f:
        hw = _HashingWriter(f)
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.USTAR_FORMAT) as tf:
            for s in samples:
                members = {"mean.npy": npy_bytes(s.mean), "std.npy": npy_bytes(s.std)}
                if s.label is not None and s.label >= 0:
                    members["cls"] = str(int(s.label)).encode()
                members["json"] = json.dumps(s.meta, sort_keys=True).encode()
                members[CHECKSUM_MEMBER] = sample_digest(members).encode()
                for suffix, payload in members.items():
                    _add(tf, f"{s.key}.{suffix}", payload)
    return {"count": len(samples), "sha256": hw.h.hexdigest(), "bytes": hw.n}


class _HashingReader(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        if n:
            self.h.update(memoryview(b)[:n])
        return n


def iter_tar(fileobj, name: str) -> Iterator[dict]:
    """Samples (dict suffix -> bytes, plus ``__key__``) of a shard stream; every error names the shard."""
    current: dict | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                base = os.path.basename(m.name)
                key, dot, suffix = base.partition(".")
                if not dot:
                    raise DataError(f"shard {name}: member {m.name!r} has no extension")
                payload = tf.extractfile(m).read()
                if len(payload) != m.size:
                    raise DataError(f"shard {name} is truncated inside member {m.name!r}; re-encode it")
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                if suffix in current:
                    raise DataError(f"shard {name}: duplicate member {m.name!r} (sample members not contiguous?)")
                current[suffix] = payload
    except DataError:
        raise
    except Exception as exn:  # noqa: BLE001 - tarfile.ReadError, EOFError, ...
        raise DataError(f"shard {name} is truncated or corrupt ({type(exn).__name__}: {exn}); re-encode it") from exn
    if current is not None:
        yield current


def read_shard_verified(path: str | Path, name: str | None = None, keep: tuple[str, ...] | None = None):
    """Stream a shard from disk: returns (samples, sha256 of the whole file, bytes).

    ``keep`` limits the members kept per sample (e.g. ``("mean.npy",)``); ``__key__`` is always kept.
    """
    path = Path(path)
    name = name or path.name
    try:
        f = open(path, "rb")
    except OSError as exn:
        raise DataError(f"shard {name} cannot be read ({exn}); re-encode it or restore the file") from exn
    with f:
        hr = _HashingReader(f)
        br = io.BufferedReader(hr, buffer_size=1 << 20)
        samples = []
        for smp in iter_tar(br, name):
            if keep is not None:
                smp = {k: v for k, v in smp.items() if k == "__key__" or k in keep}
            samples.append(smp)
        while br.read(1 << 20):
            pass
        return samples, hr.h.hexdigest(), f.tell()
