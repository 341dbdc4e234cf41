"""The sample stage: an export and a seed list -> lossless PNGs, ``samples.npz``, ``grid.png`` and
``sampling.json`` (see ``latentdiff.cli.sample`` for the command and the determinism guarantees)."""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from latentdiff.utils import dist as ldist
from latentdiff.utils import seeds as _seeds
from latentdiff.utils.io import atomic_write_text
from latentdiff.vae.decode import decode_to_uint8, image_grid, load_vae_for
from latentdiff.utils.errors import LatentdiffError, SampleError
from latentdiff.solvers.registry import FIXED_GRID_SAMPLERS
from latentdiff.contracts.export import check_export_meta, export_hash, load_export
from latentdiff.solvers.generate import generate_latents
from latentdiff.sampling.options import (
    network_evals_per_image,
    parse_guidance_interval,
    resolve_sigma_max,
    solver_record,
)
from latentdiff.diffusion.grids import VP_SIGMA_MAX
from latentdiff.models.diffusers_vp import load_diffusers_unet
from latentdiff.sampling.files import png_path, read_png, save_png, valid_png

__all__ = ["parse_seeds", "run"]

CONFIG_FORMAT = "latentdiff-sample-config/1"
# fields of the fingerprint that only choose tensor shapes (see "Determinism" in latentdiff.cli.sample): a change warns
_SHAPE_FIELDS = ("network_batch", "decode_batch")


def parse_seeds(spec) -> list[int]:
    """``--seeds``: ``"0-49999"``, ``"0,5,9"``, ``"0-9,20-29"`` (or an int / list of ints) -> list of ints.
    Order is kept; duplicates, negative numbers and empty ranges are refused (:class:`SampleError`)."""
    return _seeds.parse_seeds(spec, error=SampleError)


def _format_seeds(seeds: list[int]):
    """The request as recorded in ``sampling.json``: ``"A-B"`` for one range, else the list in order."""
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return list(seeds)


def _solver_kwargs(args) -> dict:
    kw = {}
    m = args.solver
    if args.placement is not None:
        kw["placement"] = args.placement
    if args.h_tau is not None:
        kw["h_tau"] = args.h_tau
    if m == "hybrid":
        kw["num_ode3"] = int(args.num_ode3 or 0)
        kw["is_midpoint"] = bool(args.midpoint)
    elif args.num_ode3 is not None or args.midpoint:
        raise SampleError(f"--num-ode3/--midpoint configure --solver hybrid, not {m}")
    churn = {"s_churn": args.s_churn, "s_tmin": args.s_tmin, "s_tmax": args.s_tmax, "s_noise": args.s_noise}
    churn = {k: float(v) for k, v in churn.items() if v is not None}
    if churn and m != "edm-stochastic":
        raise SampleError(f"--s-churn/--s-tmin/--s-tmax/--s-noise configure --solver edm-stochastic, not {m}")
    kw.update(churn)
    return kw


def _check_args(args) -> None:
    for name in ("batch", "decode_batch"):
        if getattr(args, name) < 1:
            raise SampleError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps is None and (args.nfe is None or args.nfe < 1):
        raise SampleError(f"--nfe must be >= 1, got {args.nfe}")
    if args.steps is not None and args.steps < 1:
        raise SampleError(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.cfg):
        raise SampleError(f"--cfg must be a finite number, got {args.cfg}")
    if args.sigma_min is not None and not (args.sigma_min > 0 and math.isfinite(args.sigma_min)):
        raise SampleError(f"--sigma-min must be positive, got {args.sigma_min}")
    if args.grid < 0:
        raise SampleError("--grid must be >= 0")


