"""Distributed generation from an export: any solver, classifier-free guidance, exact VAE decode.

``torchrun --nproc_per_node N -m latentdiff.sample --export RUN/export/step_X --out SAMPLES --seeds 0-49999``

Determinism
-----------
* One generator per image seed: the initial noise (drawn on the CPU, then moved to the device), the
  class label of an unlabelled request and any stochastic-sampler noise come from seed ``s`` alone.
* PyTorch only promises bitwise-equal results for equal tensor shapes: BLAS/cuDNN/oneDNN pick their
  kernels (and so the order of floating-point sums) by batch size.  The sampler therefore gives every
  network forward exactly ``B = min(--batch, number of seeds)`` images and every VAE decode exactly
  ``min(--decode-batch, number of seeds)`` latents, padding a short chunk with copies of its first item
  (rows do not interact in eval mode, so the padding cannot change the real rows).  The images are then
  bitwise identical for any number of ranks, any order or split of the seeds and any resume pattern.
  Changing ``--batch`` changes the forward shape; the images stay identical only where the kernels are
  batch-size invariant (on the CPU builds we test, for batches >= 3; ``sampling.json`` records both
  sizes, and a resume with other sizes prints a warning).  On the CPU the intra-op thread count is
  part of the kernel choice too: ``torchrun`` sets ``OMP_NUM_THREADS=1`` per rank, a plain ``python``
  run uses every core, and the two can differ in the last bit of a pixel (seen on one CI machine).
  Compare CPU runs made with the same thread count (``sampling.json`` records ``intra_op_threads``).
* Seeds are split round-robin over ranks; ``SAMPLES/images/<seed:06d>.png`` that exist and verify are
  skipped (resume).  ``SAMPLES/config.json`` holds everything that determines the pixels; a resume
  with a different export, solver, NFE, sigma range, guidance, ... is refused instead of mixing sets.

Outputs
-------
Latents are mapped back with the export's exact inverse normalization (in float64) and decoded by the
VAE named in the export in fp32, untiled, outside autocast (traps T1, T3, T20); images are saved as
lossless PNG (``tEXt`` chunk ``latentdiff`` = ``{"seed": s, "label": y}``), then rank 0 writes
``samples.npz`` (``arr_0`` uint8 NHWC in seed order as ADM/EDM evaluators expect, ``arr_1`` the class
labels of a class-conditional model as ADM does, ``seeds``), ``grid.png`` and ``sampling.json``
(export hash, seeds, solver, NFE budget and the NFE actually used = counted denoiser calls, the sigma
grid, guidance scale and interval, EMA profile, decode precision, batch sizes, timing).
``sampling.json`` and ``samples.npz`` are removed when a run starts and rewritten when it completes,
so they always describe a complete set.

Pretrained bridge
-----------------
``--diffusers-unet DIR`` samples a diffusers ``UNet2DModel`` epsilon-prediction DDPM model (a
``save_pretrained`` folder, or a pipeline folder with ``unet/`` and ``scheduler/``) through VP
preconditioning (edm.txt Table 1, wsnr.txt A.4): D(x; sigma) = x - sigma eps(x / sqrt(1 + sigma^2),
999 sigma^-1(sigma)), with the same solvers.  Only the DDPM linear beta schedule (1e-4 .. 0.02, 1000
steps) is the VP schedule of edm.txt; other schedules or prediction types are refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import LatentdiffError, SampleError
from .solvers import DEFAULT_SAMPLER

__all__ = [
    "generate_latents",
    "decode_to_uint8",
    "to_uint8",
    "image_grid",
    "load_vae_for",
    "parse_seeds",
    "resolve_sigma_max",
    "check_export_meta",
    "solver_record",
    "DiffusersEpsNet",
    "load_diffusers_unet",
    "build_parser",
    "run",
    "main",
]

PNG_TEXT_KEY = "latentdiff"
CONFIG_FORMAT = "latentdiff-sample-config/1"
# fields of the fingerprint that only choose tensor shapes (see "Determinism" above): a change warns
_SHAPE_FIELDS = ("network_batch", "decode_batch")


DEFAULT_SOLVER = DEFAULT_SAMPLER
# solvers whose noise levels do not depend on the denoiser (one grid for every image); any other
# solver (``auto``: a grid per image from its data-scale estimate) is treated as adaptive
FIXED_GRID_SOLVERS = frozenset({"euler", "heun", "midpoint", "ode3", "edm-stochastic", "hybrid", "nfe-guided"})


# ----------------------------------------------------------------------------------------------
# small parsers


_SEED_PART = re.compile(r"^(\d+)(?:\s*-\s*(\d+))?$")


def parse_seeds(spec) -> list[int]:
    """``"0-49999"``, ``"0,5,9"``, ``"0-9,20-29"`` (or an int / list of ints) -> list of ints.

    Order is kept; duplicates, negative numbers and empty ranges are refused.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        parts: list = [str(spec)]
    elif isinstance(spec, (list, tuple)):
        parts = [str(int(s)) for s in spec]
    else:
        parts = str(spec).split(",")
    out: list[int] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        m = _SEED_PART.match(part)
        if m is None:
            raise SampleError(f"--seeds {spec!r}: {part!r} is neither a seed N nor a range A-B of non-negative integers")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise SampleError(f"--seeds {spec!r}: range {part} is empty (end < start)")
        out.extend(range(lo, hi + 1))
    if not out:
        raise SampleError(f"--seeds {spec!r} selects no seed; use e.g. 0-49999")
    if len(set(out)) != len(out):
        raise SampleError(f"--seeds {spec!r} lists a seed twice")
    return out


