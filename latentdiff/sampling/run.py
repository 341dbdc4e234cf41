"""The sample stage: an export and a seed list -> lossless PNGs, ``samples.npz``, ``grid.png`` and
``sampling.json`` (see ``latentdiff.cli.sample`` for the command and the determinism guarantees).

Every rank takes the seeds ``seeds[rank::world]`` whose PNG is missing or does not verify, generates
them ``net_batch`` seeds at a time (solver, network and VAE on micro-batches of exactly ``micro_batch``
rows, see ``latentdiff.sampling.job``) and writes each PNG while the next chunk is sampled; rank 0
then checks what every rank's solver did against the dry-run plan and writes the record.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch.distributed as dist
from tqdm import tqdm

from latentdiff.contracts.sampling import SamplingRecord
from latentdiff.sampling.config import SampleConfig
from latentdiff.sampling.files import png_path, save_png, valid_png
from latentdiff.sampling.job import SampleJob, prepare_job
from latentdiff.sampling.options import parse_guidance_interval
from latentdiff.sampling.outdir import prepare_out
from latentdiff.sampling.record import finish
from latentdiff.utils import dist as ldist
from latentdiff.utils import seeds as _seeds
from latentdiff.utils.errors import SampleError

__all__ = ["parse_seeds", "run"]


def parse_seeds(spec) -> list[int]:
    """``--seeds``: ``"0-49999"``, ``"0,5,9"``, ``"0-9,20-29"`` (or an int / list of ints) -> list of ints.
    Order is kept; duplicates, negative numbers and empty ranges are refused (:class:`SampleError`)."""
    return _seeds.parse_seeds(spec, error=SampleError)


def run(cfg: SampleConfig) -> SamplingRecord | None:
    """The command body; returns the record written to sampling.json on rank 0 (None on the others)."""
    seeds = parse_seeds(cfg.seeds)
    cfg.validate()
    interval = parse_guidance_interval(cfg.guidance_interval)
    ldist.init_distributed()
    try:
        result = _run(prepare_job(cfg, seeds, interval))
    except BaseException:
        if ldist.is_distributed():  # no barrier: the other ranks may be elsewhere
            dist.destroy_process_group()
        raise
    ldist.destroy()
    return result


def _on_rank0(job: SampleJob, fn):
    """``fn()`` on rank 0; its SampleError (or None) reaches every rank, which all raise it."""
    result, error = None, None
    if job.rank == 0:
        try:
            result = fn()
        except SampleError as e:
            error = str(e)
    error = ldist.broadcast_object(error)
    if error:
        raise SampleError(error)
    return result


def _claim_out(job: SampleJob) -> str | None:
    """Rank 0 checks and (re)initializes OUT (refusing a different configuration); returns the model
    hash on rank 0."""
    def claim():
        fingerprint = job.fingerprint()
        error, notes = prepare_out(job.out, fingerprint, job.cfg)
        if error:
            raise SampleError(error)
        for n in notes:
            print(n, file=sys.stderr, flush=True)
        return fingerprint["model_hash"]

    return _on_rank0(job, claim)


def _sample_missing(job: SampleJob) -> tuple[list[dict], float]:
    """Generate, decode and write this rank's missing images; (per-chunk records, seconds)."""
    seeds = job.seeds
    mine = [s for s in seeds[job.rank :: job.world] if not valid_png(png_path(job.out, s), job.img_size)]
    todo = ldist.all_gather_object(len(mine))
    bar = tqdm(total=len(seeds), initial=len(seeds) - sum(todo), disable=job.rank != 0 or job.cfg.no_progress,
               desc="sample", unit="img", dynamic_ncols=True)
    chunks, pending, t0 = [], [], time.time()
    with ThreadPoolExecutor(max_workers=1) as writer:  # PNG encoding overlaps the next chunk's sampling
        for i in range(0, len(mine), job.net_batch):
            chunk = mine[i : i + job.net_batch]
            z, infos = job.generate(chunk)
            imgs = job.decode(z)
            labels = [lab for info in infos for lab in (info.extra.get("labels") or [])] or None
            for f in pending:
                f.result()
            pending = [writer.submit(save_png, im, png_path(job.out, s),
                                     {"seed": s, **({"label": int(labels[j])} if labels is not None else {})})
                       for j, (s, im) in enumerate(zip(chunk, imgs))]
            for k, info in enumerate(infos):
                part = chunk[k * job.micro : (k + 1) * job.micro]
                chunks.append({"nfe": info.nfe, "seed": part[0], "sigmas": info.sigmas,
                               "eval_sigmas": info.eval_sigmas, "n": len(part)})
            bar.update(min(len(chunk) * job.world, bar.total - bar.n))  # rank 0's pace stands for all ranks
        for f in pending:
            f.result()
    bar.close()
    return chunks, time.time() - t0


def _run(job: SampleJob) -> SamplingRecord | None:
    model_hash = _claim_out(job)
    chunks, elapsed = _sample_missing(job)
    # what every rank's solver did (the grid of each chunk's first image), checked against the plan on rank 0
    local = {"generated": sum(c["n"] for c in chunks), "nfe": sorted({c["nfe"] for c in chunks}),
             "firsts": [{k: c[k] for k in ("seed", "sigmas", "eval_sigmas")} for c in chunks]}
    gathered = ldist.all_gather_object(local)
    return _on_rank0(job, lambda: finish(job, gathered, elapsed, model_hash))