def _load_source(args, device):
    """(denoiser, meta, info dict) for --export or --diffusers-unet."""
    if args.export:
        try:
            denoiser, meta = load_export(args.export, weights=args.weights, device=device)
        except (ValueError, RuntimeError, KeyError, TypeError) as e:
            if isinstance(e, LatentdiffError):
                raise
            raise SampleError(f"--export {args.export}: cannot rebuild the model from model.json and the weights "
                              f"({type(e).__name__}: {e}); re-export the run") from e
        check_export_meta(meta, f"{Path(args.export) / 'model.json'}")
        res = int(meta["model"]["resolution"])
        src = {
            "kind": "export",
            "shape": [int(meta["model"]["in_channels"]), res, res],
            "num_classes": int(meta["num_classes"]),
            "null_label": meta.get("null_label"),
            "sigma_max": resolve_sigma_max(args.sigma_max, meta),
            "sigma_min": float(args.sigma_min if args.sigma_min is not None else meta["schedule"]["sigma_min"]),
            "ema_profile": Path(meta["_weights_file"]).name.rsplit(".safetensors", 1)[0],
        }
    else:
        denoiser, meta = load_diffusers_unet(args.diffusers_unet, device=device)
        if args.sigma_max == "data":  # a pretrained DDPM model has no data-driven value: its own range
            sigma_max = float(VP_SIGMA_MAX)
        else:
            sigma_max = resolve_sigma_max(args.sigma_max, None)
        src = {
            "kind": "diffusers-unet",
            "shape": meta["shape"],
            "num_classes": meta["num_classes"],
            "null_label": None,
            "sigma_max": sigma_max,
            "sigma_min": float(args.sigma_min if args.sigma_min is not None else meta["schedule"]["sigma_min"]),
            "ema_profile": "pretrained",
        }
        if args.weights != "ema":
            raise SampleError("--weights selects an EMA of a latentdiff export; a diffusers UNet has one set of weights")
        if args.cfg != 1.0:
            raise SampleError("--cfg needs a latentdiff export with a null class (a diffusers UNet2DModel has none)")
    if not src["sigma_min"] < src["sigma_max"]:
        raise SampleError(f"sigma_min {src['sigma_min']} must be below sigma_max {src['sigma_max']} (--sigma-max {args.sigma_max})")
    if args.cfg != 1.0 and src["num_classes"] == 0:
        raise SampleError("--cfg != 1 needs a class-conditional model; this one is unconditional")
    if args.class_label is not None and not 0 <= args.class_label < max(src["num_classes"], 1):
        raise SampleError(f"--class-label {args.class_label} is outside [0, {src['num_classes']})")
    if args.class_label is not None and src["num_classes"] == 0:
        raise SampleError("--class-label needs a class-conditional model; this one is unconditional")
    return denoiser, meta, src


def _broadcast(obj):
    """obj from rank 0 on every rank (identity without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] ([obj] without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def _prepare_out(out: Path, fingerprint: dict, args) -> tuple[str | None, list[str]]:
    """Rank 0: check that OUT may be (re)used, write config.json, drop stale summary files.
    Returns (error message or None, warnings)."""
    notes: list[str] = []
    images = out / "images"
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return f"{cfg_path} is not a latentdiff-sample config; use an empty --out", notes
        keys = sorted(set(old) | set(fingerprint))
        diff = [k for k in keys if old.get(k) != fingerprint.get(k)]
        hard = [k for k in diff if k not in _SHAPE_FIELDS]
        if hard:
            lines = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(fingerprint.get(k))}" for k in hard)
            return (
                f"{out} holds images made with a different configuration ({lines}). Resuming would mix two sample "
                f"sets: use a new --out, or delete {out} to start over", notes
            )
        for k in diff:
            notes.append(
                f"warning: {k} was {old.get(k)} and is now {fingerprint.get(k)}: the forward shapes change, so images "
                "from the two runs are bitwise identical only where the kernels are batch-size invariant"
            )
    elif images.is_dir() and any(images.glob("*.png")):
        return f"{images} holds PNGs but {cfg_path} is missing: they were not written by this sampler; use an empty --out", notes
    images.mkdir(parents=True, exist_ok=True)
    for stale in [out / "samples.npz", out / "sampling.json", out / "grid.png", *images.glob("*.tmp")]:
        stale.unlink(missing_ok=True)
    record = {"format": CONFIG_FORMAT, "fingerprint": fingerprint,
              "args": {k: v for k, v in vars(args).items()}, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(cfg_path, json.dumps(record, indent=1, sort_keys=True))
    return None, notes


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def run(args) -> dict:
    """The command body; returns sampling.json's content on rank 0 ({} on the others)."""
    seeds = parse_seeds(args.seeds)
    _check_args(args)
    interval = parse_guidance_interval(args.guidance_interval)
    solver_kw = _solver_kwargs(args)
    ldist.init_distributed()
    try:
        result = _run(args, seeds, interval, solver_kw, ldist.get_rank(), ldist.get_world_size(), ldist.device())
    except BaseException:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # no barrier: the other ranks may be elsewhere
            dist.destroy_process_group()
        raise
    ldist.destroy()
    return result


