#!/usr/bin/env python
"""Encoder throughput: the full tool vs the bare VAE encode loop, and the statistics pass vs N.

    python tools/bench/encode_throughput.py [--images 384] [--resolution 64] [--batch-size 32]
                                           [--workers 2] [--repeats 3] [--out bench_out/encode_throughput]

1. Writes ``--images`` PNG crops (skimage photos, 64..128 px) and a tiny AutoencoderKL to a temp dir.
2. *Bare loop*: decodes + crops every image up front, then times only ``vae.encode`` (fp32, same
   batch size, same process and thread count) over the already-decoded batch, in the memory layout
   the tool feeds (NCHW view of NHWC memory, i.e. channels_last).  The same loop on contiguous NCHW
   input is timed too and reported, since the layout alone changes the VAE's speed on CPU.
3. *Full tool*: ``encode_dataset`` (listing, DataLoader decode workers, VAE, float16 conversion,
   per-sample checks, RGB spectra, shard + sidecar writing).  Reports images/s of the encode phase and
   end-to-end (including the statistics pass 2 and the manifest), and the ratio to the bare loop
   (goal >= 0.9 for the encode phase).
4. Statistics pass (``shard_partial`` + ``distance_partial`` = both passes of the latent statistics)
   on synthetic float16 latents of shape (4, 32, 32) for growing N: wall and CPU seconds (best of
   ``--repeats``), us/sample and a linear fit of the CPU time (CPU time is robust to other load).

Writes ``OUT/encode_throughput.json`` and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def bench_encode(args, tmp: Path) -> dict:
    from latentdiff.vae.autoencoder import Autoencoder
    from latentdiff.data.encode import EncodeConfig, encode_dataset
    from latentdiff.data.images import load_and_preprocess
    from latentdiff.data.synthetic import make_tiny_vae, write_image_folder

    blocks = tuple(int(c) for c in args.vae_blocks.split(","))
    vae_dir = make_tiny_vae(tmp / "vae", block_out_channels=blocks,
                            down_block_types=("DownEncoderBlock2D",) * len(blocks),
                            up_block_types=("UpDecoderBlock2D",) * len(blocks))
    per_class = (args.images + 2) // 3
    paths = write_image_folder(tmp / "imgs", classes=3, per_class=per_class, size_range=(args.resolution, 2 * args.resolution), seed=0)
    paths = sorted(paths)
    n = len(paths)
    ae = Autoencoder.load(str(vae_dir))
    params = sum(p.numel() for p in ae.vae.parameters())
    # bare loop on already-decoded images
    imgs = np.stack([load_and_preprocess(p.read_bytes(), args.resolution, min_size=1) for p in paths])
    x_all = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1  # channels_last, like the tool's batches
    assert x_all.is_contiguous(memory_format=torch.channels_last)
    x_nchw = x_all.contiguous()
    ae.encode(x_all[: args.batch_size])  # warm-up
    ae.encode(x_nchw[: args.batch_size])
    # decode cost per image (what the DataLoader workers do), single-threaded
    from latentdiff.data.stats import rgb64_power

    t = time.perf_counter()
    for p in paths:
        rgb64_power(load_and_preprocess(p.read_bytes(), args.resolution, min_size=1))
    decode_ms = 1e3 * (time.perf_counter() - t) / n
    # time spent inside the VAE call during the tool's run
    vae_time = [0.0]
    orig_encode = Autoencoder.encode

    def timed_encode(self, x, precision=None):
        t0 = time.perf_counter()
        try:
            return orig_encode(self, x, precision)
        finally:
            vae_time[0] += time.perf_counter() - t0

    Autoencoder.encode = timed_encode
    # bare loop and full tool alternate, best of --repeats each (robust to other load on the machine)
    best_bare = best_nchw = float("inf")
    runs = []
    for r in range(args.repeats):
        t = time.perf_counter()
        for i in range(0, n, args.batch_size):
            ae.encode(x_all[i : i + args.batch_size])
        best_bare = min(best_bare, time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(0, n, args.batch_size):
            ae.encode(x_nchw[i : i + args.batch_size])
        best_nchw = min(best_nchw, time.perf_counter() - t)
        out = tmp / f"out{r}"
        cfg = EncodeConfig(inputs=[str(tmp / "imgs")], output=str(out), resolution=args.resolution, vae=str(vae_dir),
                           batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size,
                           progress=False, command=["bench"])
        vae_time[0] = 0.0
        t = time.perf_counter()
        s = encode_dataset(cfg)
        runs.append({"total": time.perf_counter() - t, "encode": s["encode_seconds"], "finalize": s["finalize_seconds"],
                     "vae_in_tool": vae_time[0], "samples": s["num_samples"]})
    Autoencoder.encode = orig_encode
    best = min(runs, key=lambda r: r["encode"])
    assert best["samples"] == n
    bare_ips = n / best_bare
    tool_ips = n / best["encode"]
    return {
        "vae_block_out_channels": list(blocks), "vae_params": params,
        "latent_shape": list(ae.latent_shape(args.resolution)),
        "images": n, "resolution": args.resolution, "batch_size": args.batch_size, "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "bare_vae_seconds": best_bare, "bare_vae_img_s": bare_ips,
        "bare_vae_nchw_seconds": best_nchw, "bare_vae_nchw_img_s": n / best_nchw,
        "tool_encode_seconds": best["encode"], "tool_encode_img_s": tool_ips,
        "tool_total_seconds": best["total"], "tool_total_img_s": n / best["total"],
        "tool_finalize_seconds": best["finalize"],
        "ratio_encode_phase": tool_ips / bare_ips,
        "decode_ms_per_image_1thread": decode_ms,
        "vae_seconds_inside_tool": best["vae_in_tool"],
        "vae_share_of_encode_phase": best["vae_in_tool"] / best["encode"],
        "vae_slowdown_inside_tool": best["vae_in_tool"] / best_bare,
        "ratio_end_to_end": (n / best["total"]) / bare_ips,
        "runs": runs,
    }


def bench_stats(sizes: list[int], shard: int = 1000, shape=(4, 32, 32), repeats: int = 3) -> dict:
    from latentdiff.data.stats import distance_partial, point_mean, shard_partial

    rng = np.random.default_rng(0)
    block = (rng.standard_normal((shard, *shape)) * 3 + 0.5).astype(np.float16)
    stds = (rng.random((shard, *shape)) * 0.1).astype(np.float16)
    shard_partial(block, stds)  # warm-up (FFT plans, allocator)
    rows = []
    for n in sizes:
        k = n // shard
        best, best_cpu = float("inf"), float("inf")
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            parts = [shard_partial(block, stds) for _ in range(k)]  # pass 1 (per-shard sums)
            pm, cm = point_mean(parts, shape)
            for _ in range(k):  # pass 2 (distances, centered moments)
                distance_partial(block, pm, cm)
            best = min(best, time.perf_counter() - t)
            best_cpu = min(best_cpu, time.process_time() - c)
        rows.append({"n": n, "seconds": best, "cpu_seconds": best_cpu, "us_per_sample": 1e6 * best / n,
                     "cpu_us_per_sample": 1e6 * best_cpu / n})
    ns = np.array([r["n"] for r in rows], dtype=float)
    ts = np.array([r["cpu_seconds"] for r in rows])  # CPU time: robust to other load on a shared machine
    slope, intercept = np.polyfit(ns, ts, 1)
    pred = slope * ns + intercept
    r2 = 1 - float(((ts - pred) ** 2).sum() / ((ts - ts.mean()) ** 2).sum())
    loglog = float(np.polyfit(np.log(ns), np.log(ts), 1)[0])
    return {"shape": list(shape), "rows": rows, "linear_fit_seconds_per_sample": float(slope),
            "linear_fit_intercept": float(intercept), "r2": r2, "loglog_slope": loglog}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--vae-blocks", default="32,64",
                   help="block_out_channels of the random AutoencoderKL (32,64 = the 0.66M test VAE; "
                        "64,128,256 = a small 3-level VAE)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stats-sizes", default="1000,2000,4000,8000,16000")
    p.add_argument("--out", default="bench_out/encode_throughput")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as d:
        enc = bench_encode(a, Path(d))
    st = bench_stats([int(s) for s in a.stats_sizes.split(",")], repeats=a.repeats)
    result = {"encode": enc, "stats_pass": st}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encode_throughput.json").write_text(json.dumps(result, indent=2))
    print(f"VAE: block_out_channels {tuple(enc['vae_block_out_channels'])}, {enc['vae_params'] / 1e6:.2f}M params, "
          f"latents {tuple(enc['latent_shape'])}")
    print(f"encode: {enc['images']} images {a.resolution}x{a.resolution}, batch {a.batch_size}, "
          f"{a.workers} decode workers, {enc['torch_threads']} torch threads")
    print(f"  bare VAE encode loop (pre-decoded) : {enc['bare_vae_img_s']:8.1f} img/s   (channels_last input, as the tool)")
    print(f"  same loop, contiguous NCHW input   : {enc['bare_vae_nchw_img_s']:8.1f} img/s   "
          f"(channels_last / NCHW {enc['bare_vae_img_s'] / enc['bare_vae_nchw_img_s']:.3f})")
    print(f"  full tool, encode phase            : {enc['tool_encode_img_s']:8.1f} img/s   ratio {enc['ratio_encode_phase']:.3f}")
    print(f"  full tool, end to end (+stats, IO) : {enc['tool_total_img_s']:8.1f} img/s   ratio {enc['ratio_end_to_end']:.3f}")
    print(f"  breakdown: VAE calls take {100 * enc['vae_share_of_encode_phase']:.1f}% of the tool's encode phase; "
          f"inside the tool they run {enc['vae_slowdown_inside_tool']:.3f}x the bare loop's time (the decode workers, "
          f"{enc['decode_ms_per_image_1thread']:.2f} ms/image on one core, share the CPU with the VAE threads)")
    print(f"statistics pass (both passes) on float16 latents {tuple(st['shape'])}:")
    for r in st["rows"]:
        print(f"  N = {r['n']:7d}: wall {r['seconds']:7.3f} s, CPU {r['cpu_seconds']:7.3f} s  ({r['cpu_us_per_sample']:.1f} CPU-us/sample)")
    print(f"  linear fit of CPU time: {1e6 * st['linear_fit_seconds_per_sample']:.1f} us/sample + {st['linear_fit_intercept']:.3f} s, "
          f"R^2 = {st['r2']:.4f}, log-log slope = {st['loglog_slope']:.3f} (1 = linear)")
    print(f"wrote {out / 'encode_throughput.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
