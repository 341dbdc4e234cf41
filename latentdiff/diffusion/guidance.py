"""Class conditioning for training (label dropout) and classifier-free guidance for sampling.

Label dropout (Ho & Salimans 2021, Sec. 3.2, "Classifier-free guidance"): during training each
label is replaced by the learned null class with probability ``p`` (default 0.1), so one network
learns both the conditional ``D(x; sigma, c)`` and the unconditional ``D(x; sigma, null)``.  The
null class index is whatever the model reserved (``model.null_label``, ``num_classes`` by
default); it is always passed explicitly here, never assumed.

Guidance convention (the form used by Karras et al. 2024, "Guiding a Diffusion Model with a Bad
Version of Itself", Eq. 1; Ho & Salimans Eq. 6 with ``w_here = 1 + w_theirs``)::

    D_w(x; sigma, c) = D(x; sigma, null) + w * (D(x; sigma, c) - D(x; sigma, null))

applied to **all** channels of the denoised output.  ``w = 1`` is exactly the conditional model,
``w = 0`` exactly the unconditional model, ``w > 1`` extrapolates away from the unconditional
prediction.  The conditional and unconditional evaluations are ONE batched forward of
``concat([x, x])`` with ``concat([labels, null])``.

Guidance interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
Sample and Distribution Quality in Diffusion Models", Sec. 3): with ``interval=(sigma_lo,
sigma_hi)`` guidance is applied only where ``sigma_lo <= sigma <= sigma_hi``; elsewhere the
conditional model alone is evaluated (``w = 1``, a single forward of the batch).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from latentdiff.utils.errors import ConfigError

__all__ = ["drop_labels", "guided_denoiser", "model_null_label", "resolve_null_label"]


def resolve_null_label(num_classes, null_label, owner: str) -> int:
    """Validate a model config's class conditioning; returns the null class (``num_classes`` when None).

    ``owner`` names the config in the error (e.g. ``"U-ViT"``)."""
    if not (isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 0):
        raise ConfigError(f"{owner} config field 'num_classes': must be an integer >= 0 (0 = unconditional), "
                          f"got {num_classes!r}")
    if null_label is None:
        return num_classes
    if not (isinstance(null_label, int) and not isinstance(null_label, bool) and 0 <= null_label <= num_classes):
        raise ConfigError(f"{owner} config field 'null_label': must lie in [0, num_classes={num_classes}] "
                          f"(default num_classes), got {null_label!r}")
    return null_label


def drop_labels(
    labels: torch.Tensor,
    p: float = 0.1,
    null_label: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability ``p`` (independently); returns a new tensor.

    Draws ``len(labels)`` uniforms from ``generator`` (on the generator's device), so the dropout
    pattern is reproducible per seed.  ``null_label`` is required (use ``model.null_label``).
    """
    if null_label is None:
        raise ConfigError("drop_labels: null_label is required (the model's null class, e.g. model.null_label)")
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label < 0:
        raise ConfigError(f"drop_labels: null_label must be a non-negative integer, got {null_label!r}")
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ConfigError(f"label dropout probability p must lie in [0, 1], got {p!r}")
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"drop_labels: labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    dev = generator.device if generator is not None else labels.device
    drop = torch.rand(labels.shape[0], generator=generator, device=dev).to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def model_null_label(denoiser) -> int:
    """The null class of a ``Precond`` denoiser's network (``denoiser.model.null_label``)."""
    net = getattr(denoiser, "model", denoiser)
    null = getattr(net, "null_label", None)
    if null is None:
        raise ConfigError(
            f"{type(net).__name__} has no null class (unconditional model or not built by latentdiff.models); "
            "classifier-free guidance needs a class-conditional model, or pass null_label= explicitly"
        )
    return int(null)


def _check_interval(interval) -> tuple[float, float] | None:
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ConfigError(f"guidance interval must be a pair (sigma_lo, sigma_hi) or None, got {interval!r}") from None
    if not (0.0 <= lo <= hi):
        raise ConfigError(f"guidance interval needs 0 <= sigma_lo <= sigma_hi, got ({lo}, {hi})")
    return lo, hi


