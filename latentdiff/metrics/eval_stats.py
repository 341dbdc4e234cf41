"""One pass over an image set for every quality metric: FWD packet moments, SWD descriptors, features.

:func:`collect_statistics` reads each image once (ranks take the disjoint parts ``rank::world``) and
computes, per batch, the Haar packets (FWD moments, all-reduced in float64, and the wavelet
features), the Laplacian-pyramid patch descriptors of SWD (patch positions seeded by the global
image index) and the KID / precision-recall / FID features of every extractor.  Features and
descriptors are gathered on every rank and put back in global image order, so every number computed
from them is the same for any number of ranks (the FWD moments only up to float64 summation order).

:class:`SetStatistics` can be saved (:func:`save_statistics`) and used as a reference later
(``latentdiff-eval --save-ref`` / ``--ref REF.npz``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from latentdiff.metrics.features import WaveletFeatures
from latentdiff.metrics.frechet import _agree_on_failure, several_ranks
from latentdiff.metrics.fwd import PacketAccumulator
from latentdiff.metrics.swd import SWDSettings, laplacian_pyramid, patch_descriptors, patch_positions, pyramid_resolutions
from latentdiff.metrics.wavelets import haar_packets
from latentdiff.utils import dist as ldist
from latentdiff.utils.errors import FIDError
from latentdiff.utils.io import atomic_write_bytes

__all__ = ["STATS_FORMAT", "SetStatistics", "collect_statistics", "save_statistics", "load_statistics",
           "is_statistics_file"]

STATS_FORMAT = "latentdiff-eval-statistics/1"


@dataclass
class SetStatistics:
    """What the metrics need of one image set (all in global image order)."""

    n: int
    resolution: tuple
    fwd_level: int | None = None
    fwd_mu: np.ndarray | None = None  # (P, d)
    fwd_sigma: np.ndarray | None = None  # (P, d, d)
    swd: SWDSettings | None = None
    swd_images: int = 0
    swd_descriptors: list = field(default_factory=list)  # per level, float32 (swd_images * K, C * p * p)
    features: dict = field(default_factory=dict)  # name -> float64 (n, D)
    extractors: dict = field(default_factory=dict)  # name -> describe()
    provenance: dict = field(default_factory=dict)


class _Pass:
    """The per-rank state of one collection pass."""

    def __init__(self, extractors: dict, fwd_level: int | None, swd: SWDSettings | None, resolution):
        self.extractors, self.fwd_level, self.swd, self.resolution = extractors, fwd_level, swd, tuple(resolution)
        self.acc = PacketAccumulator(fwd_level) if fwd_level is not None else None
        self.shapes = pyramid_resolutions(resolution, swd.min_resolution) if swd is not None else []
        self.indices: list[int] = []
        self.feats: dict[str, list] = {k: [] for k in extractors}
        self.swd_idx: list[int] = []
        self.desc: list[list] = [[] for _ in self.shapes]

    def batch(self, idx: list[int], x: torch.Tensor) -> None:
        if tuple(x.shape[2:]) != self.resolution:
            raise FIDError(f"an image of {x.shape[2]}x{x.shape[3]} among {self.resolution[0]}x{self.resolution[1]} "
                           "images: every image of a set must have one resolution")
        packets = None
        if self.acc is not None:
            packets = haar_packets(x.to(torch.float64) / 255.0, self.fwd_level)
            self.acc.update_packets(packets)
        for name, ex in self.extractors.items():
            same = isinstance(ex, WaveletFeatures) and packets is not None and ex.level_for(*x.shape[2:]) == self.fwd_level
            self.feats[name].append((ex.from_packets(packets) if same else ex(x)).to("cpu", torch.float64))
        self.indices.extend(idx)
        if self.swd is not None:
            self._descriptors(idx, x)

    def _descriptors(self, idx: list[int], x: torch.Tensor) -> None:
        keep = [j for j, g in enumerate(idx) if g < self.swd.max_images]
        if not keep:
            return
        pyr = laplacian_pyramid(x[keep].to(torch.float64), len(self.shapes))
        pos = [patch_positions(idx[j], self.shapes, self.swd) for j in keep]
        for lvl, level in enumerate(pyr):
            corners = np.stack([p[lvl] for p in pos])
            self.desc[lvl].append(patch_descriptors(level, corners, self.swd.patch_size))
        self.swd_idx.extend(idx[j] for j in keep)


def _ordered(parts: list, key: str, per_item: int = 1):
    """Concatenate the ranks' ``(indices, tensors)`` in global index order."""
    idx = np.concatenate([np.asarray(p[key + "_idx"], dtype=np.int64) for p in parts])
    rows = [t for p in parts for t in p[key]]
    if not rows:
        return idx, None
    data = torch.cat(rows)
    order = torch.from_numpy(np.argsort(idx, kind="stable"))
    data = data.reshape(len(idx), per_item, *data.shape[1:])[order].reshape(-1, *data.shape[1:])
    return np.sort(idx), data