def _run(args, seeds, interval, solver_kw, rank, world, device) -> dict:
    out = Path(args.out)
    denoiser, meta, src = _load_source(args, device)
    shape, num_classes = src["shape"], src["num_classes"]
    sigma_min, sigma_max = src["sigma_min"], src["sigma_max"]
    budget = {"nfe": None if args.steps is not None else args.nfe, "steps": args.steps}
    record = solver_record(method=args.solver, **budget, sigma_min=sigma_min, sigma_max=sigma_max, rho=args.rho,
                           shape=shape, solver_kwargs=solver_kw)
    ae = load_vae_for(meta["vae"], device, path=args.vae)
    down = 1 if ae.is_pixel else ae.downsampling_factor
    img_size = (shape[2] * down, shape[1] * down)  # PIL (width, height)
    net_batch = min(args.batch, len(seeds))
    dec_batch = min(args.decode_batch, len(seeds))
    fingerprint = None
    if rank == 0:
        fingerprint = {
            "source": src["kind"],
            "model_hash": export_hash(args.export) if args.export else meta["hash"],
            "weights": meta.get("_weights_file"),
            "vae_sha256": None if ae.is_pixel else (ae.weights_sha256 or ae.revision),
            "normalization": {k: meta["normalization"][k] for k in ("kind", "shift", "scale")},
            "shape": shape,
            "image_size": list(img_size),
            "solver": args.solver,
            **budget,
            "solver_kwargs": solver_kw,
            "sigma_min": sigma_min,
            "sigma_max": sigma_max,
            "rho": args.rho,
            "cfg": args.cfg,
            "guidance_interval": list(interval) if interval else None,
            "class_label": args.class_label,
            "network_batch": net_batch,
            "decode_batch": dec_batch,
        }
        status = _prepare_out(out, fingerprint, args)
    else:
        status = None
    error, notes = _broadcast(status)
    if error:
        raise SampleError(error)
    if rank == 0:
        for n in notes:
            print(n, file=sys.stderr, flush=True)

    mine = [s for s in seeds[rank::world] if not valid_png(png_path(out, s), img_size)]
    todo = _all_gather(len(mine))
    bar = tqdm(total=len(seeds), initial=len(seeds) - sum(todo), disable=rank != 0 or args.no_progress,
               desc="sample", unit="img", dynamic_ncols=True)
    infos = []
    t0 = time.time()
    pending: list = []
    with ThreadPoolExecutor(max_workers=1) as writer:  # PNG encoding overlaps the next chunk's sampling
        for i in range(0, len(mine), net_batch):
            chunk = mine[i : i + net_batch]
            labels = torch.full((len(chunk),), args.class_label) if args.class_label is not None else None
            z, info = generate_latents(
                denoiser, chunk, shape, labels=labels, num_classes=num_classes, method=args.solver,
                nfe=budget["nfe"], steps=budget["steps"], sigma_min=sigma_min, sigma_max=sigma_max, rho=args.rho,
                cfg_scale=args.cfg, guidance_interval=interval, null_label=src["null_label"], device=device,
                solver_kwargs=solver_kw, pad_to=net_batch,
            )
            imgs = decode_to_uint8(z, meta["normalization"], autoencoder=ae, batch_size=dec_batch)
            labs = info.extra.get("labels")
            for f in pending:
                f.result()
            pending = [
                writer.submit(save_png, im, png_path(out, s),
                              {"seed": s, **({"label": int(labs[j])} if labs is not None else {})})
                for j, (s, im) in enumerate(zip(chunk, imgs))
            ]
            infos.append({"nfe": info.nfe, "sigmas": info.sigmas, "eval_sigmas": info.eval_sigmas,
                          "seed": chunk[0], "rows": info.extra["rows"], "n": len(chunk)})
            bar.update(min(len(chunk) * world, bar.total - bar.n))  # rank 0's pace stands for all ranks
        for f in pending:
            f.result()
    bar.close()
    elapsed = time.time() - t0
    generated = sum(d["n"] for d in infos)
    # what every rank's solver actually did, checked against the dry-run record
    # the grid of each chunk's first image: one grid for all (fixed-grid solvers) or that image's own
    local = {"generated": generated, "nfe": sorted({d["nfe"] for d in infos}),
             "firsts": [{k: d[k] for k in ("seed", "sigmas", "eval_sigmas")} for d in infos],
             "rows": sorted({d["rows"] for d in infos})}
    gathered = _all_gather(local)
    result, error = {}, None
    if rank == 0:
        try:
            result = _finish(args, out, seeds, meta, src, record, interval, solver_kw, gathered, elapsed, world,
                             net_batch, dec_batch, img_size, fingerprint, denoiser=denoiser, device=device)
        except SampleError as e:
            error = str(e)
    error = _broadcast(error)
    if error:
        raise SampleError(error)
    return result


