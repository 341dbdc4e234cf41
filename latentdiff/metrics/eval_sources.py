"""What ``latentdiff-eval --ref`` accepts: an encoded dataset, an image folder / ``samples.npz``, or saved
statistics; and the encoded dataset as images.

An encoded dataset (a directory with ``dataset.json``) is turned back into images through the VAE its
manifest names: the stored posterior mean of every image (raw VAE space; the mirrored ``-flip`` copies
are left out, they are not further images), an fp32 decode outside autocast
(:func:`latentdiff.vae.decode.decode_to_uint8` with the identity normalization) and
``round((x + 1) * 127.5)``.  These are the images the model can at best reproduce (the VAE's
reconstructions), the right reference for a latent model's samples.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from latentdiff.contracts.manifest import MANIFEST_NAME, load_manifest
from latentdiff.data.shards import npy_load, read_shard_verified
from latentdiff.metrics.eval_stats import is_statistics_file, load_statistics
from latentdiff.metrics.image_sources import ImageSource, open_samples
from latentdiff.utils.errors import FIDError
from latentdiff.utils.seeds import format_seeds
from latentdiff.vae.decode import decode_to_uint8, load_vae_for
from latentdiff.vae.normalization import Normalization

__all__ = ["EncodedDatasetImages", "open_reference", "samples_source"]


class EncodedDatasetImages(ImageSource):
    """The images of an encoded dataset, decoded through its VAE on demand (module docstring); ``limit``:
    only the first images by key."""

    def __init__(self, root: str | Path, *, device="cpu", vae_path=None, decode_batch: int = 16, autoencoder=None,
                 limit: int | None = None):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self.description = str(self.root)
        keys, means = [], []
        for s in self.manifest.shards:  # shards hold consecutive image indices: stop once ``limit`` are read
            if limit is not None and len(keys) >= limit:
                break
            samples, _, _ = read_shard_verified(self.root / s.name, s.name, keep=("mean.npy",))
            for smp in samples:
                if smp["__key__"].endswith("-flip"):
                    continue
                keys.append(smp["__key__"])
                means.append(npy_load(smp["mean.npy"]))
        if not means:
            raise FIDError(f"{self.root}: the encoded dataset holds no image")
        order = np.argsort(keys, kind="stable")[:limit]
        self.keys = [keys[i] for i in order]
        self.means = np.stack([means[i] for i in order])  # float16, raw VAE space
        # ``autoencoder``: one already loaded for this dataset's VAE (the trainer's, loaded once per run)
        self.autoencoder = autoencoder if autoencoder is not None else load_vae_for(self.manifest.vae, device, path=vae_path)
        self.normalization = Normalization.identity(self.means.shape[1])
        self.decode_batch = int(decode_batch)
        res = int(self.manifest.resolution)
        self._res = (res, res)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def resolution(self) -> tuple[int, int]:
        return self._res

    def name(self, i: int) -> str:
        return f"{self.root}:{self.keys[i]}"

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        z = torch.from_numpy(self.means[np.asarray(indices, dtype=np.int64)].astype(np.float32))
        return decode_to_uint8(z, self.normalization, autoencoder=self.autoencoder, device=self.autoencoder.device,
                               batch_size=self.decode_batch)

    @property
    def provenance(self) -> dict:
        m = self.manifest
        return {"type": "encoded dataset", "path": str(self.root.resolve()), "vae": m.vae, "shards_hash": m.shards_hash,
                "images": len(self), "resolution": m.resolution,
                "decode": "posterior mean, fp32 VAE decode outside autocast, round((x + 1) * 127.5); -flip copies "
                          "left out"}


def open_reference(path, *, device="cpu", vae_path=None, input_format: str = "auto"):
    """An ImageSource (with ``provenance``) or :class:`SetStatistics` for ``--ref PATH``."""
    path = Path(path)
    if not path.exists():
        raise FIDError(f"--ref {path} does not exist: give an encoded dataset directory, an image folder or "
                       "samples.npz, or statistics saved with latentdiff-eval --save-ref")
    if is_statistics_file(path):
        return load_statistics(path)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return EncodedDatasetImages(path, device=device, vae_path=vae_path)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "mu" in data.files and "arr_0" not in data.files:
                raise FIDError(f"--ref {path} holds FID statistics (mu, sigma) only; latentdiff-eval needs images, an "
                               "encoded dataset or its own --save-ref statistics (use latentdiff-fid for FID-only files)")
    src, _, _ = open_samples(path, input_format)
    src.provenance = {"type": "images", "source": str(path.resolve()), "images": len(src),
                      "resolution": list(src.resolution), "reader": type(src).__name__}
    return src


def samples_source(path, input_format: str = "auto") -> tuple[ImageSource, dict]:
    """The samples and what ``metrics.json`` records about them (seeds, the sampler's settings)."""
    src, record, record_path = open_samples(path, input_format)
    info = {"seeds": None if src.seeds is None else format_seeds([int(s) for s in src.seeds]),
            "sampling_json": None if record_path is None else str(record_path),
            "sampling": None if record is None else record.to_dict()}
    return src, info
