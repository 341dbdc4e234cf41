"""Latents from seeds: one generator per seed, any registered solver, classifier-free guidance at a
fixed forward shape.

The initial noise, the class label of an unlabelled request and any stochastic-sampler noise come
from the seed's own generator, so an image depends on its seed alone, never on the batch it shares.
"""
from __future__ import annotations

import torch

from latentdiff.diffusion.guidance import guided_denoiser
from latentdiff.solvers.registry import DEFAULT_SAMPLER, FIXED_GRID_SAMPLERS, budget_kwargs, sample
from latentdiff.utils.errors import SampleError

__all__ = ["generate_latents", "seed_generator"]


def seed_generator(seed: int) -> torch.Generator:
    """The CPU generator of one image seed."""
    return torch.Generator().manual_seed(int(seed))


@torch.no_grad()
def generate_latents(
    denoiser,
    seeds,
    shape,
    *,
    labels=None,
    num_classes: int = 0,
    method: str = DEFAULT_SAMPLER,
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
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    gens, x, labels = _seed_noise_and_labels(seeds, shape, labels, num_classes, pad_to)
    x = x.to(device, dtype)
    pad = x.shape[0] - n
    denoise = _conditioned(denoiser, labels, num_classes, method, cfg_scale, guidance_interval, null_label, device)
    kw = dict(solver_kwargs or {})
    if method == "edm-stochastic":
        kw.setdefault("generator", gens)
    out, info = sample(denoise, x, method=method, **budget_kwargs(nfe, steps), sigma_min=sigma_min,
                       sigma_max=sigma_max, rho=rho, return_info=True, **kw)
    info.extra["labels"] = None if labels is None else labels[:n].tolist()
    info.extra["rows"] = n + pad
    return out[:n], info


def _seed_noise_and_labels(seeds: list[int], shape, labels, num_classes: int, pad_to: int | None):
    """Each seed's generator, its noise (stacked, padded to ``pad_to`` rows with copies of the first seed,
    each copy with its own generator) and the (padded) labels; a conditional model without ``labels``
    gets one drawn from each seed's generator after its noise."""
    n = len(seeds)
    if n == 0:
        raise SampleError("generate_latents: no seeds given")
    pad = 0 if pad_to is None else int(pad_to) - n
    if pad < 0:
        raise SampleError(f"generate_latents: {n} seeds do not fit pad_to={pad_to}")
    gens = [seed_generator(s) for s in seeds]
    noise = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in gens]
    if num_classes > 0:
        if labels is None:
            labels = torch.stack([torch.randint(num_classes, (), generator=g) for g in gens])
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.shape != (n,):
            raise SampleError(f"got {tuple(labels.shape)} labels for {n} seeds")
    if pad:
        noise += [noise[0]] * pad
        gens += [seed_generator(seeds[0]) for _ in range(pad)]  # own objects: no shared state
        if labels is not None:
            labels = torch.cat([labels, labels[:1].expand(pad)])
    return gens, torch.stack(noise), labels


def _conditioned(denoiser, labels, num_classes: int, method: str, cfg_scale: float, guidance_interval,
                 null_label, device):
    """The solvers' ``denoise(x, sigma)``: the conditional model at ``cfg_scale == 1`` (one forward, what
    guided_denoiser does at w = 1), classifier-free guidance otherwise, the unconditional model without classes."""
    if num_classes > 0:
        y = labels.to(device)
        if cfg_scale == 1.0:
            return lambda v, s: denoiser(v, s, y)
        fixed = guidance_interval is not None and method not in FIXED_GRID_SAMPLERS
        return guided_denoiser(denoiser, y, scale=cfg_scale, null_label=null_label, interval=guidance_interval,
                               fixed_shape=fixed)
    if cfg_scale != 1.0:
        raise SampleError("classifier-free guidance (--cfg != 1) needs a class-conditional model")
    return lambda v, s: denoiser(v, s, None)
