"""The latent encoding stage: images -> webdataset shards + manifest + statistics.

Layout and determinism
----------------------
The inputs are listed in one deterministic global order (:func:`~latentdiff.data.inputs.list_inputs`)
and cut into fixed *chunks* of ``images_per_chunk = shard_size // (2 if flip else 1)`` images;
chunk ``k`` becomes ``shard-%06d.tar`` number ``k`` (or no tar when every image of the chunk was
skipped: no empty shards).  Sample keys are the global image index (``%09d``, ``-flip`` for the
mirrored copy), so the output depends only on the inputs and the options, never on the world size.

Every chunk is committed by two atomic renames: first the shard, then its sidecar
``shard-%06d.stats.npz`` (exact float64 partial statistics, sample count, sha256, keys, skipped files).
**A chunk is complete iff its sidecar exists.**  After a kill, a re-run of the same command deletes
temporary files, skips complete chunks and deals the remaining ones round-robin over the ranks of the
new run (any world size): every good image ends up encoded exactly once.

Multi-rank
----------
Rank 0 lists the inputs, checks/creates ``encode.json`` and broadcasts the plan; each rank encodes its
chunks (DataLoader workers decode images while the VAE runs); then all ranks run the statistics pass 2
over the written shards (verifying each shard's sha256) and rank 0 writes ``stats.json``/``stats.npz``,
``skipped.jsonl`` and finally ``dataset.json``.  Partial sums are combined in shard order, so the
statistics do not depend on the number of ranks.
"""
from __future__ import annotations

import datetime
import io
import json
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from latentdiff import __version__
from latentdiff.utils.io import atomic_write_bytes, atomic_write_json
from latentdiff.vae.autoencoder import DEFAULT_VAE, PIXEL_RANGE, PRECISIONS, Autoencoder
from latentdiff.utils.dist import barrier, device, get_rank, get_world_size, init_distributed
from latentdiff.utils.errors import DataError, EncodeError
from latentdiff.data.images import DEFAULT_MAX_PIXELS, ImageSkip, load_and_preprocess
from latentdiff.data.inputs import InputItem, list_inputs, read_item_bytes
from latentdiff.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, check_or_write_fingerprint
from latentdiff.data.shards import (
    ShardSample,
    npy_load,
    read_shard_verified,
    shard_name,
    sidecar_name,
    write_shard,
)
from latentdiff.data.stats import (
    RGB_REF_SIZE,
    ShardPartial,
    distance_partial,
    finalize_stats,
    point_mean,
    rgb64_power,
    shard_partial,
    shards_hash,
)

__all__ = ["EncodeConfig", "encode_dataset", "read_sidecar", "format_summary"]


@dataclass
class EncodeConfig:
    """Options of ``tools/encode_latents.py`` (validated before any process group starts)."""

    inputs: list[str]
    output: str
    resolution: int
    vae: str = DEFAULT_VAE
    vae_revision: str | None = None
    vae_precision: str = "fp32"
    flip: bool = False
    shard_size: int = 1000
    batch_size: int = 32
    workers: int = 4
    min_size: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True
    command: list[str] | None = field(default=None)

    def validate(self) -> "EncodeConfig":
        if not self.inputs:
            raise EncodeError("no --input given: pass at least one image folder, .tar of images or list file")
        for raw in self.inputs:
            if not Path(raw).expanduser().exists():
                raise EncodeError(f"--input {raw!r} does not exist; pass an image folder, a .tar of images or a list file")
        if not self.output:
            raise EncodeError("--output is required: the directory that receives the shards")
        checks = [
            ("--resolution", self.resolution, 8, "the square output size in pixels, e.g. 256"),
            ("--shard-size", self.shard_size, 2 if self.flip else 1, "samples per shard, e.g. 1000"),
            ("--batch-size", self.batch_size, 1, "images per VAE batch, e.g. 32"),
            ("--workers", self.workers, 0, "DataLoader decode processes, e.g. 4 (0 = decode in the main process)"),
            ("--max-pixels", self.max_pixels, 1, "the decompression-bomb limit in pixels"),
        ]
        for name, value, lo, what in checks:
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise EncodeError(f"{name} must be an integer >= {lo} ({what}), got {value!r}")
        if self.min_size is None:
            self.min_size = max(1, self.resolution // 2)
        if not isinstance(self.min_size, int) or self.min_size < 1:
            raise EncodeError(f"--min-size must be an integer >= 1 (default: half the resolution), got {self.min_size!r}")
        if self.vae_precision not in PRECISIONS:
            raise EncodeError(f"--vae-precision {self.vae_precision!r}: choose one of {', '.join(PRECISIONS)}")
        return self

    @property
    def images_per_chunk(self) -> int:
        return self.shard_size // (2 if self.flip else 1)


# ----------------------------------------------------------------------------------------------
# DataLoader side (runs in the workers)


class _ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over this rank's (global index, item) entries; never raises on bad input."""

    def __init__(self, entries, resolution: int, min_size: int, max_pixels: int, flip: bool):
        self.entries = entries
        self.resolution, self.min_size, self.max_pixels, self.flip = resolution, min_size, max_pixels, flip

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, j):
        gi, item_t = self.entries[j]
        item = InputItem(*item_t)
        try:
            data = read_item_bytes(item)
            img = load_and_preprocess(data, self.resolution, min_size=self.min_size, max_pixels=self.max_pixels)
            rgb = rgb64_power(img)[None]
            if self.flip:
                rgb = torch.cat([rgb, rgb64_power(img[:, ::-1])[None]])
            # HWC; the collate stacks to (N, H, W, C) and returns an NCHW view of it (channels_last)
            return {"index": gi, "img": torch.from_numpy(img), "rgb": rgb, "reason": None, "detail": None}
        except ImageSkip as s:
            return {"index": gi, "img": None, "rgb": None, "reason": s.reason, "detail": s.detail}
        except Exception as exn:  # noqa: BLE001 - bad input never stops a run
            return {"index": gi, "img": None, "rgb": None, "reason": "error", "detail": f"{type(exn).__name__}: {exn}"[:300]}


