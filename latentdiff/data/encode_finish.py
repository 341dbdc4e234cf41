"""Pass 2 of the encode stage, after every chunk is committed: statistics, ``skipped.jsonl``, manifest.

Rank 0 checks that every chunk has its sidecar, writes ``skipped.jsonl`` and computes the dataset mean
point from the sidecars' partial sums; all ranks then read the shards again (rank ``r`` the shards
``i % world == r``, each verified against its sidecar's sha256) for the distance statistics, which are
summed per shard and combined in shard order, so the result does not depend on the number of ranks.
Rank 0 finally writes ``stats.json``/``stats.npz`` and, last, ``dataset.json``.
"""
from __future__ import annotations

import datetime
import json
import shlex
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from latentdiff import __version__
from latentdiff.contracts.manifest import SKIPPED_FILE, DatasetManifest, ShardEntry, shards_hash
from latentdiff.data.config import EncodeConfig
from latentdiff.data.encode_chunks import read_sidecar
from latentdiff.data.shards import npy_load, read_shard_verified, sidecar_name
from latentdiff.data.stats import distance_partial, finalize_stats, point_mean
from latentdiff.utils.dist import all_gather_object, broadcast_object, is_distributed
from latentdiff.utils.errors import DataError, EncodeError
from latentdiff.utils.io import atomic_write_bytes
from latentdiff.vae.autoencoder import PIXEL_RANGE, Autoencoder

__all__ = ["on_rank0", "finish_dataset", "skipped_records"]


def on_rank0(fn, rank: int, what: str):
    """``fn()`` on rank 0, its result on every rank; an error there is raised on every rank.

    Every rank must learn about a failure of rank 0, or the others would wait in the next collective.
    """
    value, err = None, None
    if rank == 0:
        try:
            value = fn()
        except EncodeError as exn:
            err = str(exn)
        except Exception as exn:  # noqa: BLE001 - reported on every rank, not only here
            err = f"{what} failed: {type(exn).__name__}: {exn}"
    value, err = broadcast_object((value, err))
    if err is not None:
        raise EncodeError(err)
    return value


def skipped_records(plan: dict, metas: list[dict]) -> list[dict]:
    """Container problems of the listing, then every chunk's skipped files in chunk order (no duplicates)."""
    skipped = [dict(p) for p in plan["problems"]]
    for m in metas:
        skipped.extend(m["skipped"])
    return skipped


def _sidecars(out: Path, plan: dict):
    """The partial statistics and records of every chunk, in chunk order."""
    pairs = [read_sidecar(out / sidecar_name(k)) for k in range(plan["n_chunks"])]
    return [p for p, _ in pairs], [m for _, m in pairs]


def _pass1_result(out: Path, plan: dict, sample_shape) -> dict:
    """Rank 0: the shard list and the dataset mean point; writes ``skipped.jsonl``."""
    missing = [k for k in range(plan["n_chunks"]) if not (out / sidecar_name(k)).is_file()]
    if missing:
        raise EncodeError(f"chunks {missing[:5]} were not completed ({out / sidecar_name(missing[0])} missing): "
                          "a rank failed; re-run the same command to resume")
    partials, metas = _sidecars(out, plan)
    lines = "".join(json.dumps(s, sort_keys=True) + "\n" for s in skipped_records(plan, metas))
    atomic_write_bytes(out / SKIPPED_FILE, lines.encode())
    shards = [ShardEntry(m["name"], m["count"], m["sha256"], m["bytes"]) for m in metas if m["count"] > 0]
    if not shards:
        raise EncodeError(f"every input was skipped, no shard was written (see {out / SKIPPED_FILE}): "
                          "check --min-size and the input files")
    pmean, cmean = point_mean(partials, sample_shape)
    return {"shards": shards, "pmean": pmean, "cmean": cmean}