def _format_seeds(seeds: list[int]):
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return list(seeds)


def resolve_sigma_max(choice, meta: dict | None) -> float:
    """``data`` (the export's data-driven sigma_max, wsnr.txt Eq. 7-8), ``edm`` (80, edm.txt Table 1),
    ``vp`` (sigma(t=1) ~ 152 of the VP schedule) or a positive number."""
    from .noise import EDM_SIGMA_MAX, VP_SIGMA_MAX

    choice = str(choice).strip()
    if choice == "edm":
        return float(EDM_SIGMA_MAX)
    if choice == "vp":
        return float(VP_SIGMA_MAX)
    if choice == "data":
        sched = (meta or {}).get("schedule") or {}
        if "sigma_max" not in sched:
            raise SampleError(
                "--sigma-max data needs the export's data-driven schedule.sigma_max, which is missing; "
                "re-export the run, or pass --sigma-max edm, vp or a number"
            )
        return float(sched["sigma_max"])
    try:
        v = float(choice)
    except ValueError:
        raise SampleError(f"--sigma-max {choice!r}: use data, edm, vp or a positive number") from None
    if not (v > 0 and math.isfinite(v)):
        raise SampleError(f"--sigma-max {choice!r} must be a positive finite number")
    return v


def _parse_interval(spec):
    if spec is None or spec == "":
        return None
    if isinstance(spec, (list, tuple)):
        vals = list(spec)
    else:
        vals = str(spec).split(",")
    try:
        lo, hi = (float(v) for v in vals)
    except ValueError:
        raise SampleError(f"--guidance-interval {spec!r}: use sigma_lo,sigma_hi (e.g. 0.28,2.9)") from None
    if not (0 <= lo <= hi and math.isfinite(hi)):
        raise SampleError(f"--guidance-interval {spec!r}: need 0 <= sigma_lo <= sigma_hi < inf")
    return (lo, hi)


# ----------------------------------------------------------------------------------------------
# export checks beyond export.load_export (trap T14: the sampler reuses the stored schedule and
# refuses metadata that does not add up)


def _is_pixel_vae(vae_desc) -> bool:
    return vae_desc == "none" or (isinstance(vae_desc, dict) and vae_desc.get("kind") == "none")