def _collate(batch):
    ok = [b for b in batch if b["img"] is not None]
    # (N, H, W, C) stacked, seen as NCHW: channels_last memory, which the VAE's convolutions encode
    # faster on CPU than contiguous NCHW (tools/bench/encode_throughput.py measures both layouts)
    imgs = torch.stack([b["img"] for b in ok]).permute(0, 3, 1, 2) if ok else None
    # one tensor per field and batch: each tensor crosses the worker boundary through its own shm segment
    return {"meta": [{k: b[k] for k in ("index", "reason", "detail")} for b in batch],
            "imgs": imgs, "rgb": torch.stack([b["rgb"] for b in ok]) if ok else None}


# ----------------------------------------------------------------------------------------------
# sidecars


def _sidecar_bytes(partial: ShardPartial, meta: dict) -> bytes:
    buf = io.BytesIO()
    arrays = partial.arrays()
    arrays["meta_json"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_sidecar(path: str | Path) -> tuple[ShardPartial, dict]:
    with np.load(path, allow_pickle=False) as z:
        a = {k: np.array(z[k]) for k in z.files}
    return ShardPartial.from_arrays(a), json.loads(str(a["meta_json"]))


class _Chunk:
    __slots__ = ("index", "expected", "seen", "samples", "skipped", "rgb_sum", "rgb_n", "images")

    def __init__(self, index: int, expected: int):
        self.index, self.expected, self.seen = index, expected, 0
        self.samples: list[ShardSample] = []
        self.skipped: list[dict] = []
        self.rgb_sum: torch.Tensor | None = None
        self.rgb_n = 0
        self.images = 0


# ----------------------------------------------------------------------------------------------


def _fingerprint(cfg: EncodeConfig, vae_desc: dict, listing) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "inputs": listing.inputs,
        "listing_sha256": listing.sha256(),
        "num_listed": len(listing.items),
        "resolution": cfg.resolution,
        "vae": vae_desc,
        "vae_precision": cfg.vae_precision,
        "flip": cfg.flip,
        "min_size": cfg.min_size,
        "max_pixels": cfg.max_pixels,
        "shard_size": cfg.shard_size,
    }


def _plan(cfg: EncodeConfig, ae: Autoencoder, out: Path) -> dict:
    """Rank 0: listing, output-dir check, cleanup of temporaries, list of pending chunks."""
    listing = list_inputs(cfg.inputs)
    vae_desc = ae.description()
    fp = _fingerprint(cfg, vae_desc, listing)
    check_or_write_fingerprint(out, fp)
    for p in out.iterdir():  # partial files of a killed run
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink()
    per = cfg.images_per_chunk
    n_chunks = (len(listing.items) + per - 1) // per
    done = []
    for k in range(n_chunks):
        sc = out / sidecar_name(k)
        if not sc.is_file():
            continue
        try:
            _, meta = read_sidecar(sc)
            ok = meta["chunk"] == k and (meta["count"] == 0 or (out / meta["name"]).is_file())
        except Exception:  # noqa: BLE001 - an unreadable sidecar means the chunk is redone
            ok = False
        if ok:
            done.append(k)
        else:
            sc.unlink()
    done_set = set(done)
    return {
        "items": [it.to_tuple() for it in listing.items],
        "labels": listing.labels,
        "class_names": listing.class_names,
        "num_classes": listing.num_classes,
        "problems": listing.problems,
        "fingerprint": fp,
        "n_chunks": n_chunks,
        "pending": [k for k in range(n_chunks) if k not in done_set],
        "resumed_chunks": len(done),
    }