def _shard_distances(out: Path, s: ShardEntry, pmean: torch.Tensor, cmean: torch.Tensor) -> torch.Tensor:
    samples, digest, _ = read_shard_verified(out / s.name, keep=("mean.npy",))
    if digest != s.sha256:
        raise DataError(f"{s.name} (sha256 differs from its sidecar)")
    means = [npy_load(smp["mean.npy"]) for smp in samples]
    if len(means) != s.count:
        raise DataError(f"{s.name} ({len(means)} samples, sidecar says {s.count})")
    return distance_partial(np.stack(means), pmean, cmean)


def _distance_pass(out: Path, info: dict, c: int, rank: int, world: int) -> torch.Tensor:
    """Every rank: the distance partial sums of its shards; (shards, C + C*C + C + 1), summed over ranks."""
    shards = info["shards"]
    buf = torch.zeros(len(shards), c + c * c + c + 1, dtype=torch.float64)
    bad = []
    for i in range(rank, len(shards), world):
        try:
            buf[i] = _shard_distances(out, shards[i], info["pmean"], info["cmean"])
        except DataError as exn:
            bad.append(str(exn))
    if is_distributed() and world > 1:
        tdist.all_reduce(buf)
    bad = [b for part in all_gather_object(bad) for b in part]
    if bad:
        raise EncodeError(f"shards changed on disk after they were written: {', '.join(bad[:5])}; delete them and "
                          "their .stats.npz sidecars and re-run the same command")
    return buf


def _manifest(cfg: EncodeConfig, plan: dict, shards: list[ShardEntry], metas: list[dict], ae: Autoencoder,
              sample_shape) -> DatasetManifest:
    labels = plan["labels"]
    num_labelled = sum((2 if cfg.flip else 1) for m in metas for key in m["keys"]
                       if not key.endswith("-flip") and labels[int(key)] >= 0)
    fp = plan["fingerprint"]
    return DatasetManifest(
        vae="none" if ae.is_pixel else ae.description(), resolution=cfg.resolution,
        sample_shape=tuple(int(v) for v in sample_shape), shards=shards, vae_precision=cfg.vae_precision,
        pixel_range=PIXEL_RANGE, min_size=cfg.min_size, max_pixels=cfg.max_pixels, flip=cfg.flip,
        num_labelled=num_labelled, num_classes=plan["num_classes"], class_names=plan["class_names"],
        shard_size=cfg.shard_size,
        skipped_by_reason=dict(Counter(s["reason"] for s in skipped_records(plan, metas))),
        inputs=fp["inputs"], listing_sha256=fp["listing_sha256"], num_listed=len(plan["items"]),
        command=shlex.join(cfg.command or sys.argv),
        created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        latentdiff_version=__version__,
    )


def _write_outputs(cfg: EncodeConfig, out: Path, plan: dict, shards: list[ShardEntry], pass2: torch.Tensor,
                   sample_shape, ae: Autoencoder) -> dict:
    """Rank 0: ``stats.json``/``stats.npz``, then ``dataset.json``; returns the run summary."""
    partials, metas = _sidecars(out, plan)
    finalize_stats(partials, list(pass2), shards_hash(shards), sample_shape).save(out)
    manifest = _manifest(cfg, plan, shards, metas, ae, sample_shape)
    manifest.save(out)
    return {
        "output": str(out), "num_images": manifest.num_images, "num_samples": manifest.num_samples,
        "num_shards": len(shards), "skipped": manifest.skipped_total,
        "skipped_by_reason": dict(sorted(manifest.skipped_by_reason.items())),
        "resumed_chunks": plan["resumed_chunks"], "num_chunks": plan["n_chunks"],
    }


def finish_dataset(cfg: EncodeConfig, out: Path, plan: dict, sample_shape, rank: int, world: int,
                   ae: Autoencoder) -> dict:
    """Pass 2 and the output files (every rank calls); returns the summary on every rank."""
    info = on_rank0(lambda: _pass1_result(out, plan, sample_shape), rank, "reading the chunk sidecars")
    pass2 = _distance_pass(out, info, int(sample_shape[0]), rank, world)
    summary = on_rank0(lambda: _write_outputs(cfg, out, plan, info["shards"], pass2, sample_shape, ae), rank,
                       "writing the statistics and dataset.json")
    return summary
