"""The training reader: a deterministic, rank- and worker-split webdataset pipeline over the shards.

Splitting
---------
There are ``R`` ranks and ``W`` DataLoader workers per rank (``W = max(1, num_workers)``), i.e.
``R * W`` *slots*; slot ``rank * W + w`` belongs to logical worker ``w`` of ``rank``.  Each epoch the
shard list is permuted with ``Random(f"{seed}-{epoch}-shards")`` (the same on every rank; manifest
order when ``shuffle=False``) and dealt greedily to the least-loaded slot (by manifest sample counts,
ties to the lower slot): every shard is read by exactly one slot, so keys are disjoint across ranks and
workers.  ``shards >= R * W`` is required (checked with a clear message).

Equal batch counts
------------------
Each slot cuts its stream to the same number of full batches ``B = min_slot floor(samples / batch)``,
computed from the manifest (no reading), so every rank yields exactly ``W * B`` batches per epoch
(:meth:`LatentShardDataset.batches_per_epoch`) and DDP/DeepSpeed never hangs on an uneven last step.
The samples beyond the cut (at most about one shard plus one batch per slot) are dropped for that epoch.

Determinism and mid-epoch resume
--------------------------------
Within a slot, samples pass through a shuffle buffer seeded with ``f"{seed}-{epoch}-{rank}-{w}"``, so
the batch sequence depends only on (seed, epoch, rank, worker).  The DataLoader takes batches from its
workers round-robin, so rank-level batch ``i`` comes from logical worker ``i % W``.  To start at batch
``b`` (resume), every worker skips its batches before ``b`` and the physical workers are rotated
(physical ``p`` plays logical ``(p + b) % W``), which reproduces the suffix of the epoch bit for bit.

Items are batches ``(mean, std, label, key)``: float32 (B, C, h, w) raw posterior mean and std,
int64 labels (-1 = unknown), list of keys.  Draw a fresh latent per step with :func:`sample_latent` and
map it to model space with :meth:`latentdiff.vae.normalization.Normalization.to_model`.
"""
from __future__ import annotations

import io
import json
import random
import warnings
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from latentdiff.contracts.manifest import MANIFEST_NAME, DatasetManifest, load_manifest
from latentdiff.data.shards import check_sample, iter_tar, npy_load
from latentdiff.data.stats import DatasetStats
from latentdiff.utils.dist import all_gather_object, get_rank, get_world_size
from latentdiff.utils.errors import DataError
from latentdiff.utils.io import sha256_file

VERIFY_MODES = ("sample", "sha256", "size", "none")

__all__ = [
    "VERIFY_MODES",
    "LatentShardDataset",
    "make_loader",
    "sample_latent",
    "verify_dataset",
    "check_normalization",
]