def _finish(args, out, seeds, meta, src, record, interval, solver_kw, gathered, elapsed, world, net_batch, dec_batch,
            img_size, fingerprint, *, denoiser, device) -> dict:
    nfes = sorted({v for g in gathered for v in g["nfe"]})
    if nfes and nfes != [record.nfe]:
        raise SampleError(f"the solver used {nfes} denoiser calls per image but planned {record.nfe}; this is a bug")
    firsts = sorted((f for g in gathered for f in g["firsts"]), key=lambda f: f["seed"])
    adaptive = args.solver not in FIXED_GRID_SAMPLERS
    if not adaptive:
        for f in firsts:
            if f["sigmas"] != record.sigmas:
                raise SampleError("the sigma grid used differs from the planned one; this is a bug")
        grid = {"seed": None, "sigmas": record.sigmas, "eval_sigmas": record.eval_sigmas}
    elif firsts:
        grid = firsts[0]
    else:  # a complete resume with a per-image grid: re-run the lowest seed once, for the record
        _, info = generate_latents(
            denoiser, seeds[:1], src["shape"], num_classes=src["num_classes"], method=args.solver, nfe=record.nfe,
            sigma_min=src["sigma_min"], sigma_max=src["sigma_max"], rho=args.rho, cfg_scale=args.cfg,
            guidance_interval=interval, null_label=src["null_label"], device=device, solver_kwargs=solver_kw,
            labels=None if args.class_label is None else torch.full((1,), args.class_label), pad_to=net_batch)
        grid = {"seed": seeds[0], "sigmas": info.sigmas, "eval_sigmas": info.eval_sigmas}
    missing = [s for s in seeds if not valid_png(png_path(out, s), img_size)]
    if missing:
        raise SampleError(f"{len(missing)} images are missing after sampling (e.g. seed {missing[0]}); re-run to resume")
    num_classes = src["num_classes"]
    arr = labels = None
    if not args.no_npz or args.grid:
        first = read_png(png_path(out, seeds[0]))[0]
        count = len(seeds) if not args.no_npz else min(args.grid, len(seeds))
        arr = np.empty((count, *first.shape), dtype=np.uint8)
        labels = np.full((count,), -1, dtype=np.int64)
        for i, s in enumerate(seeds[:count]):
            a, text = read_png(png_path(out, s))
            arr[i] = a
            if "label" in text:
                labels[i] = int(text["label"])
    if not args.no_npz:
        tmp = out / "samples.npz.tmp.npz"
        extra = {"arr_1": labels} if num_classes > 0 else {}
        np.savez(tmp, arr_0=arr, **extra, seeds=np.asarray(seeds, dtype=np.int64))
        tmp.replace(out / "samples.npz")
    if args.grid:
        g = torch.from_numpy(arr[: args.grid]).permute(0, 3, 1, 2)
        Image.fromarray(image_grid(g).permute(1, 2, 0).numpy()).save(out / "grid.png")
    generated = sum(g["generated"] for g in gathered)
    result = {
        "format": "latentdiff-sampling/1",
        "source": args.export or args.diffusers_unet,
        "source_kind": src["kind"],
        "export_hash": fingerprint["model_hash"],
        "num_images": len(seeds),
        "seeds": _format_seeds(seeds),
        "solver": args.solver,
        "nfe_requested": None if args.steps is not None else args.nfe,
        "steps": args.steps,
        "nfe_used": record.nfe,
        "network_evals_per_image": network_evals_per_image(grid["eval_sigmas"], args.cfg, interval, args.solver),
        "sigma_grid": grid["sigmas"],
        "eval_sigmas": grid["eval_sigmas"],
        "sigma_grid_per_image": adaptive,
        "sigma_grid_seed": grid["seed"],
        "plan": record.to_dict().get("plan"),
        "solver_kwargs": solver_kw,
        "sigma_min": src["sigma_min"],
        "sigma_max": src["sigma_max"],
        "sigma_max_choice": args.sigma_max,
        "rho": args.rho,
        "cfg": args.cfg,
        "guidance_interval": list(interval) if interval else None,
        "class_label": args.class_label,
        "null_label": src["null_label"],
        "ema_profile": src["ema_profile"],
        "weights_file": meta.get("_weights_file"),
        "vae": meta["vae"],
        "vae_decode_precision": "fp32",
        "vae_tiling": False,
        "normalization": meta["normalization"],
        "image_size": list(img_size),
        "world_size": world,
        "network_batch": net_batch,
        "decode_batch": dec_batch,
        "intra_op_threads": torch.get_num_threads(),  # CPU: another thread count may sum in another order
        "generated_this_run": generated,
        "seconds": elapsed,
        "images_per_second": generated / elapsed if generated and elapsed > 0 else None,
        "files": {"images": "images/%06d.png (lossless PNG)",
                  "npz": None if args.no_npz else "samples.npz (arr_0 uint8 NHWC in seed order"
                  + (", arr_1 labels" if num_classes > 0 else "") + ", seeds)"},
    }
    if src["kind"] == "diffusers-unet":
        result["scheduler"] = meta["scheduler"]
    atomic_write_text(out / "sampling.json", json.dumps(result, indent=1))
    return result