def _gather(p: _Pass, distributed: bool = True) -> tuple[dict, list, int]:
    """Features and descriptors of all ranks, in global image order, on every rank."""
    mine = {"feat_idx": p.indices, "swd_idx": p.swd_idx}
    for name, rows in p.feats.items():
        mine[f"f:{name}_idx"], mine[f"f:{name}"] = p.indices, rows
    for lvl, rows in enumerate(p.desc):
        mine[f"d:{lvl}_idx"], mine[f"d:{lvl}"] = p.swd_idx, rows
    parts = ldist.all_gather_object(mine) if distributed and several_ranks() else [mine]
    feats = {name: _ordered(parts, f"f:{name}")[1] for name in p.feats}
    k = p.swd.patches_per_image if p.swd is not None else 1
    desc = [_ordered(parts, f"d:{lvl}", k)[1] for lvl in range(len(p.desc))]
    n_swd = sum(len(part["swd_idx"]) for part in parts)
    return feats, desc, n_swd


def collect_statistics(images, extractors: dict, *, fwd_level: int | None, swd: SWDSettings | None,
                       batch_size: int = 64, progress: bool = True, desc: str = "metrics",
                       distributed: bool = True) -> SetStatistics:
    """Every statistic of ``images`` (an :class:`~latentdiff.metrics.image_sources.ImageSource`, the
    global set) in one pass; every rank must call this and gets the same result.  ``distributed=False``:
    this process alone reads every image (no collective; e.g. rank 0's evaluation during training)."""
    spread = distributed and several_ranks()
    rank, world = (ldist.get_rank(), ldist.get_world_size()) if spread else (0, 1)
    resolution = tuple(images.resolution)
    p = _Pass(extractors, fwd_level, swd, resolution)
    local = list(range(rank, len(images), world))
    bar = tqdm(total=len(local), unit="img", desc=desc, disable=not (progress and ldist.get_rank() == 0),
               dynamic_ncols=True)
    error = None
    try:
        for start in range(0, len(local), batch_size):
            idx = local[start : start + batch_size]
            p.batch(idx, images.batch(idx))
            bar.update(len(idx))
    except Exception as e:  # re-raised on every rank after they all know (no rank hangs in a collective)
        error = e
    finally:
        bar.close()
    if spread:
        _agree_on_failure(error, rank)
    elif error is not None:
        raise error
    stats = SetStatistics(n=len(images), resolution=resolution, swd=swd,
                          extractors={k: ex.describe() for k, ex in extractors.items()})
    if p.acc is not None:
        if spread:
            p.acc.all_reduce()
        stats.fwd_level = fwd_level
        stats.fwd_mu, stats.fwd_sigma, _ = p.acc.statistics()
    stats.features, stats.swd_descriptors, stats.swd_images = _gather(p, spread)
    return stats


# --------------------------------------------------------------------------------------------
# saved statistics


def is_statistics_file(path) -> bool:
    path = Path(path)
    if not (path.is_file() and path.suffix == ".npz"):
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            return "meta" in data.files and json.loads(str(data["meta"])).get("format") == STATS_FORMAT
    except Exception:  # noqa: BLE001 - not ours
        return False


def save_statistics(path, stats: SetStatistics) -> Path:
    """``path`` (.npz): arrays plus a JSON ``meta`` (format, counts, settings, extractors, provenance)."""
    import io

    path = Path(path)
    if path.suffix != ".npz":
        raise FIDError(f"--save-ref {path}: the statistics file must end in .npz")
    meta = {"format": STATS_FORMAT, "n": stats.n, "resolution": list(stats.resolution), "fwd_level": stats.fwd_level,
            "swd": None if stats.swd is None else stats.swd.to_dict(), "swd_images": stats.swd_images,
            "extractors": stats.extractors, "provenance": stats.provenance, "features": sorted(stats.features),
            "swd_levels": len(stats.swd_descriptors)}
    arrays = {"meta": np.array(json.dumps(meta))}
    if stats.fwd_mu is not None:
        arrays["fwd_mu"], arrays["fwd_sigma"] = stats.fwd_mu, stats.fwd_sigma
    for name, f in stats.features.items():
        arrays[f"feat_{name}"] = f.numpy()
    for lvl, d in enumerate(stats.swd_descriptors):
        arrays[f"swd_{lvl}"] = d.numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_statistics(path) -> SetStatistics:
    path = Path(path)
    if not is_statistics_file(path):
        raise FIDError(f"{path} is not a statistics file written by latentdiff-eval --save-ref (format {STATS_FORMAT}); "
                       "FID-only mu/sigma files go to latentdiff-fid")
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        stats = SetStatistics(n=int(meta["n"]), resolution=tuple(meta["resolution"]), fwd_level=meta["fwd_level"],
                              swd=None if meta["swd"] is None else SWDSettings(**meta["swd"]),
                              swd_images=int(meta["swd_images"]), extractors=meta["extractors"],
                              provenance=meta["provenance"])
        if "fwd_mu" in data.files:
            stats.fwd_mu, stats.fwd_sigma = data["fwd_mu"], data["fwd_sigma"]
        stats.features = {name: torch.from_numpy(data[f"feat_{name}"].copy()) for name in meta["features"]}
        stats.swd_descriptors = [torch.from_numpy(data[f"swd_{i}"].copy()) for i in range(meta["swd_levels"])]
    stats.provenance = {**stats.provenance, "statistics_file": str(path)}
    return stats