def check_export_meta(meta: dict, where: str = "model.json") -> None:
    """Raise :class:`SampleError` when the export's normalization / sigma schedule / VAE / class
    metadata is inconsistent.  ``load_export`` already checked the presence of the fields, the
    normalization's channel count against the model, sigma_data against the preconditioning and
    0 < sigma_min < sigma_max; this adds the cross-checks the sampler relies on."""
    from .autoencoder import Normalization
    from .noise import data_driven_sigma_max

    model, sched, norm_d, vae = meta["model"], meta["schedule"], meta["normalization"], meta["vae"]
    c, res = int(model["in_channels"]), int(model["resolution"])
    try:
        norm = Normalization.from_dict(norm_d)
    except ValueError as e:
        raise SampleError(f"{where}: normalization is invalid ({e}); re-export the run") from None
    if norm.kind not in ("sd", "channel", "identity"):
        raise SampleError(f"{where}: normalization.kind {norm.kind!r} is not one of sd/channel/identity")
    if norm.channels != c:
        raise SampleError(f"{where}: normalization has {norm.channels} channels but model.in_channels is {c}")
    if _is_pixel_vae(vae):
        vae_c = 3
    else:
        if not isinstance(vae, dict) or vae.get("latent_channels") is None:
            raise SampleError(f"{where}: vae.latent_channels is missing; re-export the run (the VAE description is incomplete)")
        vae_c = int(vae["latent_channels"])
        if norm.kind == "sd":
            sf, sh = float(vae.get("scaling_factor", float("nan"))), float(vae.get("shift_factor") or 0.0)
            if not all(math.isclose(s, sf, rel_tol=1e-12) for s in norm.scale) or not all(
                math.isclose(s, sh, rel_tol=1e-12, abs_tol=1e-15) for s in norm.shift
            ):
                raise SampleError(
                    f"{where}: normalization kind 'sd' must use the VAE's scaling_factor {sf} and shift_factor {sh}, "
                    f"but it has scale {list(norm.scale)} and shift {list(norm.shift)}"
                )
    if vae_c != c:
        raise SampleError(f"{where}: the VAE has {vae_c} latent channels but model.in_channels is {c}")
    shape = (meta.get("dataset") or {}).get("sample_shape")
    if shape is not None and [int(v) for v in shape] != [c, res, res]:
        raise SampleError(
            f"{where}: the model takes ({c}, {res}, {res}) but dataset.sample_shape is {list(shape)}; "
            "the export does not belong to this dataset"
        )
    smin, smax = sched.get("sigma_min"), sched.get("sigma_max")
    if not (isinstance(smin, (int, float)) and isinstance(smax, (int, float)) and 0 < smin < smax and math.isfinite(smax)):
        raise SampleError(f"{where}: schedule needs 0 < sigma_min < sigma_max < inf, got {smin}, {smax}")
    rule = sched.get("sigma_max_rule")
    if isinstance(rule, dict) and all(k in rule for k in ("alpha", "mu_d", "sigma_d")):
        want = data_driven_sigma_max((rule["mu_d"], rule["sigma_d"]), rule["alpha"])
        if not math.isclose(want, float(smax), rel_tol=1e-9):
            raise SampleError(
                f"{where}: schedule.sigma_max = {smax} but schedule.sigma_max_rule (alpha {rule['alpha']}, "
                f"mu_d {rule['mu_d']}, sigma_d {rule['sigma_d']}) gives sqrt(mu_d + alpha sigma_d) = {want}; "
                "the export was edited by hand - re-export the run"
            )
    sd = sched.get("sigma_data")
    if not (isinstance(sd, (int, float)) and sd > 0 and math.isfinite(sd)):
        raise SampleError(f"{where}: schedule.sigma_data must be a positive number, got {sd!r}")
    nc = int(meta["num_classes"])
    if int(model.get("num_classes", 0) or 0) != nc:
        raise SampleError(f"{where}: num_classes is {nc} but model.num_classes is {model.get('num_classes')}")
    if nc > 0:
        model_null = model.get("null_label")
        model_null = nc if model_null is None else int(model_null)
        if meta.get("null_label") is None or int(meta["null_label"]) != model_null:
            raise SampleError(
                f"{where}: null_label is {meta.get('null_label')!r} but the model's null class is {model_null}; "
                "guidance would use the wrong unconditional label"
            )


# ----------------------------------------------------------------------------------------------
# generation


