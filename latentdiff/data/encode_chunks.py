"""Pass 1 of the encode stage: this rank's chunks of images -> shards + sidecars.

DataLoader workers decode and crop the images (:class:`ImageDataset`, never raising on bad input);
the main process encodes each batch with the VAE (float16 posterior mean and std) and collects the
samples of every chunk.  A chunk whose last image has arrived is committed by two atomic renames:
first its shard ``shard-%06d.tar`` (no shard when every image of the chunk was skipped), then its
sidecar ``shard-%06d.stats.npz`` (exact float64 partial statistics, sample count, sha256, keys,
skipped files).  A chunk is complete iff its sidecar exists.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from latentdiff.data.config import EncodeConfig
from latentdiff.data.images import DEFAULT_MAX_FILE_BYTES, ImageSkip, load_and_preprocess
from latentdiff.data.inputs import InputItem, read_item_bytes
from latentdiff.data.shards import ShardSample, shard_name, sidecar_name, write_shard
from latentdiff.data.stats import RGB_REF_SIZE, ShardPartial, rgb64_power, shard_partial
from latentdiff.utils.errors import EncodeError
from latentdiff.utils.io import atomic_write_bytes
from latentdiff.utils.safe_load import load_npz
from latentdiff.vae.autoencoder import Autoencoder

__all__ = ["ImageDataset", "encode_chunks", "read_sidecar"]


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over this rank's (global index, item) entries; never raises on bad input."""

    def __init__(self, entries, resolution: int, min_size: int, max_pixels: int, flip: bool,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.entries = entries
        self.resolution, self.min_size, self.max_pixels, self.flip = resolution, min_size, max_pixels, flip
        self.max_file_bytes = max_file_bytes

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, j):
        gi, item_t = self.entries[j]
        item = InputItem(*item_t)
        try:
            data = read_item_bytes(item, self.max_file_bytes)
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
    """The partial statistics and the record (name, count, sha256, keys, skipped files) of one chunk."""
    a = load_npz(path)  # allow_pickle=False: a pickled array is refused naming the file
    return ShardPartial.from_arrays(a), json.loads(str(a["meta_json"]))


class _Chunk:
    """The samples, skipped files and RGB spectrum sum of one chunk while its images arrive."""

    __slots__ = ("index", "expected", "seen", "samples", "skipped", "rgb_sum", "rgb_n", "images")

    def __init__(self, index: int, expected: int):
        self.index, self.expected, self.seen = index, expected, 0
        self.samples: list[ShardSample] = []
        self.skipped: list[dict] = []
        self.rgb_sum: torch.Tensor | None = None
        self.rgb_n = 0
        self.images = 0

    def commit(self, out: Path, sample_shape, listing_sha256: str) -> None:
        """Rename #1: the shard (if any sample); rename #2: the sidecar, which marks the chunk complete."""
        c, h, w = sample_shape
        name = None
        if self.samples:
            means = np.stack([s.mean for s in self.samples])
            stds = np.stack([s.std for s in self.samples])
            partial = shard_partial(means, stds, self.rgb_sum, self.rgb_n)
            name = shard_name(self.index)
            info = write_shard(out / name, self.samples)
        else:
            z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
            partial = ShardPartial(0, z(c, h, w), z(c), z(c, h, w), z(3, RGB_REF_SIZE, RGB_REF_SIZE), 0)
            info = {"count": 0, "sha256": None, "bytes": 0}
        meta = {"chunk": self.index, "name": name, "count": info["count"], "sha256": info["sha256"],
                "bytes": info["bytes"], "images": self.images, "keys": [s.key for s in self.samples],
                "skipped": self.skipped, "listing_sha256": listing_sha256}
        atomic_write_bytes(out / sidecar_name(self.index), _sidecar_bytes(partial, meta))


# ----------------------------------------------------------------------------------------------
# the encoding loop


