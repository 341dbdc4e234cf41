#!/usr/bin/env python
"""Build FID reference statistics (``mu``, ``sigma``) from real images, with provenance.

The images go through the **same preprocessing as the training data** - the encoder's decoding, RGB
conversion and ADM center crop to ``--resolution`` (``latentdiff.data.images.load_and_preprocess``) -
and then, as uint8, through the same torch-fidelity Inception network and TF-compatible resize that
``latentdiff-fid`` applies to generated samples (which are already at the model resolution).

Inputs (any mix, visited in command-line order, as ``tools/encode_latents.py`` lists them): image
folders (recursive), uncompressed ``.tar`` shards of images, list files, single images, and ADM-style
``.npz`` files (``arr_0``: uint8 NHWC; each image is center-cropped/resized the same way, which is the
identity for images already at the resolution).

Usage::

    torchrun --nproc_per_node 8 tools/fid_reference.py /data/imagenet/train --resolution 256 \\
        --out refs/imagenet256.npz [--inception-weights PATH] [--max-images N]

writes ``refs/imagenet256.npz`` (float64 ``mu`` (2048,), ``sigma`` (2048, 2048); EDM/ADM compatible)
and ``refs/imagenet256.provenance.json`` (sources, count, resolution, preprocessing, feature
extractor with the weights' sha256, skipped files, command).  Undecodable images are skipped and
counted, like the encoder does.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from latentdiff.metrics import fid as F
from latentdiff.metrics import frechet, image_sources, inception, reference
from latentdiff.utils import dist as ldist
from latentdiff.utils.errors import FIDError, LatentdiffError

PREPROCESSING = {
    "adm": (
        "latentdiff.data.images.load_and_preprocess: decode, RGB (alpha composited on white), ADM center crop "
        "(2x BOX downsampling while the short side >= 2R, BICUBIC resize of the short side to R, center square) "
        "-> uint8 RGB R x R"
    ),
    "none": "decode, RGB; images must already be R x R (no resize, no crop) -> uint8 RGB",
}
MAX_SKIPS_LISTED = 100


class ReferenceImages(image_sources.ImageSource):
    """Listed inputs (files / tar members / npz rows) -> preprocessed uint8 images at ``resolution``."""

    def __init__(self, entries: list, resolution: int, preprocess: str, min_size: int, description: str):
        self.entries = entries  # ("item", InputItem) or ("npz", path, array, row)
        self.res = int(resolution)
        self.preprocess = preprocess
        self.min_size = int(min_size)
        self.description = description
        self.skipped: list[dict] = []
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def resolution(self) -> tuple[int, int]:
        return self.res, self.res

    def name(self, i: int) -> str:
        e = self.entries[i]
        return e[1].display() if e[0] == "item" else f"{e[1]}[{e[3]}]"

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        out = []
        for i in indices:
            try:
                out.append(_load_entry(self.entries[i], self.res, self.preprocess, self.min_size))
            except _Skip as e:
                self.num_skipped += 1
                if len(self.skipped) < MAX_SKIPS_LISTED:
                    self.skipped.append({"input": self.name(i), "reason": e.reason, "detail": e.detail})
        if not out:
            return torch.empty((0, 3, self.res, self.res), dtype=torch.uint8)
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _load_entry(entry, resolution: int, preprocess: str, min_size: int) -> np.ndarray:
    from PIL import Image

    from latentdiff.data.images import ImageSkip, adm_center_crop, decode_image, load_and_preprocess, to_rgb
    from latentdiff.data.inputs import read_item_bytes

    try:
        if entry[0] == "npz":
            arr = np.asarray(entry[2][entry[3]])
            if preprocess == "none":
                if arr.shape[:2] != (resolution, resolution):
                    raise FIDError(
                        f"{entry[1]}[{entry[3]}] is {arr.shape[1]}x{arr.shape[0]}, not {resolution}x{resolution}: use "
                        "--preprocess adm or the right --resolution"
                    )
                return np.ascontiguousarray(arr)
            return adm_center_crop(Image.fromarray(np.ascontiguousarray(arr)), resolution)
        data = read_item_bytes(entry[1])
        if preprocess == "adm":
            return load_and_preprocess(data, resolution, min_size=min_size)
        img = to_rgb(decode_image(data))
        if img.size != (resolution, resolution):
            raise FIDError(
                f"{entry[1].display()} is {img.size[0]}x{img.size[1]}, not {resolution}x{resolution}: use "
                "--preprocess adm (ADM center crop) or the right --resolution"
            )
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    except ImageSkip as e:
        raise _Skip(e.reason, e.detail) from None


def _list_entries(inputs: list[str]) -> tuple[list, list[dict]]:
    """Entries in command-line order: the encoder's listing for folders / tars / list files / images,
    plus the top-level ``*.tar`` shards of a folder, plus the rows of ``.npz`` inputs."""
    from latentdiff.data.inputs import list_inputs

    entries: list = []
    problems: list[dict] = []
    seen: set[Path] = set()
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FIDError(f"input {raw} does not exist; pass image folders, .tar shards, list files or .npz files")
        if path.resolve() in seen:
            raise FIDError(f"input {raw} is given twice; its images would be counted twice")
        seen.add(path.resolve())
        if path.is_file() and path.name.lower().endswith(".npz"):
            arr = image_sources.read_npz_array(path, "arr_0")
            if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
                raise FIDError(f"{path}: arr_0 has shape {arr.shape} and dtype {arr.dtype}; expected uint8 (N, H, W, 3)")
            entries.extend(("npz", str(path), arr, i) for i in range(arr.shape[0]))
            continue
        groups = [[str(path)]]
        if path.is_dir():
            groups += [[str(t)] for t in sorted(path.glob("*.tar"))]
        for group in groups:
            listing = list_inputs(group)
            entries.extend(("item", it) for it in listing.items)
            problems.extend(listing.problems)
    return entries, problems


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fid_reference.py",
        description="FID reference statistics (mu, sigma + provenance JSON) from image folders, tar shards or npz, "
        "preprocessed like the training data. Run under torchrun/srun to split the images over ranks.",
    )
    p.add_argument("inputs", nargs="+", help="image folders, .tar shards, list files, images, ADM .npz (arr_0)")
    p.add_argument("--out", required=True, help="output .npz (a .provenance.json is written beside it)")
    p.add_argument("--resolution", type=int, required=True, help="model resolution R (images become R x R)")
    p.add_argument("--preprocess", choices=sorted(PREPROCESSING), default="adm", help="adm (default): ADM center crop")
    p.add_argument("--min-size", type=int, default=0, help="skip images whose short side is below this (default 0: keep all)")
    p.add_argument("--max-images", type=int, help="use only the first N listed images")
    p.add_argument("--inception-weights", help=f"torch-fidelity Inception state dict (default: ${inception.WEIGHTS_ENV} or the torch hub cache)")
    p.add_argument("--download-weights", action="store_true", help="explicitly download the official weights first")
    p.add_argument("--allow-small", action="store_true", help=f"allow fewer than {frechet.MIN_SAMPLES} images (smoke tests only)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="torch device (default: this rank's accelerator device)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    prefix = "fid_reference"
    initialized_here = False
    try:
        out = Path(args.out)
        if out.suffix != ".npz":
            raise FIDError(f"--out must end in .npz, got {out}")
        if args.resolution < 8:
            raise FIDError(f"--resolution must be >= 8, got {args.resolution}")
        if args.batch_size < 1:
            raise FIDError(f"--batch-size must be >= 1, got {args.batch_size}")
        entries, problems = _list_entries(args.inputs)
        if args.max_images is not None:
            if args.max_images < 1:
                raise FIDError(f"--max-images must be >= 1, got {args.max_images}")
            entries = entries[: args.max_images]
        if not entries:
            raise FIDError(f"no images found in {', '.join(args.inputs)}")
        frechet.check_count(len(entries), args.allow_small, frechet.MIN_SAMPLES, ", ".join(args.inputs))
        initialized_here = ldist.init_distributed()
        if ldist.get_world_size() > 1:
            prefix = f"fid_reference[rank {ldist.get_rank()}]"
        extractor = inception.load_feature_extractor(args.inception_weights, device=args.device, download=args.download_weights)
        images = ReferenceImages(entries, args.resolution, args.preprocess, args.min_size, ", ".join(args.inputs))
        mu, sigma, n = frechet.compute_statistics(
            images,
            extractor,
            args.batch_size,
            allow_small=args.allow_small,
            progress=not args.no_progress,
            desc="reference features",
        )
        skipped = images.skipped
        num_skipped = images.num_skipped
        gathered = ldist.all_gather_object((num_skipped, skipped))
        num_skipped = sum(g[0] for g in gathered)
        skipped = [s for g in gathered for s in g[1]][:MAX_SKIPS_LISTED]
        if ldist.get_rank() == 0:
            provenance = {
                "format": reference.REFERENCE_FORMAT,
                "source": [str(Path(x).resolve()) for x in args.inputs],
                "source_type": "images",
                "count": n,
                "listed": len(entries),
                "max_images": args.max_images,
                "skipped": num_skipped,
                "skipped_examples": skipped,
                "container_problems": problems,
                "resolution": [args.resolution, args.resolution],
                "preprocessing": {
                    "mode": args.preprocess,
                    "description": PREPROCESSING[args.preprocess],
                    "min_size": args.min_size,
                    "to_extractor": "uint8 RGB NCHW; " + inception.RESIZE_DESCRIPTION,
                },
                "feature_extractor": extractor.describe(),
                "world_size": ldist.get_world_size(),
                "created": F._now(),
                "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
            }
            npz, prov = reference.save_reference(out, mu, sigma, provenance)
            print(f"reference statistics of {n} images ({num_skipped} skipped) -> {npz} + {prov.name}")
        return 0
    except LatentdiffError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        initialized_here = False  # no barrier after an error: another rank may be inside a collective
        return 2
    finally:
        if initialized_here:
            ldist.destroy()


if __name__ == "__main__":
    # end like the CLIs: os._exit with main's code, so interpreter teardown with a live communication
    # thread cannot abort a rank after its work is done ("terminate called without an active exception")
    ldist.run_entry_point(main, "fid_reference.py")
