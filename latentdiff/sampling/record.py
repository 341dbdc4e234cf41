"""The end of a sample run on rank 0: check what the solver did, then ``samples.npz``, ``grid.png`` and
``sampling.json`` (:class:`~latentdiff.contracts.sampling.SamplingRecord`) for the complete set."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from latentdiff.contracts.sampling import SAMPLING_JSON, SamplingRecord
from latentdiff.sampling.files import png_path, read_png, valid_png
from latentdiff.sampling.job import SampleJob, kernel_settings
from latentdiff.sampling.options import network_evals_per_image
from latentdiff.utils.errors import SampleError
from latentdiff.utils.io import atomic_open
from latentdiff.utils.seeds import format_seeds
from latentdiff.vae.decode import image_grid

__all__ = ["finish"]


def _grid(job: SampleJob, gathered: list[dict]) -> dict:
    """The sigma grid to record: the planned one (checked against every chunk's) for a fixed-grid
    solver, else the grid of the lowest seed generated in this run (re-run once after a full resume)."""
    plan = job.plan
    nfes = sorted({v for g in gathered for v in g["nfe"]})
    if nfes and nfes != [plan.nfe]:
        raise SampleError(f"the solver used {nfes} denoiser calls per image but planned {plan.nfe}; this is a bug")
    firsts = sorted((f for g in gathered for f in g["firsts"]), key=lambda f: f["seed"])
    if not job.per_image_grid:
        if any(f["sigmas"] != plan.sigmas for f in firsts):
            raise SampleError("the sigma grid used differs from the planned one; this is a bug")
        return {"seed": None, "sigmas": plan.sigmas, "eval_sigmas": plan.eval_sigmas}
    if firsts:
        return firsts[0]
    _, (info,) = job.generate(job.seeds[:1])
    return {"seed": job.seeds[0], "sigmas": info.sigmas, "eval_sigmas": info.eval_sigmas}


def _read_back(job: SampleJob, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, labels or -1) of the first ``count`` seeds, from their PNGs."""
    first = read_png(png_path(job.out, job.seeds[0]))[0]
    arr = np.empty((count, *first.shape), dtype=np.uint8)
    labels = np.full((count,), -1, dtype=np.int64)
    for i, s in enumerate(job.seeds[:count]):
        a, text = read_png(png_path(job.out, s))
        arr[i] = a
        if "label" in text:
            labels[i] = int(text["label"])
    return arr, labels


def _write_summaries(job: SampleJob) -> None:
    """``samples.npz`` (ADM layout: arr_0 uint8 NHWC in seed order, arr_1 labels, seeds) and ``grid.png``."""
    cfg = job.cfg
    if cfg.no_npz and not cfg.grid:
        return
    arr, labels = _read_back(job, len(job.seeds) if not cfg.no_npz else min(cfg.grid, len(job.seeds)))
    if not cfg.no_npz:
        extra = {"arr_1": labels} if job.src.num_classes > 0 else {}
        with atomic_open(job.out / "samples.npz") as f:
            np.savez(f, arr_0=arr, **extra, seeds=np.asarray(job.seeds, dtype=np.int64))
    if cfg.grid:
        g = image_grid(torch.from_numpy(arr[: cfg.grid]).permute(0, 3, 1, 2))
        with atomic_open(job.out / "grid.png") as f:
            Image.fromarray(g.permute(1, 2, 0).numpy()).save(f, format="PNG")


def _files(job: SampleJob) -> dict:
    npz = None
    if not job.cfg.no_npz:
        npz = ("samples.npz (arr_0 uint8 NHWC in seed order" + (", arr_1 labels" if job.src.num_classes > 0 else "")
               + ", seeds)")
    return {"images": "images/%06d.png (lossless PNG)", "npz": npz}


def _record(job: SampleJob, grid: dict, generated: int, elapsed: float, model_hash: str) -> SamplingRecord:
    cfg, src, ae = job.cfg, job.src, job.ae
    return SamplingRecord(
        source=src.path, source_kind=src.kind, export_hash=model_hash, seeds=format_seeds(job.seeds, ordered=True),
        solver=cfg.solver, nfe_requested=cfg.budget["nfe"], steps=cfg.steps, nfe_used=job.plan.nfe,
        network_evals_per_image=network_evals_per_image(grid["eval_sigmas"], cfg.cfg, job.interval, cfg.solver),
        sigma_grid=grid["sigmas"], eval_sigmas=grid["eval_sigmas"], sigma_grid_per_image=job.per_image_grid,
        sigma_grid_seed=grid["seed"], plan=job.plan.to_dict().get("plan"), solver_kwargs=job.options,
        sigma_min=src.sigma_min, sigma_max=src.sigma_max, sigma_max_choice=cfg.sigma_max, rho=cfg.rho, cfg=cfg.cfg,
        guidance_interval=list(job.interval) if job.interval else None, class_label=cfg.class_label,
        null_label=src.null_label, ema_profile=src.ema_profile, vae=src.vae,
        vae_decode_precision=ae.decode_precision, vae_tiling=ae.tiling, normalization=src.normalization.to_dict(),
        image_size=list(job.img_size), world_size=job.world, network_batch=job.net_batch, decode_batch=job.dec_batch,
        micro_batch=job.micro, **kernel_settings(),  # the fixed shapes; the thread count and SIMD level
        generated_this_run=generated, seconds=elapsed,
        images_per_second=generated / elapsed if generated and elapsed > 0 else None, files=_files(job),
        scheduler=src.scheduler,
        gits=None if job.gits is None else {k: job.gits.meta.get(k) for k in ("file", "key", "cached", "seconds")},
    )


def finish(job: SampleJob, gathered: list[dict], elapsed: float, model_hash: str) -> SamplingRecord:
    """Rank 0, after every rank's images are written: the summary files and ``sampling.json``."""
    grid = _grid(job, gathered)
    missing = [s for s in job.seeds if not valid_png(png_path(job.out, s), job.img_size)]
    if missing:
        raise SampleError(f"{len(missing)} images are missing after sampling (e.g. seed {missing[0]}); re-run to resume")
    _write_summaries(job)
    record = _record(job, grid, sum(g["generated"] for g in gathered), elapsed, model_hash)
    record.write(job.out / SAMPLING_JSON)
    return record
