"""Latents from seeds: one generator per seed, any solver, classifier-free guidance at a fixed forward shape.

Also the checks the sampler relies on beyond ``export.load_export`` (trap T14: the sampler reuses the
stored schedule and refuses metadata that does not add up), the sigma_max choice (data-driven,
wsnr.txt Eq. 7-8, or EDM / VP) and the solver record ``sampling.json`` stores.
"""
from __future__ import annotations

import math

import torch

from .decoding import is_pixel_vae
from .errors import SampleError
from .solvers import DEFAULT_SAMPLER, FIXED_GRID_SAMPLERS

__all__ = [
    "DEFAULT_SOLVER",
    "FIXED_GRID_SOLVERS",
    "resolve_sigma_max",
    "parse_guidance_interval",
    "check_export_meta",
    "generate_latents",
    "solver_record",
    "network_evals_per_image",
]

DEFAULT_SOLVER = DEFAULT_SAMPLER
FIXED_GRID_SOLVERS = FIXED_GRID_SAMPLERS  # one grid for every image; any other solver is adaptive


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


def parse_guidance_interval(spec):
    """``"lo,hi"`` or a pair -> ``(lo, hi)`` with 0 <= lo <= hi < inf (None or "" -> None)."""
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
    if is_pixel_vae(vae):
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

    lo, hi = parse_guidance_interval(interval)
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