def _broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def encode_dataset(cfg: EncodeConfig) -> dict:
    """Run the whole stage on every rank (call after :meth:`EncodeConfig.validate`); returns the summary."""
    cfg.validate()
    out = Path(cfg.output).expanduser().resolve()
    dev = device()
    ae = Autoencoder.load(cfg.vae, revision=cfg.vae_revision, device=dev)
    sample_shape = ae.latent_shape(cfg.resolution)  # fails fast when not divisible
    init_distributed()
    rank, world = get_rank(), get_world_size()
    t0 = time.time()

    plan, err = None, None
    if rank == 0:
        try:
            plan = _plan(cfg, ae, out)
        except EncodeError as exn:
            err = str(exn)
        except Exception as exn:  # noqa: BLE001 - every rank must learn about it, or the others hang
            err = f"preparing {out} failed: {type(exn).__name__}: {exn}"
    plan, err = _broadcast((plan, err), rank, world)
    if err is not None:
        raise EncodeError(err)

    mine = plan["pending"][rank::world]
    t1 = time.time()
    encoded_here = _encode_chunks(cfg, ae, out, plan, mine, rank, sample_shape)
    t2 = time.time()
    barrier()
    summary = _finalize(cfg, out, plan, sample_shape, rank, world, ae)
    summary["encoded_this_run"] = encoded_here
    summary["encode_seconds"] = t2 - t1  # this rank: DataLoader + VAE + shard writing
    summary["finalize_seconds"] = time.time() - t2  # statistics pass 2 + manifest
    summary["seconds"] = time.time() - t0
    barrier()
    return summary


def _encode_chunks(cfg, ae: Autoencoder, out: Path, plan: dict, chunks: list[int], rank: int, sample_shape) -> int:
    per = cfg.images_per_chunk
    items, labels = plan["items"], plan["labels"]
    class_names = plan["class_names"]
    entries = []
    state: dict[int, _Chunk] = {}
    for k in chunks:
        lo, hi = k * per, min((k + 1) * per, len(items))
        state[k] = _Chunk(k, hi - lo)
        entries.extend((gi, items[gi]) for gi in range(lo, hi))
    if not entries:
        return 0
    ds = _ImageDataset(entries, cfg.resolution, cfg.min_size, cfg.max_pixels, cfg.flip)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers, collate_fn=_collate,
        pin_memory=ae.device.type == "cuda", prefetch_factor=4 if cfg.workers > 0 else None,
        persistent_workers=False,
    )
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(entries), unit="img", desc="encode", dynamic_ncols=True, smoothing=0.1)
    validated = cfg.vae_precision == "fp32"
    n_done = 0
    fp_desc = plan["fingerprint"]["listing_sha256"]
    for batch in loader:
        imgs = batch["imgs"]
        mean16 = std16 = None
        finite = None
        if imgs is not None:
            x = imgs.to(ae.device, non_blocking=True).to(torch.float32) / 127.5 - 1.0
            if cfg.flip:
                x = torch.cat([x, x.flip(-1)])
            if not validated:
                ae.validate_precision(cfg.vae_precision, x)
                validated = True
            mean, std = ae.encode(x)
            mean16 = mean.to(torch.float16).cpu().numpy()
            std16 = std.to(torch.float16).cpu().numpy()
            finite = np.isfinite(mean16).reshape(len(x), -1).all(1) & np.isfinite(std16).reshape(len(x), -1).all(1)
        b = 0  # position among the successfully decoded images of this batch
        n_ok = 0 if imgs is None else imgs.shape[0]
        for meta in batch["meta"]:
            gi = meta["index"]
            k = gi // per
            ch = state[k]
            it = InputItem(*items[gi])
            if meta["reason"] is not None:
                ch.skipped.append({"path": it.display(), "reason": meta["reason"], "detail": meta["detail"], "index": gi})
            else:
                rows = [b] + ([b + n_ok] if cfg.flip else [])
                if not all(finite[r] for r in rows):
                    ch.skipped.append({"path": it.display(), "reason": "nonfinite_latent",
                                       "detail": "NaN/Inf in the VAE posterior", "index": gi})
                else:
                    spectra = batch["rgb"][b]
                    for j, r in enumerate(rows):
                        flipped = j == 1
                        key = f"{gi:09d}" + ("-flip" if flipped else "")
                        lab = labels[gi]
                        smeta = {"source": it.source, "member": it.member, "index": gi, "flipped": flipped,
                                 "label": lab if lab >= 0 else None,
                                 "class_name": class_names[lab] if (class_names and lab >= 0) else None}
                        ch.samples.append(ShardSample(key, mean16[r], std16[r], lab, smeta))
                        ch.rgb_sum = spectra[j].clone() if ch.rgb_sum is None else ch.rgb_sum.add_(spectra[j])
                        ch.rgb_n += 1
                    ch.images += 1
                b += 1
            ch.seen += 1
            if ch.seen == ch.expected:
                _commit_chunk(out, ch, sample_shape, fp_desc)
                del state[k]
        n_done += len(batch["meta"])
        if bar is not None:
            bar.update(len(batch["meta"]))
    if bar is not None:
        bar.close()
    if state:
        raise EncodeError(f"internal: chunks {sorted(state)} did not receive all their images")
    return n_done


