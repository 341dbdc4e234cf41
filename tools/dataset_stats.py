#!/usr/bin/env python
"""Recompute a latent dataset's statistics from its shards and compare with (or rewrite) stats.json/npz.

    python tools/dataset_stats.py OUT [--write] [--rtol 1e-10]

Every shard is verified against the sha256 in OUT/dataset.json.  The latent statistics are recomputed
from the float16 values stored in the shards (they match the encoder's bit for bit); the RGB 64x64
spectrum comes from the per-shard sidecars (RGB images are not stored in the shards).  Exit status:
0 = agree (or rewritten with --write), 1 = differ by more than --rtol, 2 = the dataset is broken.
"""
from __future__ import annotations

import argparse
import sys

from latentdiff.data.recompute import recompute_stats, relative_difference
from latentdiff.data.stats import DatasetStats
from latentdiff.utils.errors import DataError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="OUT", help="dataset directory written by tools/encode_latents.py")
    p.add_argument("--write", action="store_true", help="rewrite OUT/stats.json and OUT/stats.npz")
    p.add_argument("--rtol", type=float, default=1e-10, help="largest accepted relative difference per field")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        new, notes = recompute_stats(a.root, progress=not a.no_progress)
    except DataError as exn:
        print(f"dataset_stats: error: {exn}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}")
    status = 0
    try:
        old = DatasetStats.load(a.root)
    except DataError as exn:
        print(f"no usable existing statistics ({exn})")
        old = None
    if old is not None:
        diffs = relative_difference(new, old)
        width = max(len(k) for k in diffs)
        print(f"{'field':<{width}}  max relative difference (recomputed vs stats.npz)")
        for k, v in diffs.items():
            flag = "" if v <= a.rtol else "   <-- differs"
            print(f"{k:<{width}}  {v:.3e}{flag}")
        if old.shards_hash != new.shards_hash:
            print(f"shards_hash: stats.json {old.shards_hash} != dataset.json {new.shards_hash}   <-- differs")
            diffs["shards_hash"] = float("inf")
        worst = max(diffs.values())
        status = 0 if worst <= a.rtol else 1
        print("agree" if status == 0 else f"DIFFER (worst {worst:.3e} > rtol {a.rtol:g})")
    if a.write:
        new.save(a.root)
        print(f"wrote {a.root}/stats.json and {a.root}/stats.npz (n={new.n})")
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
