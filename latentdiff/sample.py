"""Distributed generation from an export: any solver, classifier-free guidance, exact VAE decode.

``torchrun --nproc_per_node N -m latentdiff.sample --export RUN/export/step_X --out SAMPLES --seeds 0-49999``

* One generator per image seed: the initial noise (drawn on the CPU, then moved to the device), the
  class label of an unlabelled request and any stochastic-sampler noise come from seed ``s`` alone, so
  the images are identical for any number of ranks and any batch size.
* Seeds are split round-robin over ranks; existing ``SAMPLES/images/<seed>.png`` are skipped (resume).
* Latents are mapped back with the export's exact inverse normalization and decoded by the VAE named in
  the export in fp32, untiled (traps T1, T20); images are saved as lossless PNG, then rank 0 writes
  ``samples.npz`` (uint8 NHWC, ADM layout, seed order), ``grid.png`` and ``sampling.json``.
* ``--diffusers-unet DIR`` samples a pretrained diffusers ``UNet2DModel`` epsilon-prediction (DDPM/VP)
  model through VP preconditioning (edm.txt Table 1, wsnr.txt A.4) with the same solvers.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .errors import SampleError

__all__ = [
    "generate_latents",
    "decode_to_uint8",
    "image_grid",
    "load_vae_for",
    "parse_seeds",
    "resolve_sigma_max",
    "DiffusersEpsNet",
    "load_diffusers_unet",
    "run",
    "main",
]

def _default_solver() -> str:
    from .solvers import SAMPLERS

    return "auto" if "auto" in SAMPLERS else "nfe-guided"


DEFAULT_SOLVER = _default_solver()


def parse_seeds(spec: str) -> list[int]:
    """``"0-49999"``, ``"0,5,9"`` or ``"0-9,20-29"`` -> list of ints (order kept, duplicates refused)."""
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise SampleError(f"--seeds {spec!r}: range {part} is empty (end < start)")
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    if not out:
        raise SampleError(f"--seeds {spec!r} selects no seed; use e.g. 0-49999")
    if len(set(out)) != len(out):
        raise SampleError(f"--seeds {spec!r} lists a seed twice")
    if min(out) < 0:
        raise SampleError(f"--seeds {spec!r}: seeds must be >= 0")
    return out


def resolve_sigma_max(choice: str, meta: dict | None) -> float:
    """``data`` (the export's data-driven sigma_max, wsnr.txt Eq. 7-8), ``edm`` (80), ``vp`` (sigma(t=1)) or a number."""
    from .noise import EDM_SIGMA_MAX, VP_SIGMA_MAX

    if choice == "edm":
        return EDM_SIGMA_MAX
    if choice == "vp":
        return VP_SIGMA_MAX
    if choice == "data":
        if meta is None or "sigma_max" not in meta.get("schedule", {}):
            raise SampleError("--sigma-max data needs an export with a data-driven sigma_max; pass edm, vp or a number")
        return float(meta["schedule"]["sigma_max"])
    try:
        v = float(choice)
    except ValueError:
        raise SampleError(f"--sigma-max {choice!r}: use data, edm, vp or a positive number") from None
    if not (v > 0 and math.isfinite(v)):
        raise SampleError(f"--sigma-max {choice!r} must be positive")
    return v


def _seed_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


@torch.no_grad()
def generate_latents(
    denoiser,
    seeds,
    shape,
    *,
    labels=None,
    num_classes: int = 0,
    method: str = DEFAULT_SOLVER,
    nfe: int | None = 35,
    steps: int | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    cfg_scale: float = 1.0,
    guidance_interval=None,
    null_label: int | None = None,
    device="cpu",
    dtype=torch.float32,
    solver_kwargs: dict | None = None,
):
    """Model-space latents for ``seeds`` (one generator per seed) and the solver's ``SampleInfo``.

    ``denoiser(x, sigma, labels)`` is a :class:`~latentdiff.precond.Precond`.  ``labels``: None (then a
    class-conditional model gets a label drawn from each seed's generator), or a (B,) tensor.
    """
    from .guidance import guided_denoiser
    from .solvers import sample

    gens = [_seed_generator(s) for s in seeds]
    noise = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in gens]).to(device, dtype)
    if num_classes > 0:
        if labels is None:
            labels = torch.stack([torch.randint(num_classes, (), generator=g) for g in gens])
        labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        if labels.shape != (len(seeds),):
            raise SampleError(f"got {tuple(labels.shape)} labels for {len(seeds)} seeds")
        denoise = guided_denoiser(denoiser, labels, scale=cfg_scale, null_label=null_label, interval=guidance_interval)
    else:
        if cfg_scale != 1.0:
            raise SampleError("classifier-free guidance (--cfg != 1) needs a class-conditional model")

        def denoise(x, s):
            return denoiser(x, s, None)

    kw = dict(solver_kwargs or {})
    if method == "edm-stochastic":
        kw.setdefault("generator", gens)
    if method == "hybrid" or (steps is not None and method != "nfe-guided"):
        out, info = sample(denoise, noise, method=method, steps=steps, sigma_min=sigma_min, sigma_max=sigma_max,
                           rho=rho, return_info=True, **kw)
    else:
        out, info = sample(denoise, noise, method=method, nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max,
                           rho=rho, return_info=True, **kw)
    info.extra["labels"] = None if labels is None else labels.tolist()
    return out, info