class _BatchEncoder:
    """Images (N, 3, H, W) uint8 -> float16 posterior (mean, std) and a per-row finite flag.

    With ``flip`` the mirrored images follow the originals (rows ``N..2N-1``).  A reduced VAE
    precision is validated against fp32 on the first batch.
    """

    def __init__(self, cfg: EncodeConfig, ae: Autoencoder):
        self.ae, self.flip, self.precision = ae, cfg.flip, cfg.vae_precision
        self.validated = cfg.vae_precision == "fp32"

    def __call__(self, imgs: torch.Tensor):
        x = imgs.to(self.ae.device, non_blocking=True).to(torch.float32) / 127.5 - 1.0
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        if not self.validated:
            self.ae.validate_precision(self.precision, x)
            self.validated = True
        mean, std = self.ae.encode(x)
        mean16 = mean.to(torch.float16).cpu().numpy()
        std16 = std.to(torch.float16).cpu().numpy()
        finite = np.isfinite(mean16).reshape(len(x), -1).all(1) & np.isfinite(std16).reshape(len(x), -1).all(1)
        return mean16, std16, finite


def _add_image(ch: _Chunk, gi: int, rows: list[int], latents, spectra, plan: dict) -> None:
    """The samples of image ``gi`` (rows of the batch: the image, then its mirror) into its chunk."""
    mean16, std16, finite = latents
    it = InputItem(*plan["items"][gi])
    if not all(finite[r] for r in rows):
        ch.skipped.append({"path": it.display(), "reason": "nonfinite_latent",
                           "detail": "NaN/Inf in the VAE posterior", "index": gi})
        return
    lab, class_names = plan["labels"][gi], plan["class_names"]
    for j, r in enumerate(rows):
        flipped = j == 1
        meta = {"source": it.source, "member": it.member, "index": gi, "flipped": flipped,
                "label": lab if lab >= 0 else None,
                "class_name": class_names[lab] if (class_names and lab >= 0) else None}
        ch.samples.append(ShardSample(f"{gi:09d}" + ("-flip" if flipped else ""), mean16[r], std16[r], lab, meta))
        ch.rgb_sum = spectra[j].clone() if ch.rgb_sum is None else ch.rgb_sum.add_(spectra[j])
        ch.rgb_n += 1
    ch.images += 1


def _chunk_entries(cfg: EncodeConfig, plan: dict, chunks: list[int]):
    """The (global index, item) entries of ``chunks`` and an empty :class:`_Chunk` per chunk."""
    per, items = cfg.images_per_chunk, plan["items"]
    entries, state = [], {}
    for k in chunks:
        lo, hi = k * per, min((k + 1) * per, len(items))
        state[k] = _Chunk(k, hi - lo)
        entries.extend((gi, items[gi]) for gi in range(lo, hi))
    return entries, state


def encode_chunks(cfg: EncodeConfig, ae: Autoencoder, out: Path, plan: dict, chunks: list[int], rank: int,
                  sample_shape) -> int:
    """Encode and commit ``chunks`` (this rank's share of the pending ones); returns the images read."""
    entries, state = _chunk_entries(cfg, plan, chunks)
    if not entries:
        return 0
    ds = ImageDataset(entries, cfg.resolution, cfg.min_size, cfg.max_pixels, cfg.flip, cfg.max_file_bytes)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers, collate_fn=_collate,
        pin_memory=ae.device.type == "cuda", prefetch_factor=4 if cfg.workers > 0 else None,
        persistent_workers=False,
    )
    bar = tqdm(total=len(entries), unit="img", desc="encode", dynamic_ncols=True, smoothing=0.1,
               disable=not (rank == 0 and cfg.progress))
    encode, listing_sha256 = _BatchEncoder(cfg, ae), plan["fingerprint"]["listing_sha256"]
    for batch in loader:
        imgs = batch["imgs"]
        latents = encode(imgs) if imgs is not None else None
        n_ok = 0 if imgs is None else imgs.shape[0]
        b = 0  # position among the successfully decoded images of this batch
        for meta in batch["meta"]:
            gi = meta["index"]
            ch = state[gi // cfg.images_per_chunk]
            if meta["reason"] is not None:
                it = InputItem(*plan["items"][gi])
                ch.skipped.append({"path": it.display(), "reason": meta["reason"], "detail": meta["detail"], "index": gi})
            else:
                rows = [b] + ([b + n_ok] if cfg.flip else [])
                _add_image(ch, gi, rows, latents, batch["rgb"][b], plan)
                b += 1
            ch.seen += 1
            if ch.seen == ch.expected:
                ch.commit(out, sample_shape, listing_sha256)
                del state[ch.index]
        bar.update(len(batch["meta"]))
    bar.close()
    if state:
        raise EncodeError(f"internal: chunks {sorted(state)} did not receive all their images")
    return len(entries)