def _commit_chunk(out: Path, ch: _Chunk, sample_shape, fp_desc: str) -> None:
    c, h, w = sample_shape
    if ch.samples:
        means = np.stack([s.mean for s in ch.samples])
        stds = np.stack([s.std for s in ch.samples])
        partial = shard_partial(means, stds, ch.rgb_sum, ch.rgb_n)
        info = write_shard(out / shard_name(ch.index), ch.samples)  # rename #1: the shard
        name = shard_name(ch.index)
    else:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        partial = ShardPartial(0, z(c, h, w), z(c), z(c, h, w), z(3, RGB_REF_SIZE, RGB_REF_SIZE), 0)
        info = {"count": 0, "sha256": None, "bytes": 0}
        name = None
    meta = {
        "chunk": ch.index, "name": name, "count": info["count"], "sha256": info["sha256"], "bytes": info["bytes"],
        "images": ch.images, "keys": [s.key for s in ch.samples], "skipped": ch.skipped, "listing_sha256": fp_desc,
    }
    atomic_write_bytes(out / sidecar_name(ch.index), _sidecar_bytes(partial, meta))  # rename #2: the record


def _finalize(cfg, out: Path, plan: dict, sample_shape, rank: int, world: int, ae: Autoencoder) -> dict:
    c, h, w = sample_shape
    info = None
    err = None
    if rank == 0:
        missing = [k for k in range(plan["n_chunks"]) if not (out / sidecar_name(k)).is_file()]
        if missing:
            err = (f"chunks {missing[:5]} were not completed ({out / sidecar_name(missing[0])} missing): "
                   "a rank failed; re-run the same command to resume")
        else:
            partials, metas = zip(*(read_sidecar(out / sidecar_name(k)) for k in range(plan["n_chunks"]))) if plan["n_chunks"] else ((), ())
            _write_skipped(out, plan, list(metas))
            shards = [{"name": m["name"], "count": m["count"], "sha256": m["sha256"], "bytes": m["bytes"]}
                      for m in metas if m["count"] > 0]
            if not shards:
                err = (f"every input was skipped, no shard was written (see {out / 'skipped.jsonl'}): "
                       "check --min-size and the input files")
            else:
                pmean, cmean = point_mean(list(partials), sample_shape)
                info = {"shards": shards, "pmean": pmean, "cmean": cmean}
    info, err = _broadcast((info, err), rank, world)
    if err is not None:
        raise EncodeError(err)
    shards = info["shards"]
    k_len = c + c * c + c + 1
    buf = torch.zeros(len(shards), k_len, dtype=torch.float64)
    bad = []
    for i in range(rank, len(shards), world):
        s = shards[i]
        try:
            samples, digest, _ = read_shard_verified(out / s["name"], keep=("mean.npy",))
        except DataError as exn:
            bad.append(str(exn))
            continue
        if digest != s["sha256"]:
            bad.append(f"{s['name']} (sha256 differs from its sidecar)")
            continue
        means = [npy_load(smp["mean.npy"]) for smp in samples]
        if len(means) != s["count"]:
            bad.append(f"{s['name']} ({len(means)} samples, sidecar says {s['count']})")
            continue
        buf[i] = distance_partial(np.stack(means), info["pmean"], info["cmean"])
    flag = torch.tensor([float(len(bad))], dtype=torch.float64)
    if world > 1:
        tdist.all_reduce(buf)
        tdist.all_reduce(flag)
        gathered = [None] * world
        tdist.all_gather_object(gathered, bad)
        bad = [b for g in gathered for b in g]
    if flag.item() > 0:
        raise EncodeError(
            f"shards changed on disk after they were written: {', '.join(bad[:5])}; delete them and their "
            ".stats.npz sidecars and re-run the same command"
        )
    summary = None
    if rank == 0:
        partials, metas = [], []
        for k in range(plan["n_chunks"]):
            p, m = read_sidecar(out / sidecar_name(k))
            partials.append(p)
            metas.append(m)
        sh = shards_hash(shards)
        stats = finalize_stats(partials, list(buf), sh, sample_shape)
        stats.save(out)
        skipped = _skipped_records(plan, metas)  # skipped.jsonl was written above
        reasons = Counter(s["reason"] for s in skipped)
        num_images = sum(m["images"] for m in metas)
        n = sum(s["count"] for s in shards)
        labels = plan["labels"]
        num_labelled = sum(
            (2 if cfg.flip else 1) for m in metas for key in m["keys"] if not key.endswith("-flip") and labels[int(key)] >= 0
        )
        vae_desc = ae.description()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(cfg.command or sys.argv),
            "latentdiff_version": __version__,
            "vae": "none" if ae.is_pixel else vae_desc,
            "vae_precision": cfg.vae_precision,
            "pixel_range": list(PIXEL_RANGE),
            "resolution": cfg.resolution,
            "sample_shape": [c, h, w],
            "stored": {
                "mean": "mean.npy", "std": "std.npy", "dtype": "float16", "label": "cls", "meta": "json",
                "content": ("pixels in [-1, 1] (mean.npy); std.npy = 0" if ae.is_pixel
                            else "VAE posterior mean and std, raw VAE space (no scaling/shift applied)"),
                "key": "%09d global image index; '-flip' suffix for the mirrored copy",
            },
            "preprocessing": {
                "crop": "adm_center_crop (BOX halving, BICUBIC resize of the short side, center square)",
                "min_size": cfg.min_size, "max_pixels": cfg.max_pixels, "flip": cfg.flip,
                "rgb": "alpha composited on white; 16-bit scaled by 1/257",
            },
            "num_samples": n,
            "num_images": num_images,
            "num_labelled": num_labelled,
            "num_classes": plan["num_classes"],
            "class_names": plan["class_names"],
            "shard_size": cfg.shard_size,
            "images_per_chunk": cfg.images_per_chunk,
            "num_chunks": plan["n_chunks"],
            "shards": shards,
            "shards_hash": sh,
            "stats": {"json": "stats.json", "npz": "stats.npz"},
            "skipped": {"total": len(skipped), "by_reason": dict(sorted(reasons.items())), "file": "skipped.jsonl"},
            "inputs": plan["fingerprint"]["inputs"],
            "listing_sha256": plan["fingerprint"]["listing_sha256"],
            "num_listed": len(plan["items"]),
            "fingerprint": plan["fingerprint"],
        }
        atomic_write_json(out / MANIFEST_NAME, manifest)
        summary = {
            "output": str(out), "num_images": num_images, "num_samples": n, "num_shards": len(shards),
            "skipped": len(skipped), "skipped_by_reason": dict(sorted(reasons.items())),
            "resumed_chunks": plan["resumed_chunks"], "num_chunks": plan["n_chunks"],
        }
    return _broadcast(summary, rank, world)


def _skipped_records(plan: dict, metas: list[dict]) -> list[dict]:
    """Container problems of the listing, then every chunk's skipped files in chunk order (no duplicates)."""
    skipped = [dict(p) for p in plan["problems"]]
    for m in metas:
        skipped.extend(m["skipped"])
    return skipped


def _write_skipped(out: Path, plan: dict, metas: list[dict]) -> list[dict]:
    skipped = _skipped_records(plan, metas)
    lines = "".join(json.dumps(s, sort_keys=True) + "\n" for s in skipped)
    atomic_write_bytes(out / "skipped.jsonl", lines.encode())
    return skipped


def format_summary(summary: dict) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in summary["skipped_by_reason"].items()) or "none"
    resumed = f" ({summary['resumed_chunks']} of {summary['num_chunks']} chunks done by an earlier run)" if summary.get("resumed_chunks") else ""
    return (
        f"encoded {summary['num_images']} images -> {summary['num_samples']} samples in {summary['num_shards']} shards"
        f"{resumed}; skipped {summary['skipped']} (by reason: {reasons}) -> {summary['output']}"
    )