def guided_denoiser(
    denoiser,
    labels: torch.Tensor,
    scale: float = 1.0,
    null_label: int | None = None,
    interval: tuple[float, float] | None = None,
    *,
    fixed_shape: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``denoise(x, sigma)`` callable for the solvers, applying classifier-free guidance.

    ``denoiser(x, sigma, labels)`` is any :class:`latentdiff.precond.Precond`; ``labels`` (B,) are
    the class labels of the batch ``denoise`` will be called with; ``scale`` is ``w`` of the
    module docstring; ``null_label`` defaults to ``denoiser.model.null_label``; ``interval`` is
    ``(sigma_lo, sigma_hi)`` or None (guidance at every sigma).  ``sigma`` may be a float or a
    (B,) tensor.  Each call runs exactly one network forward: ``w == 1`` or every sigma outside
    the interval -> the conditional batch; ``w == 0`` -> the unconditional batch; otherwise the
    conditional batch concatenated with the unconditional copies of the samples to guide.

    ``fixed_shape=True`` (for solvers with a per-image sigma): the rows inside the interval depend on
    which images share the batch, and so would the forward shape (and, through the kernels, the last
    bits).  Then every call forwards all rows twice (conditional + null class) and applies
    ``D_u + w (D_c - D_u)`` inside the interval, ``D_c`` outside -- the same formula.
    """
    scale, null, bounds = _check_guidance(denoiser, labels, scale, null_label, interval)

    def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
        b = x.shape[0]
        if labels.shape[0] != b:
            raise ValueError(f"guided denoiser was built for {labels.shape[0]} labels but called on a batch of {b}")
        y, s = labels.to(x.device), _per_row_sigma(sigma, x)
        if scale == 1.0:
            return denoiser(x, s, y)
        if fixed_shape:
            out = denoiser(torch.cat([x, x]), torch.cat([s, s]), torch.cat([y, torch.full_like(y, null)]))
            d_cond, d_uncond = out[:b], out[b:]
            inside = torch.ones_like(s, dtype=torch.bool) if bounds is None else (s >= bounds[0]) & (s <= bounds[1])
            guided = d_uncond + scale * (d_cond - d_uncond)
            return torch.where(inside.reshape(-1, *([1] * (x.ndim - 1))), guided, d_cond)
        if bounds is None:
            guide = torch.ones(b, dtype=torch.bool, device=x.device)
        else:
            guide = (s >= bounds[0]) & (s <= bounds[1])
        idx = guide.nonzero().reshape(-1)
        if idx.numel() == 0:
            return denoiser(x, s, y)
        if scale == 0.0 and idx.numel() == b:
            return denoiser(x, s, torch.full_like(y, null))
        # One batched forward: the whole batch conditionally + the samples to guide unconditionally.
        out = denoiser(
            torch.cat([x, x[idx]]), torch.cat([s, s[idx]]), torch.cat([y, torch.full_like(y[idx], null)])
        )
        d_cond, d_uncond = out[:b], out[b:]
        guided = d_uncond + scale * (d_cond[idx] - d_uncond)
        return d_cond.index_copy(0, idx, guided)

    return denoise


def _check_guidance(denoiser, labels, scale, null_label, interval):
    """Validated ``(scale, null_label, interval bounds)`` of :func:`guided_denoiser`."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ConfigError(f"guidance scale must be a finite number (1 = conditional model), got {scale!r}")
    if labels is None or labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ConfigError("guided_denoiser: labels must be a 1-D integer tensor of class labels (one per sample)")
    null = model_null_label(denoiser) if null_label is None else null_label
    if isinstance(null, bool) or not isinstance(null, int) or null < 0:
        raise ConfigError(f"guided_denoiser: null_label must be a non-negative integer, got {null!r}")
    return float(scale), null, _check_interval(interval)


def _per_row_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (a float or a 0-d/(B,) tensor) as a (B,) tensor on ``x``'s device; a Python float keeps the
    precision Precond computes in."""
    if not torch.is_tensor(sigma):
        sigma = torch.tensor(float(sigma), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    s = sigma.to(x.device)
    return s.expand(x.shape[0]) if s.ndim == 0 else s.reshape(-1)
