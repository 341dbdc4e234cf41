"""Recomputing a dataset's statistics from its shards (``tools/dataset_stats.py``), and comparing two.

Every shard is checked against the manifest's sha256 and sample count.  The latent statistics come
from the float16 values stored in the shards, so they equal the encoder's bit for bit.  The RGB
spectrum cannot be recomputed from latents: it is merged from the per-shard sidecars
(``shard-%06d.stats.npz``); without them it is taken from the existing ``stats.npz`` (noted), or, in
pixel space, recomputed from the stored float16 pixels (noted: differs by float16 rounding).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from latentdiff.contracts.manifest import ShardEntry, load_manifest
from latentdiff.data.shards import npy_load, read_shard_verified
from latentdiff.data.stats import (
    RGB_REF_SIZE,
    DatasetStats,
    ShardPartial,
    distance_partial,
    finalize_stats,
    point_mean,
    resize_to_reference,
    shard_partial,
)
from latentdiff.diffusion.spectral import power_spectrum
from latentdiff.utils.errors import DataError
from latentdiff.utils.safe_load import load_npz

__all__ = ["recompute_stats", "relative_difference"]

_FIELDS = ("channel_mean", "channel_std", "channel_std_mean_only", "latent_var_mean", "latent_power",
           "rgb64_power", "dist_mean", "dist_sum_a", "dist_sum_aa")


def relative_difference(a: DatasetStats, b: DatasetStats) -> dict[str, float]:
    """max |a-b| / max(|a|, |b|, tiny) per field (inf for a shape or presence mismatch)."""
    out = {}
    for k in _FIELDS:
        x, y = getattr(a, k), getattr(b, k)
        if x is None or y is None:
            out[k] = 0.0 if x is None and y is None else math.inf
            continue
        if x.shape != y.shape:
            out[k] = math.inf
            continue
        scale = max(float(x.abs().max()), float(y.abs().max()), 1e-300)
        out[k] = float((x - y).abs().max()) / scale
    out["n"] = 0.0 if a.n == b.n else math.inf
    return out


def _sidecar_rgb(root: Path, s: ShardEntry):
    """(sum, n) of the RGB 64x64 spectra in the shard's sidecar, or (None, 0) without one."""
    sc = root / s.name.replace(".tar", ".stats.npz")
    if sc.is_file():
        z = load_npz(sc)  # allow_pickle=False: a pickled array is refused naming the file
        if "rgb64_sum" in z:
            return torch.from_numpy(np.array(z["rgb64_sum"], dtype=np.float64)), int(z["rgb64_n"])
    return None, 0


def _pixel_rgb(means: np.ndarray) -> torch.Tensor:
    """Sum of the 64x64 spectra of pixel-space samples (float16 pixels in [-1, 1])."""
    acc = torch.zeros(3, RGB_REF_SIZE, RGB_REF_SIZE, dtype=torch.float64)
    for x in means:
        acc += power_spectrum(resize_to_reference(torch.from_numpy(x.astype(np.float64))[None]))
    return acc


def _read_means(root: Path, s: ShardEntry, keep: tuple[str, ...]) -> list[dict]:
    samples, digest, _ = read_shard_verified(root / s.name, keep=keep)
    if digest != s.sha256:
        raise DataError(f"shard {root / s.name}: sha256 differs from dataset.json (corrupt or replaced); re-encode it")
    if len(samples) != s.count:
        raise DataError(f"shard {root / s.name}: {len(samples)} samples, dataset.json says {s.count}")
    return samples


def recompute_stats(root: str | Path, *, progress: bool = False) -> tuple[DatasetStats, list[str]]:
    """The statistics of the dataset at ``root`` recomputed from its shards, and a list of notes."""
    root = Path(root)
    manifest = load_manifest(root)
    shape, pixel = manifest.sample_shape, manifest.is_pixel
    partials: list[ShardPartial] = []
    sidecar_rgb = True
    for s in tqdm(manifest.shards, desc="stats pass 1", unit="shard", disable=not progress):
        samples = _read_means(root, s, ("mean.npy", "std.npy"))
        means = np.stack([npy_load(x["mean.npy"]) for x in samples])
        stds = np.stack([npy_load(x["std.npy"]) for x in samples])
        rgb_sum, rgb_n = _sidecar_rgb(root, s)
        if rgb_sum is None:
            sidecar_rgb = False
            if pixel:
                rgb_sum, rgb_n = _pixel_rgb(means), len(means)
        partials.append(shard_partial(means, stds, rgb_sum, rgb_n))
    notes = [] if sidecar_rgb else ["rgb64_power: some shard sidecars are missing; " + (
        "recomputed from the float16 pixels in the shards" if pixel else "kept from the existing stats.npz")]
    pmean, cmean = point_mean(partials, shape)
    pass2 = []
    for s in tqdm(manifest.shards, desc="stats pass 2", unit="shard", disable=not progress):
        samples = _read_means(root, s, ("mean.npy",))
        pass2.append(distance_partial(np.stack([npy_load(x["mean.npy"]) for x in samples]), pmean, cmean))
    stats = finalize_stats(partials, pass2, manifest.shards_hash, shape)
    if stats.rgb64_power is None and not pixel and (root / "stats.npz").is_file():
        old = DatasetStats.load(root)
        stats.rgb64_power, stats.rgb64_n = old.rgb64_power, old.rgb64_n
    return stats, notes