def sample_latent(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh latent ``mean + std * eps``, eps ~ N(0, I) drawn from ``generator`` (on its device)."""
    dev = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=dev, dtype=mean.dtype).to(mean.device)
    return mean + std * eps


def check_normalization(stats: DatasetStats | dict, normalization, *, mean_tol: float = 0.1, std_tol: float = 0.2,
                        warn: bool = True) -> list[str]:
    """Are the normalized latents centred and at the target scale?

    With ``t = normalization.target_std`` and the per-channel model-space mean ``m_c`` and std ``s_c``
    of the *sampled* latents (from the dataset statistics), a channel is flagged when
    ``|m_c| > mean_tol * t`` or ``|s_c / t - 1| > std_tol`` (defaults 0.1 and 0.2: mean within 10% of
    the target std, std within +-20%).  Returns the problems and, with ``warn``, emits a
    ``UserWarning``.  (The ``sd`` recipe does not centre the latents, so it is often flagged on real
    data -- prefer ``channel``.)
    """
    d = stats.to_json() if hasattr(stats, "to_json") else stats
    mean, std = normalization.normalized_moments(d["mean"], d["std"])
    t = normalization.target_std
    problems = []
    for c, (m, s) in enumerate(zip(mean, std)):
        if abs(m) > mean_tol * t:
            problems.append(f"channel {c}: normalized mean {m:+.4g} (|mean| > {mean_tol} x target {t:g})")
        if abs(s / t - 1) > std_tol:
            problems.append(f"channel {c}: normalized std {s:.4g} vs target {t:g} (off by more than {std_tol:.0%})")
    if problems and warn:
        warnings.warn(
            f"normalization {normalization.kind!r} does not map this dataset to mean 0 / std {t:g}: "
            + "; ".join(problems)
            + ". Use Normalization.channel(stats) (per-channel mean/std of the training set) or check the VAE/stats",
            UserWarning,
            stacklevel=2,
        )
    return problems


def _shard_problem(root: Path, s, mode: str) -> str | None:
    """What is wrong with one shard file compared with its manifest entry (None when it agrees)."""
    p = root / s.name
    if not p.is_file():
        return f"{s.name}: missing"
    size = p.stat().st_size
    if size != s.bytes:
        return f"{s.name}: {size} bytes, manifest says {s.bytes} (truncated or replaced)"
    if mode == "sha256" and sha256_file(p) != s.sha256:
        return f"{s.name}: sha256 differs from the manifest (corrupt or replaced)"
    return None


def verify_dataset(root: str | Path, manifest: DatasetManifest | None = None, *, mode: str = "sha256",
                   rank: int | None = None, world_size: int | None = None) -> dict:
    """Check the shards against the manifest before training.

    ``mode``: ``"sha256"`` (size + checksum of every whole file), ``"size"`` (existence + byte size; also what
    ``"sample"`` checks here, the per-sample checksums being verified as samples are read) or ``"none"``.
    Rank ``r`` checks shards ``i % world == r``; under torch.distributed the failures are gathered so
    every rank raises the same :class:`DataError`, which names each bad shard.  Also checks that
    ``stats.json`` describes these shards.
    """
    root = Path(root)
    manifest = manifest or load_manifest(root)
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode must be one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world_size is None else world_size
    mine = manifest.shards[rank::world] if mode != "none" else []
    bad = [p for p in (_shard_problem(root, s, mode) for s in mine) if p is not None]
    bad = sorted({b for part in all_gather_object(bad) for b in part})
    if bad:
        raise DataError(
            f"{len(bad)} shard(s) of {root} disagree with {root / MANIFEST_NAME}: " + "; ".join(bad[:10])
            + ". Restore the files or re-encode (delete the bad shards and their .stats.npz sidecars, "
            "then re-run the same tools/encode_latents.py command)"
        ).on_every_rank()
    stats_path = root / "stats.json"
    if stats_path.is_file():
        sh = json.loads(stats_path.read_text()).get("shards_hash")
        if sh != manifest.shards_hash:
            raise DataError(
                f"{stats_path}: shards_hash {sh} does not match dataset.json ({manifest.shards_hash}); "
                f"recompute the statistics with tools/dataset_stats.py {root} --write"
            ).on_every_rank()
    return {"checked": len(mine), "mode": mode}


def _read_shards(src, counts: dict[str, int]):
    """Expand shard urls to samples; a short/corrupt shard raises a DataError naming it."""
    for d in src:
        url = d["url"]
        name = Path(url).name
        try:
            f = open(url, "rb")
        except OSError as exn:
            raise DataError(f"shard {url} cannot be opened ({exn}); restore it or re-encode") from exn
        n = 0
        with f:
            for smp in iter_tar(io.BufferedReader(f, 1 << 20), url):
                smp["__url__"] = url
                n += 1
                yield smp
        if n != counts[name]:
            raise DataError(f"shard {url} has {n} samples but dataset.json says {counts[name]}: truncated or replaced; re-encode it")


def _decode(smp, check: bool = False):
    url = smp.get("__url__", "?")
    if check:
        check_sample(smp, url)
    try:
        mean = npy_load(smp["mean.npy"])
        std = npy_load(smp["std.npy"])
        label = int(smp["cls"].decode()) if "cls" in smp else -1
    except KeyError as exn:
        raise DataError(f"shard {url}: sample {smp.get('__key__')!r} lacks member {exn}; re-encode the shard") from exn
    except Exception as exn:  # noqa: BLE001
        raise DataError(f"shard {url}: sample {smp.get('__key__')!r} cannot be decoded ({type(exn).__name__}: {exn}); "
                        "the shard is corrupt: restore it or re-encode it") from exn
    return mean, std, label, smp["__key__"]


def _decode_checked(smp):
    return _decode(smp, check=True)


def _collate(samples):
    mean = torch.from_numpy(np.stack([s[0] for s in samples])).to(torch.float32)
    std = torch.from_numpy(np.stack([s[1] for s in samples])).to(torch.float32)
    label = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    return mean, std, label, [s[3] for s in samples]


class LatentShardDataset(torch.utils.data.IterableDataset):
    """Batches ``(mean, std, label, key)`` of one rank; see the module docstring for the guarantees.

    ``rank``/``world_size`` default to torch.distributed (or RANK/WORLD_SIZE); ``num_workers`` must
    equal the DataLoader's.  ``verify`` checks the shards against the manifest at construction
    (``"sha256"``, ``"size"`` or ``"none"``); ``"sample"`` checks sizes at construction and every
    sample's checksum as it is read (a dataset encoded before per-sample checksums falls back to
    ``"size"``, with a line in :attr:`notes`); ``normalization`` (optional) is checked against the
    dataset statistics (:func:`check_normalization`).
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        verify: str = "sha256",
        normalization=None,
        mean_tol: float = 0.1,
        std_tol: float = 0.2,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self.rank = get_rank() if rank is None else int(rank)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed, self.shuffle, self.shuffle_buffer = int(seed), bool(shuffle), int(shuffle_buffer)
        self.shards = [s.name for s in self.manifest.shards]
        self.counts = {s.name: s.count for s in self.manifest.shards}
        slots = self.world_size * self.workers_per_rank
        if len(self.shards) < slots:
            raise DataError(
                f"{self.root} has {len(self.shards)} shards but {self.world_size} ranks x {self.workers_per_rank} "
                f"workers = {slots} readers need at least one shard each; use fewer DataLoader workers or re-encode "
                f"with a smaller --shard-size (e.g. {max(1, self.manifest.num_samples // (2 * slots))})"
            )
        self.notes: list[str] = []
        self.check_samples = verify == "sample" and self.manifest.sample_checksums is not None
        if verify == "sample" and not self.check_samples:
            self.notes.append(f"{self.root} has no per-sample checksums (encoded by an older latentdiff): shards are "
                              "checked by size only; --verify-shards sha256 checks whole files at start, or re-encode")
        if verify != "none":
            verify_dataset(self.root, self.manifest, mode="size" if verify == "sample" else verify, rank=self.rank,
                           world_size=self.world_size)
        self.stats = DatasetStats.load(self.root) if (self.root / "stats.json").is_file() else None
        self.normalization = normalization
        self.problems = []
        if normalization is not None:
            if self.stats is None:
                raise DataError(f"{self.root / 'stats.json'} is missing; it is needed to check the normalization")
            self.problems = check_normalization(self.stats, normalization, mean_tol=mean_tol, std_tol=std_tol)
        self.set_epoch(epoch, start_batch)

    # layout ------------------------------------------------------------------------------------
    @property
    def workers_per_rank(self) -> int:
        return max(1, self.num_workers)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and the rank-level batch to start at (0 = the beginning)."""
        n = self.batches_per_epoch(epoch)
        if not 0 <= start_batch <= n:
            raise ValueError(f"start_batch {start_batch} is outside [0, {n}] for epoch {epoch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def assignment(self, epoch: int) -> list[list[str]]:
        """Shard names of every slot (rank * W + logical worker) for ``epoch``."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}-{epoch}-shards").shuffle(order)
        slots = self.world_size * self.workers_per_rank
        loads = [0] * slots
        out: list[list[str]] = [[] for _ in range(slots)]
        for name in order:
            j = min(range(slots), key=lambda i: (loads[i], i))
            out[j].append(name)
            loads[j] += self.counts[name]
        return out

    def batches_per_worker(self, epoch: int | None = None) -> int:
        epoch = self.epoch if epoch is None else epoch
        loads = [sum(self.counts[n] for n in slot) for slot in self.assignment(epoch)]
        b = min(loads) // self.batch_size
        if b == 0:
            raise DataError(
                f"batch size {self.batch_size} is larger than the samples of the smallest reader slot ({min(loads)}) "
                f"of {self.root}; use a smaller batch size or fewer workers/ranks"
            )
        return b

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank (every rank) yields in ``epoch``, counted from the start of the epoch."""
        return self.batches_per_worker(epoch) * self.workers_per_rank

    def __len__(self) -> int:
        return self.batches_per_epoch(self.epoch) - self.start_batch

    # iteration ---------------------------------------------------------------------------------
    def _logical_worker(self) -> int:
        info = torch.utils.data.get_worker_info()
        if info is None:
            if self.num_workers > 0:
                raise DataError(
                    f"LatentShardDataset was built for num_workers={self.num_workers} but is iterated in the main "
                    "process; pass the same num_workers to the DataLoader (or use make_loader)"
                )
            return 0
        if info.num_workers != self.workers_per_rank:
            raise DataError(
                f"LatentShardDataset was built for num_workers={self.num_workers} but the DataLoader has "
                f"{info.num_workers}; pass the same value to both (or use make_loader)"
            )
        return (info.id + self.start_batch) % self.workers_per_rank

    def pipeline(self, worker: int) -> Iterator:
        W = self.workers_per_rank
        slot = self.rank * W + worker
        names = self.assignment(self.epoch)[slot]
        per_worker = self.batches_per_worker(self.epoch)
        # rank-level batch i comes from logical worker i % W; skip the ones before start_batch
        skip = (self.start_batch - worker + W - 1) // W if self.start_batch > worker else 0
        urls = [{"url": str(self.root / n)} for n in names]
        stages = [lambda: iter(urls), wds.filters.pipelinefilter(_read_shards)(self.counts)]
        if self.shuffle:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        stages += [wds.map(_decode_checked if self.check_samples else _decode), wds.batched(self.batch_size, collation_fn=_collate, partial=False)]
        return islice(iter(wds.DataPipeline(*stages)), skip, per_worker)

    def __iter__(self):
        return self.pipeline(self._logical_worker())


def make_loader(
    root: str | Path,
    batch_size: int,
    *,
    num_workers: int = 2,
    pin_memory: bool = False,
    prefetch_factor: int | None = 2,
    **kw,
) -> tuple[torch.utils.data.DataLoader, LatentShardDataset]:
    """A DataLoader over :class:`LatentShardDataset` (batching happens in the dataset).

    Workers are not persistent: call ``dataset.set_epoch(epoch, start_batch)`` and iterate the loader
    again for each epoch.  ``len(loader)`` is the number of batches left in the current epoch.
    """
    ds = LatentShardDataset(root, batch_size, num_workers=num_workers, **kw)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None, persistent_workers=False,
    )
    return loader, ds