def _seed_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _solver_budget(nfe, steps) -> dict:
    return {"steps": int(steps)} if steps is not None else {"nfe": None if nfe is None else int(nfe)}


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
    pad_to: int | None = None,
):
    """Model-space latents for ``seeds`` (one generator per seed) and the solver's ``SampleInfo``.

    ``denoiser(x, sigma, labels)`` is a :class:`~latentdiff.precond.Precond`.  ``labels``: None (a
    class-conditional model then gets a label drawn from each seed's generator, after its noise), or
    (B,) ints.  ``steps`` (noise levels) replaces the ``nfe`` budget when given.  ``pad_to``: run the
    solver on exactly this many rows (copies of the first seed fill the rest, each with its own
    generator) so the forward shapes do not depend on how many seeds this call got; only the real
    rows are returned.  ``cfg_scale == 1`` evaluates the conditional model alone (one forward).
    """
    from .guidance import guided_denoiser
    from .solvers import sample

    seeds = [int(s) for s in seeds]
    n = len(seeds)
    if n == 0:
        raise SampleError("generate_latents: no seeds given")
    pad = 0 if pad_to is None else int(pad_to) - n
    if pad < 0:
        raise SampleError(f"generate_latents: {n} seeds do not fit pad_to={pad_to}")
    gens = [_seed_generator(s) for s in seeds]
    noise = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in gens]
    if num_classes > 0:
        if labels is None:
            labels = torch.stack([torch.randint(num_classes, (), generator=g) for g in gens])
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.shape != (n,):
            raise SampleError(f"got {tuple(labels.shape)} labels for {len(seeds)} seeds")
    if pad:
        noise += [noise[0]] * pad
        gens += [_seed_generator(seeds[0]) for _ in range(pad)]  # own objects: no shared state
        if labels is not None:
            labels = torch.cat([labels, labels[:1].expand(pad)])
    x = torch.stack(noise).to(device, dtype)
    if num_classes > 0:
        y = labels.to(device)
        if cfg_scale == 1.0:  # exactly the conditional model (what guided_denoiser does at w = 1)

            def denoise(v, s):
                return denoiser(v, s, y)

        elif guidance_interval is not None and method not in FIXED_GRID_SOLVERS:
            denoise = _fixed_shape_guidance(denoiser, y, cfg_scale, null_label, guidance_interval)
        else:
            denoise = guided_denoiser(denoiser, y, scale=cfg_scale, null_label=null_label, interval=guidance_interval)
    else:
        if cfg_scale != 1.0:
            raise SampleError("classifier-free guidance (--cfg != 1) needs a class-conditional model")

        def denoise(v, s):
            return denoiser(v, s, None)

    kw = dict(solver_kwargs or {})
    if method == "edm-stochastic":
        kw.setdefault("generator", gens)
    out, info = sample(denoise, x, method=method, **_solver_budget(nfe, steps), sigma_min=sigma_min,
                       sigma_max=sigma_max, rho=rho, return_info=True, **kw)
    info.extra["labels"] = None if labels is None else labels[:n].tolist()
    info.extra["rows"] = n + pad
    return out[:n], info


def _fixed_shape_guidance(denoiser, labels, scale: float, null_label, interval):
    """Guidance with a per-image sigma (adaptive solvers) at a fixed forward shape.

    ``guidance.guided_denoiser`` forwards the batch plus copies of the rows inside the interval; with
    one sigma per image that row count depends on which images share the batch, so the forward shape
    (and, through the kernels, the last bits) would depend on the batch composition.  Here every call
    forwards all rows twice (conditional + null class) and combines
    ``D_u + w (D_c - D_u)`` inside the interval, ``D_c`` outside -- the same formula as guided_denoiser.
    """
    from .guidance import model_null_label

    lo, hi = _parse_interval(interval)
    null = model_null_label(denoiser) if null_label is None else int(null_label)

    def denoise(x, sigma):
        b = x.shape[0]
        s = torch.as_tensor(sigma, device=x.device)
        s = s.expand(b) if s.ndim == 0 else s.reshape(-1)
        out = denoiser(torch.cat([x, x]), torch.cat([s, s]), torch.cat([labels, torch.full_like(labels, null)]))
        d_cond, d_uncond = out[:b], out[b:]
        guide = ((s >= lo) & (s <= hi)).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(guide, d_uncond + scale * (d_cond - d_uncond), d_cond)

    return denoise


def solver_record(
    *,
    method: str,
    nfe: int | None,
    steps: int | None,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    shape=(1, 1, 1),
    solver_kwargs: dict | None = None,
):
    """What the solver will do, without a network: the ``SampleInfo`` of a run on a zero denoiser.

    The sigma grid, the plan and the number of denoiser calls do not depend on the denoiser's
    output, so this validates the settings (a :class:`SampleError` names the problem) and gives the
    record ``sampling.json`` stores even when every image already existed.
    """
    from .solvers import sample

    kw = dict(solver_kwargs or {})
    if method == "edm-stochastic":
        kw.setdefault("generator", [torch.Generator().manual_seed(0)])
    try:
        _, info = sample(lambda x, s: torch.zeros_like(x), torch.zeros((1, *shape)), method=method,
                         **_solver_budget(nfe, steps), sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                         return_info=True, **kw)
    except (ValueError, TypeError) as e:
        raise SampleError(f"--solver {method}: {e}") from None
    return info