def load_vae_for(vae_desc, device="cpu"):
    """The Autoencoder an export names; verifies the weights' sha256 for local VAEs."""
    from .autoencoder import Autoencoder

    if vae_desc == "none" or (isinstance(vae_desc, dict) and vae_desc.get("kind") == "none"):
        return Autoencoder(None, device=device)
    if not isinstance(vae_desc, dict) or not vae_desc.get("id"):
        raise SampleError(f"the export's VAE description is incomplete: {vae_desc!r}; re-export the run")
    try:
        ae = Autoencoder.load(vae_desc["id"], revision=vae_desc.get("revision"), device=device)
    except Exception as e:  # noqa: BLE001 - one clear message
        raise SampleError(
            f"cannot load the VAE {vae_desc['id']!r} named in the export: {e}. Make it available offline at the same "
            "path, or on the hub cache"
        ) from e
    want = vae_desc.get("weights_sha256")
    if want and ae.weights_sha256 and want != ae.weights_sha256:
        raise SampleError(
            f"the VAE at {vae_desc['id']} has weights sha256 {ae.weights_sha256[:12]}... but the export was trained "
            f"with {want[:12]}...: decoding with a different VAE gives wrong images"
        )
    for k in ("scaling_factor", "latent_channels"):
        if k in vae_desc and getattr(ae, k) != vae_desc[k]:
            raise SampleError(f"the VAE's {k} is {getattr(ae, k)} but the export recorded {vae_desc[k]}")
    return ae


