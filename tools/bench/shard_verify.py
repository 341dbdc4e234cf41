#!/usr/bin/env python
"""The cost of the default shard check: reading every sample with its checksum verified vs without.

    python tools/bench/shard_verify.py [--samples 4096] [--shape 4,32,32] [--shard-size 512]
                                       [--batch-size 64] [--repeats 5] [--out bench_out/shard_verify]

Writes ``--samples`` synthetic float16 latents (``--shape``; 4x32x32 is the SD VAE at 256 px) as real
shards with a manifest, then reads one full epoch through :class:`latentdiff.data.LatentShardDataset`
(one process, no workers, no shuffle) with ``verify="size"`` (no per-sample check) and
``verify="sample"`` (every sample's sha256 checked as it is read), alternating, ``--repeats`` times
each, in the same process.  Reports the best wall and CPU seconds of each and their ratio
(``sample / size``), and the per-sample cost of the check.  The reader's work without the check is
tar parsing, two ``np.load`` and batching; the training step a real run adds on top is not included,
so the ratio is an upper bound on what verification costs a run.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def make_dataset(root: Path, n: int, shape: tuple[int, ...], shard_size: int) -> Path:
    from latentdiff.contracts.manifest import DatasetManifest, ShardEntry
    from latentdiff.data.shards import ShardSample, shard_name, write_shard

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, n, shard_size)):
        samples = [ShardSample(f"{i:09d}", rng.standard_normal(shape).astype(np.float16),
                               (rng.random(shape) * 0.1).astype(np.float16), i % 10, {"source": f"img{i}"})
                   for i in range(start, min(n, start + shard_size))]
        info = write_shard(root / shard_name(k), samples)
        shards.append(ShardEntry(shard_name(k), info["count"], info["sha256"], info["bytes"]))
    c, h, w = shape
    vae = {"kind": "AutoencoderKL", "id": "synthetic (benchmark)", "source": "local", "scaling_factor": 0.18215,
           "shift_factor": None, "latent_channels": c, "downsampling_factor": 8}
    DatasetManifest(vae=vae, resolution=8 * h, sample_shape=(c, h, w), shards=shards, num_classes=10,
                    num_labelled=n, shard_size=shard_size, num_listed=n).save(root)
    return root


def read_epoch(root: Path, batch: int, verify: str) -> tuple[float, float, int]:
    from latentdiff.data.reader import LatentShardDataset

    ds = LatentShardDataset(root, batch, rank=0, world_size=1, num_workers=0, shuffle=False, verify=verify)
    assert ds.check_samples == (verify == "sample")
    ds.set_epoch(0)
    t, c, seen = time.perf_counter(), time.process_time(), 0
    for mean, _, _, _ in ds:
        seen += mean.shape[0]
    return time.perf_counter() - t, time.process_time() - c, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--shape", default="4,32,32")
    ap.add_argument("--shard-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench_out/shard_verify")
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp) / "ds", a.samples, shape, a.shard_size)
        read_epoch(root, a.batch_size, "size")  # warm the page cache
        runs = {"size": [], "sample": []}
        for _ in range(a.repeats):
            for mode in ("size", "sample"):
                runs[mode].append(read_epoch(root, a.batch_size, mode))
    best = {m: (min(r[0] for r in v), min(r[1] for r in v), v[0][2]) for m, v in runs.items()}
    res = {
        "samples_read": best["size"][2], "shape": list(shape), "batch_size": a.batch_size, "repeats": a.repeats,
        "wall_s": {m: b[0] for m, b in best.items()}, "cpu_s": {m: b[1] for m, b in best.items()},
        "ratio_wall": best["sample"][0] / best["size"][0], "ratio_cpu": best["sample"][1] / best["size"][1],
        "check_us_per_sample_cpu": 1e6 * (best["sample"][1] - best["size"][1]) / best["size"][2],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shard_verify.json").write_text(json.dumps(res, indent=1))
    print(f"{res['samples_read']} samples of shape {tuple(shape)} float16 (mean + std), best of {a.repeats}:")
    for m in ("size", "sample"):
        print(f"  verify={m:6s}  wall {best[m][0]:.3f} s  cpu {best[m][1]:.3f} s  "
              f"({best[m][2] / best[m][0]:.0f} samples/s)")
    print(f"ratio sample/size: wall {res['ratio_wall']:.3f}, cpu {res['ratio_cpu']:.3f}; "
          f"the check costs {res['check_us_per_sample_cpu']:.1f} us of CPU per sample")


if __name__ == "__main__":
    main()