def network_evals_per_image(eval_sigmas, cfg_scale: float, interval, method: str = "nfe-guided") -> int:
    """Network evaluations per image: one per denoiser call, two where guidance runs the conditional
    and the unconditional model (``guidance.guided_denoiser``: w not in {0, 1}, sigma inside the
    interval; an adaptive solver with an interval always runs both, see ``_fixed_shape_guidance``)."""
    if cfg_scale == 1.0 or (cfg_scale == 0.0 and interval is None):
        return len(eval_sigmas)
    if interval is None or method not in FIXED_GRID_SOLVERS:
        return 2 * len(eval_sigmas)
    if cfg_scale == 0.0:
        return len(eval_sigmas)
    lo, hi = interval
    return sum(2 if lo <= s <= hi else 1 for s in eval_sigmas)


# ----------------------------------------------------------------------------------------------
# decoding


def load_vae_for(vae_desc, device="cpu", *, path=None):
    """The Autoencoder an export names (``path`` overrides where it is loaded from); refuses a VAE
    whose weights sha256, revision or scaling differ from what the export recorded."""
    from .autoencoder import Autoencoder

    if _is_pixel_vae(vae_desc):
        if path is not None:
            raise SampleError(f"--vae {path}: this model is pixel-space (its export names no VAE)")
        return Autoencoder(None, device=device)
    if not isinstance(vae_desc, dict) or not vae_desc.get("id"):
        raise SampleError(f"the export's VAE description is incomplete: {vae_desc!r}; re-export the run")
    spec = str(path) if path is not None else vae_desc["id"]
    try:
        ae = Autoencoder.load(spec, revision=vae_desc.get("revision") if path is None else None, device=device)
    except Exception as e:  # noqa: BLE001 - one clear message
        raise SampleError(
            f"cannot load the VAE {spec!r} named in the export: {e}. Make it available at that path (or in the hub "
            "cache), or pass --vae DIR pointing at a copy of the same weights"
        ) from e
    want = vae_desc.get("weights_sha256")
    if want and ae.weights_sha256 != want:
        got = (ae.weights_sha256 or "unknown")[:12]
        raise SampleError(
            f"the VAE at {spec} has weights sha256 {got}... but the export was trained with {want[:12]}... "
            "(vae.weights_sha256): decoding with a different VAE gives wrong images; pass --vae with the right weights"
        )
    rev = vae_desc.get("revision")
    if path is None and rev and ae.revision and ae.revision != rev:
        raise SampleError(f"the VAE {spec} resolved to revision {ae.revision} but the export recorded {rev}")
    for k in ("scaling_factor", "shift_factor", "latent_channels", "downsampling_factor"):
        if k in vae_desc and getattr(ae, k) != vae_desc[k]:
            raise SampleError(f"the VAE's {k} is {getattr(ae, k)} but the export recorded vae.{k} = {vae_desc[k]}")
    return ae  # untiled, unsliced fp32 decode outside autocast: Autoencoder.decode (trap T20)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 by round((x + 1) * 127.5), the exact inverse of the encoder's
    ``p / 127.5 - 1``; values outside [-1, 1] are clamped."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def decode_to_uint8(
    latents: torch.Tensor,
    normalization,
    vae_desc=None,
    *,
    device="cpu",
    autoencoder=None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Model-space latents -> uint8 NCHW images on the CPU.

    Exact inverse normalization ``raw = model / scale + shift`` (computed in float64), then an fp32,
    untiled VAE decode outside autocast.  ``batch_size``: decode in chunks of exactly this many latents
    (the last chunk padded with copies of its last latent), so the result does not depend on how many
    latents one call gets.
    """
    from .autoencoder import Normalization

    norm = normalization if isinstance(normalization, Normalization) else Normalization.from_dict(normalization)
    if latents.ndim != 4 or latents.shape[1] != norm.channels:
        raise SampleError(
            f"decode: latents of shape {tuple(latents.shape)} do not match the normalization's {norm.channels} channels"
        )
    ae = autoencoder if autoencoder is not None else load_vae_for(vae_desc, device)
    n = latents.shape[0]
    step = int(batch_size) if batch_size else max(n, 1)
    out = []
    for i in range(0, n, step):
        z = latents[i : i + step]
        k = z.shape[0]
        if k < step and batch_size:
            z = torch.cat([z, z[-1:].expand(step - k, *z.shape[1:])])
        raw = norm.to_raw(z.to(torch.float64)).to(torch.float32)
        img = raw if ae.is_pixel else ae.decode(raw.to(ae.device), precision="fp32")
        out.append(to_uint8(img[:k]).cpu())
    return torch.cat(out) if out else torch.zeros((0, 3, 0, 0), dtype=torch.uint8)


def image_grid(images: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> one (C, rows*H, cols*W) grid."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise SampleError(f"image_grid needs a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
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

# the DDPM schedule that is the VP schedule of edm.txt (beta_min = 0.1, beta_d = 19.9, M = 1000)
_DDPM_LINEAR = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000}


class DiffusersEpsNet(torch.nn.Module):
    """``F(x, c_noise, labels)`` for :class:`~latentdiff.precond.VPPrecond` around a diffusers
    ``UNet2DModel`` trained as a DDPM epsilon predictor.

    The DDPM linear beta schedule (1e-4 .. 0.02 over 1000 steps) is the discretization of the VP
    schedule with beta_min = 0.1, beta_d = 19.9 (edm.txt Table 1 / Appendix C.1), so
    c_noise = (M - 1) sigma^-1(sigma) is the (continuous) DDPM timestep the model expects, and
    c_in = 1/sqrt(1 + sigma^2) maps x = y + sigma n to the model's input sqrt(abar) y + sqrt(1 - abar) n.
    A model with learned variances (``out_channels = 2 in_channels``, iDDPM/ADM style) returns
    [eps, v]; the first half is epsilon.
    """

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        cin, cout = int(unet.config.in_channels), int(unet.config.out_channels)
        if cout not in (cin, 2 * cin):
            raise SampleError(
                f"UNet2DModel has in_channels {cin} and out_channels {cout}: an epsilon predictor has out_channels = "
                "in_channels (or 2x with learned variances)"
            )
        self.in_channels = cin

    def forward(self, x, c_noise, labels=None):
        kw = {"class_labels": labels} if labels is not None and getattr(self.unet.config, "num_class_embeds", None) else {}
        out = self.unet(x, c_noise.to(x.dtype), **kw).sample
        return out[:, : self.in_channels]


def _files_hash(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def load_diffusers_unet(path: str | Path, device="cpu"):
    """(VPPrecond denoiser, meta) for a local diffusers UNet2DModel directory (pixel space in [-1, 1]).

    ``path``: a ``UNet2DModel.save_pretrained`` folder, or a pipeline folder with ``unet/`` (and
    ``scheduler/``).  A scheduler config beside it (``scheduler/scheduler_config.json`` or
    ``scheduler_config.json``) must describe the DDPM linear schedule with epsilon prediction;
    without one that schedule is assumed (and recorded as assumed).
    """
    from diffusers import UNet2DModel

    from .precond import VPPrecond

    path = Path(path)
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (unet_dir / "config.json").is_file():
        raise SampleError(
            f"--diffusers-unet {path}: no config.json (nor unet/config.json); pass a UNet2DModel.save_pretrained() "
            "directory or a diffusers pipeline folder"
        )
    sched_file = next((p for p in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                                   unet_dir / "scheduler_config.json") if p.is_file()), None)
    scheduler = {"assumed": dict(_DDPM_LINEAR, prediction_type="epsilon")}
    if sched_file is not None:
        sc = json.loads(sched_file.read_text())
        bad = []
        if sc.get("prediction_type", "epsilon") != "epsilon":
            bad.append(f"prediction_type {sc.get('prediction_type')!r} (need 'epsilon')")
        if sc.get("beta_schedule", "linear") != "linear":
            bad.append(f"beta_schedule {sc.get('beta_schedule')!r} (need 'linear')")
        for k in ("beta_start", "beta_end", "num_train_timesteps"):
            if k in sc and not math.isclose(float(sc[k]), float(_DDPM_LINEAR[k]), rel_tol=1e-6):
                bad.append(f"{k} {sc[k]} (need {_DDPM_LINEAR[k]})")
        if sc.get("trained_betas"):
            bad.append("trained_betas (need the linear schedule)")
        if bad:
            raise SampleError(
                f"--diffusers-unet {path}: {sched_file.name} has " + ", ".join(bad) + "; the VP bridge is exact only for "
                "DDPM epsilon models with the linear beta schedule 1e-4..0.02 over 1000 steps (edm.txt Table 1, VP)"
            )
        scheduler = {"file": str(sched_file), **{k: sc.get(k) for k in ("prediction_type", *_DDPM_LINEAR)}}
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, torch_dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise SampleError(f"--diffusers-unet {path}: cannot load a UNet2DModel from {unet_dir}: {e}") from e
    cfg = unet.config
    c = int(cfg.in_channels)
    size = cfg.sample_size
    h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    weights = sorted(p for p in unet_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    meta = {
        "source": "diffusers-unet",
        "path": str(path),
        "shape": [c, h, w],
        "num_classes": int(cfg.num_class_embeds or 0),
        "normalization": {"kind": "identity", "shift": [0.0] * c, "scale": [1.0] * c},
        "vae": "none",
        "precond": {"kind": "vp", "beta_d": 19.9, "beta_min": 0.1, "M": 1000},
        "scheduler": scheduler,
        "schedule": {"sigma_min": 0.002},
        "hash": _files_hash([unet_dir / "config.json", *weights]),
    }
    return VPPrecond(DiffusersEpsNet(unet)).to(device).eval(), meta


# ----------------------------------------------------------------------------------------------
# files


def _png_path(out: Path, seed: int) -> Path:
    return out / "images" / f"{seed:06d}.png"


def _valid_png(p: Path, size: tuple[int, int] | None = None) -> bool:
    """A complete PNG (all chunk CRCs verified) of the expected (width, height)."""
    try:
        if p.stat().st_size == 0:
            return False
        from PIL import Image

        with Image.open(p) as im:
            if im.format != "PNG" or (size is not None and im.size != size):
                return False
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - a missing or partial file is simply redone
        return False


def _save_png(img_chw: torch.Tensor, path: Path, text: dict | None = None) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    arr = img_chw.permute(1, 2, 0).numpy()
    info = None
    if text is not None:
        info = PngInfo()
        info.add_text(PNG_TEXT_KEY, json.dumps(text, sort_keys=True))
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)


def _read_png(path: Path) -> tuple[np.ndarray, dict]:
    from PIL import Image

    with Image.open(path) as im:
        text = json.loads(im.text.get(PNG_TEXT_KEY, "{}")) if hasattr(im, "text") else {}
        return np.asarray(im.convert("RGB")), text


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# the command


def build_parser() -> argparse.ArgumentParser:
    from .solvers import SAMPLERS

    p = argparse.ArgumentParser(prog="latentdiff-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", help="export directory (model.json + safetensors) from latentdiff-export")
    src.add_argument("--diffusers-unet", help="a local diffusers UNet2DModel (epsilon-prediction DDPM) or pipeline directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seeds", default="0-63", help="seed list/ranges, e.g. 0-49999 (one image per seed)")
    p.add_argument("--batch", type=int, default=64, help="images per network forward per rank (fixed forward shape)")
    p.add_argument("--decode-batch", type=int, default=8, help="latents per VAE decode (fixed decode shape)")
    p.add_argument("--solver", default=DEFAULT_SOLVER, choices=list(SAMPLERS), help=f"ODE solver (default {DEFAULT_SOLVER})")
    p.add_argument("--nfe", type=int, default=35, help="denoiser evaluations per image (budget, never exceeded)")
    p.add_argument("--steps", type=int, default=None,
                   help="noise levels instead of an NFE budget (fixed-method solvers; required by hybrid)")
    p.add_argument("--sigma-max", default="data", help="data (export's data-driven value), edm (80), vp (~152) or a number")
    p.add_argument("--sigma-min", type=float, default=None, help="default: the export's sigma_min (0.002)")
    p.add_argument("--rho", type=float, default=7.0, help="Karras grid exponent (edm.txt Eq. 5)")
    p.add_argument("--placement", choices=("log", "classical"), default=None,
                   help="RK stage noise levels: log (wsnr.txt Alg. 3, default) or classical")
    p.add_argument("--h-tau", type=float, default=None, help="nfe-guided: step-size threshold of Algorithm 1")
    p.add_argument("--num-ode3", type=int, default=None, help="hybrid: number of third-order steps (largest sigma first)")
    p.add_argument("--midpoint", action="store_true", help="hybrid: midpoint instead of Heun for the second-order steps")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale w: D_u + w (D_c - D_u); 1 = conditional model")
    p.add_argument("--guidance-interval", default=None, help="sigma_lo,sigma_hi: guide only inside this interval")
    p.add_argument("--class-label", type=int, default=None, help="one class for every image (default: drawn per seed)")
    p.add_argument("--weights", default="ema", help="ema (largest rate), an EMA rate such as 0.9999, or raw")
    p.add_argument("--vae", default=None, help="load the export's VAE from this directory (its sha256 is still checked)")
    p.add_argument("--s-churn", type=float, default=None, help="edm-stochastic: S_churn (default 0)")
    p.add_argument("--s-tmin", type=float, default=None, help="edm-stochastic: S_tmin")
    p.add_argument("--s-tmax", type=float, default=None, help="edm-stochastic: S_tmax")
    p.add_argument("--s-noise", type=float, default=None, help="edm-stochastic: S_noise")
    p.add_argument("--grid", type=int, default=64, help="images in grid.png (0 = none)")
    p.add_argument("--no-npz", action="store_true", help="do not write samples.npz")
    p.add_argument("--no-progress", action="store_true")
    return p


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
    from .noise import VP_SIGMA_MAX

    if args.export:
        from .export import load_export

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
    _atomic_write_text(cfg_path, json.dumps(record, indent=1, sort_keys=True))
    return None, notes


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def run(args) -> dict:
    """The command body; returns sampling.json's content on rank 0 ({} on the others)."""
    from . import dist as ldist

    seeds = parse_seeds(args.seeds)
    _check_args(args)
    interval = _parse_interval(args.guidance_interval)
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
    from tqdm import tqdm

    from .export import export_hash

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

    mine = [s for s in seeds[rank::world] if not _valid_png(_png_path(out, s), img_size)]
    todo = _all_gather(len(mine))
    bar = tqdm(total=len(seeds), initial=len(seeds) - sum(todo), disable=rank != 0 or args.no_progress,
               desc="sample", unit="img", dynamic_ncols=True)
    from concurrent.futures import ThreadPoolExecutor

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
                writer.submit(_save_png, im, _png_path(out, s),
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
    adaptive = args.solver not in FIXED_GRID_SOLVERS
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
    missing = [s for s in seeds if not _valid_png(_png_path(out, s), img_size)]
    if missing:
        raise SampleError(f"{len(missing)} images are missing after sampling (e.g. seed {missing[0]}); re-run to resume")
    num_classes = src["num_classes"]
    arr = labels = None
    if not args.no_npz or args.grid:
        first = _read_png(_png_path(out, seeds[0]))[0]
        count = len(seeds) if not args.no_npz else min(args.grid, len(seeds))
        arr = np.empty((count, *first.shape), dtype=np.uint8)
        labels = np.full((count,), -1, dtype=np.int64)
        for i, s in enumerate(seeds[:count]):
            a, text = _read_png(_png_path(out, s))
            arr[i] = a
            if "label" in text:
                labels[i] = int(text["label"])
    if not args.no_npz:
        tmp = out / "samples.npz.tmp.npz"
        extra = {"arr_1": labels} if num_classes > 0 else {}
        np.savez(tmp, arr_0=arr, **extra, seeds=np.asarray(seeds, dtype=np.int64))
        tmp.replace(out / "samples.npz")
    if args.grid:
        from PIL import Image

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
    _atomic_write_text(out / "sampling.json", json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = run(args)
    except LatentdiffError as e:  # SampleError, ExportError, ConfigError: one line naming the field and the fix
        print(f"latentdiff-sample: {e}", file=sys.stderr)
        return 2
    if res:
        print(f"wrote {res['num_images']} images to {args.out} ({res['solver']}, NFE used {res['nfe_used']}, "
              f"{res['generated_this_run']} generated now)")
    return 0


def cli() -> None:
    """Console-script entry point: ``main`` then a hard exit (see ``latentdiff.dist.hard_exit``)."""
    from .dist import hard_exit

    hard_exit(main())


if __name__ == "__main__":
    cli()