@torch.no_grad()
def decode_to_uint8(latents: torch.Tensor, normalization, vae_desc=None, *, device="cpu", autoencoder=None) -> torch.Tensor:
    """Model-space latents -> uint8 NCHW images: exact inverse normalization, fp32 untiled VAE decode."""
    from .autoencoder import Normalization

    norm = normalization if isinstance(normalization, Normalization) else Normalization.from_dict(normalization)
    ae = autoencoder if autoencoder is not None else load_vae_for(vae_desc, device)
    raw = norm.to_raw(latents.to(torch.float32))
    img = raw if ae.is_pixel else ae.decode(raw.to(ae.device)).float()
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def image_grid(images: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> one (C, rows*H, cols*W) grid."""
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros((c, rows * h, cols * w), dtype=images.dtype)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i]
    return grid


# ----------------------------------------------------------------------------------------------
# Pretrained diffusers UNet2DModel (epsilon prediction, DDPM/VP) through VP preconditioning


class DiffusersEpsNet(torch.nn.Module):
    """``F(x, c_noise, labels)`` for :class:`~latentdiff.precond.VPPrecond` around a diffusers
    ``UNet2DModel`` trained as a DDPM epsilon predictor.

    The DDPM linear beta schedule (1e-4 .. 0.02 over 1000 steps) is the discretization of the VP
    schedule with beta_min = 0.1, beta_d = 19.9 (edm.txt Table 1 / Appendix C.1), so
    c_noise = (M - 1) sigma^-1(sigma) is the (continuous) DDPM timestep the model expects, and
    c_in = 1/sqrt(1 + sigma^2) maps x = y + sigma n to the model's input sqrt(abar) y + sqrt(1 - abar) n.
    """

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, c_noise, labels=None):
        kw = {"class_labels": labels} if labels is not None and getattr(self.unet.config, "num_class_embeds", None) else {}
        return self.unet(x, c_noise.to(x.dtype), **kw).sample


def load_diffusers_unet(path: str | Path, device="cpu"):
    """(VPPrecond denoiser, meta) for a local diffusers UNet2DModel directory (pixel space in [-1, 1])."""
    from diffusers import UNet2DModel

    from .precond import VPPrecond

    path = Path(path)
    if not (path / "config.json").is_file():
        raise SampleError(f"--diffusers-unet {path}: no config.json; pass a UNet2DModel.save_pretrained() directory")
    try:
        unet = UNet2DModel.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise SampleError(f"--diffusers-unet {path}: cannot load a UNet2DModel: {e}") from e
    cfg = unet.config
    c = int(cfg.in_channels)
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    meta = {
        "source": "diffusers-unet",
        "path": str(path),
        "shape": [c, int(size), int(size)],
        "num_classes": int(cfg.num_class_embeds or 0),
        "normalization": {"kind": "identity", "shift": [0.0] * c, "scale": [1.0] * c},
        "vae": "none",
        "schedule": {"sigma_min": 0.002},
    }
    return VPPrecond(DiffusersEpsNet(unet)).to(device).eval(), meta


# ----------------------------------------------------------------------------------------------
# the command


def _png_path(out: Path, seed: int) -> Path:
    return out / "images" / f"{seed:06d}.png"


def _valid_png(p: Path) -> bool:
    if not p.is_file() or p.stat().st_size == 0:
        return False
    try:
        from PIL import Image

        with Image.open(p) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - a partial file is simply redone
        return False


def _save_png(img_chw: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = img_chw.permute(1, 2, 0).numpy()
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(tmp, format="PNG")
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    from .solvers import SAMPLERS

    p = argparse.ArgumentParser(prog="latentdiff-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", help="export directory (model.json + safetensors) from latentdiff-export")
    src.add_argument("--diffusers-unet", help="a local diffusers UNet2DModel (epsilon-prediction DDPM) directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seeds", default="0-63", help="seed list/ranges, e.g. 0-49999 (one image per seed)")
    p.add_argument("--batch", type=int, default=64, help="images per forward per rank")
    p.add_argument("--solver", default=DEFAULT_SOLVER, choices=list(SAMPLERS), help="ODE solver")
    p.add_argument("--nfe", type=int, default=35, help="denoiser evaluations per image (budget, never exceeded)")
    p.add_argument("--steps", type=int, default=None, help="noise levels instead of an NFE budget (fixed-method solvers)")
    p.add_argument("--sigma-max", default="data", help="data (export's data-driven value), edm (80), vp (~152) or a number")
    p.add_argument("--sigma-min", type=float, default=None, help="default: the export's sigma_min (0.002)")
    p.add_argument("--rho", type=float, default=7.0)
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale w: D_u + w (D_c - D_u); 1 = conditional model")
    p.add_argument("--guidance-interval", default=None, help="sigma_lo,sigma_hi: guide only inside this interval")
    p.add_argument("--class-label", type=int, default=None, help="one class for every image (default: drawn per seed)")
    p.add_argument("--weights", default="ema", help="ema (largest rate), an EMA rate such as 0.9999, or raw")
    p.add_argument("--s-churn", type=float, default=0.0, help="edm-stochastic only")
    p.add_argument("--grid", type=int, default=64, help="images in grid.png (0 = none)")
    p.add_argument("--no-npz", action="store_true", help="do not write samples.npz")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> dict:
    from . import dist as ldist
    from .export import export_hash, load_export
    from .noise import VP_SIGMA_MAX

    seeds = parse_seeds(args.seeds)
    if args.batch < 1:
        raise SampleError("--batch must be >= 1")
    if args.guidance_interval:
        try:
            lo, hi = (float(v) for v in args.guidance_interval.split(","))
        except ValueError:
            raise SampleError(f"--guidance-interval {args.guidance_interval!r}: use sigma_lo,sigma_hi") from None
        interval = (lo, hi)
    else:
        interval = None
    ldist.init_distributed()
    rank, world, device = ldist.get_rank(), ldist.get_world_size(), ldist.device()
    out = Path(args.out)
    if args.export:
        denoiser, meta = load_export(args.export, weights=args.weights, device=device)
        shape = [int(meta["model"]["in_channels"]), int(meta["model"]["resolution"]), int(meta["model"]["resolution"])]
        num_classes = int(meta["num_classes"])
        src_hash = export_hash(args.export)
        sigma_max = resolve_sigma_max(args.sigma_max, meta)
        sigma_min = args.sigma_min or float(meta["schedule"]["sigma_min"])
        null_label = meta.get("null_label")
    else:
        denoiser, meta = load_diffusers_unet(args.diffusers_unet, device=device)
        shape, num_classes, null_label = meta["shape"], meta["num_classes"], None
        src_hash = None
        sigma_max = VP_SIGMA_MAX if args.sigma_max == "data" else resolve_sigma_max(args.sigma_max, None)
        sigma_min = args.sigma_min or 0.002
        if args.cfg != 1.0:
            raise SampleError("--cfg needs a latentdiff export with a null class")
    if args.class_label is not None and not 0 <= args.class_label < max(num_classes, 1):
        raise SampleError(f"--class-label {args.class_label} is outside [0, {num_classes})")
    if rank == 0:
        (out / "images").mkdir(parents=True, exist_ok=True)
    ldist.barrier()
    ae = load_vae_for(meta["vae"], device)
    mine = [s for s in seeds[rank::world] if not _valid_png(_png_path(out, s))]
    from tqdm import tqdm

    done = sum(1 for s in seeds if _png_path(out, s).is_file()) if rank == 0 else 0
    bar = tqdm(total=len(seeds), initial=done, disable=rank != 0 or args.no_progress, desc="sample", unit="img",
               dynamic_ncols=True)
    info_d = None
    t0 = time.time()
    for i in range(0, len(mine), args.batch):
        chunk = mine[i : i + args.batch]
        labels = torch.full((len(chunk),), args.class_label) if args.class_label is not None and num_classes else None
        z, info = generate_latents(
            denoiser, chunk, shape, labels=labels, num_classes=num_classes, method=args.solver,
            nfe=None if args.steps else args.nfe, steps=args.steps, sigma_min=sigma_min, sigma_max=sigma_max,
            rho=args.rho, cfg_scale=args.cfg, guidance_interval=interval, null_label=null_label, device=device,
            solver_kwargs={"s_churn": args.s_churn} if args.solver == "edm-stochastic" else None,
        )
        imgs = decode_to_uint8(z, meta["normalization"], autoencoder=ae)
        for s, im in zip(chunk, imgs):
            _save_png(im, _png_path(out, s))
        info_d = info.to_dict()
        bar.update(len(chunk) * world)
    bar.close()
    elapsed = time.time() - t0
    # every rank reports what its solver actually did (for sampling.json); ranks without work send None
    infos = [None] * world
    if world > 1:
        import torch.distributed as dist

        dist.all_gather_object(infos, info_d)
    else:
        infos = [info_d]
    ldist.barrier()
    result = {}
    if rank == 0:
        missing = [s for s in seeds if not _valid_png(_png_path(out, s))]
        if missing:
            raise SampleError(f"{len(missing)} images are missing after sampling (e.g. seed {missing[0]}); re-run to resume")
        info_any = next((d for d in infos if d is not None), None)
        if info_any is None:  # everything was already there: re-derive the grid once for the record
            _, info = generate_latents(
                denoiser, seeds[:1], shape, num_classes=num_classes, method=args.solver,
                nfe=None if args.steps else args.nfe, steps=args.steps, sigma_min=sigma_min, sigma_max=sigma_max,
                rho=args.rho, cfg_scale=args.cfg, guidance_interval=interval, null_label=null_label, device=device,
            )
            info_any = info.to_dict()
        from PIL import Image

        if not args.no_npz:
            arr = np.stack([np.asarray(Image.open(_png_path(out, s)).convert("RGB")) for s in seeds])
            tmp = out / "samples.npz.tmp.npz"
            np.savez(tmp, arr_0=arr)
            tmp.replace(out / "samples.npz")
        if args.grid:
            g = [torch.from_numpy(np.array(Image.open(_png_path(out, s)).convert("RGB"))).permute(2, 0, 1)
                 for s in seeds[: args.grid]]
            Image.fromarray(image_grid(torch.stack(g)).permute(1, 2, 0).numpy()).save(out / "grid.png")
        info_any.pop("labels", None)
        result = {
            "source": args.export or args.diffusers_unet,
            "export_hash": src_hash,
            "num_images": len(seeds),
            "seeds": f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else seeds,
            "solver": args.solver,
            "nfe": args.nfe if not args.steps else None,
            "steps": args.steps,
            "nfe_used": info_any["nfe"],
            "sigma_grid": info_any["sigmas"],
            "plan": info_any.get("plan"),
            "sigma_min": sigma_min,
            "sigma_max": sigma_max,
            "sigma_max_choice": args.sigma_max,
            "rho": args.rho,
            "cfg": args.cfg,
            "guidance_interval": list(interval) if interval else None,
            "class_label": args.class_label,
            "ema_profile": args.weights if args.export else None,
            "weights_file": meta.get("_weights_file"),
            "vae": meta["vae"],
            "vae_decode_precision": "fp32",
            "vae_tiling": False,
            "normalization": meta["normalization"],
            "world_size": world,
            "batch_per_rank": args.batch,
            "seconds": elapsed,
            "format": "PNG (lossless) + samples.npz (uint8 NHWC, ADM)",
        }
        (out / "sampling.json").write_text(json.dumps(result, indent=1))
    ldist.destroy()
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = run(args)
    except SampleError as e:
        print(f"latentdiff-sample: {e}", file=sys.stderr)
        return 2
    if res:
        print(f"wrote {res['num_images']} images to {args.out} ({res['solver']}, NFE used {res['nfe_used']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
