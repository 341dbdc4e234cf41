"""Common interface of the training sigma distributions, the generic shift, and the dict registry.

All distributions live in the EDM parametrization ``x = y + sigma n`` (edm.txt Eq. 1-2, Table 1:
unit signal scale ``s(t) = 1``); a schedule written with a signal scale ``alpha`` (VP, rectified
flow, cosine) is brought there by dividing ``x`` by ``alpha``, which makes
``sigma = sigma_t / alpha_t = exp(-logSNR / 2)``.

Every distribution is a frozen dataclass and works on ``lambda = ln(sigma)`` internally
(``_cdf_log``, ``_quantile_log``, ``_log_pdf_log``); the public methods take and return sigma:

* ``sample(n, generator=None, device=None)`` -> (n,) float64 sigmas,
* ``cdf(sigma)``, ``quantile(q)``, ``log_pdf(sigma)`` (log density *of ln sigma* at ``ln sigma``),
* ``median_log_sigma`` (float), ``shift(log_factor)``, ``to_dict()``, ``describe()``.

A shift multiplies sigma by ``exp(log_factor)``, i.e. translates the law of ``ln sigma``:
``cdf'(sigma) = cdf(sigma e^-c)``, ``quantile'(q) = e^c quantile(q)``, ``p'(lambda) = p(lambda - c)``.

Bad parameters raise :class:`~latentdiff.utils.errors.ConfigError` naming ``<Class>.<field>``;
bad call arguments (``n``, ``q``, NaN sigmas) raise ``ValueError``.  The families register their
``kind`` with :func:`register` in :mod:`latentdiff.diffusion.noise`, which re-exports
:func:`sigma_distribution_from_dict` (import it from there so the registry is filled).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from latentdiff.utils.errors import ConfigError

__all__ = ["SigmaDistribution", "Shifted", "sigma_distribution_from_dict", "register", "check_real", "check_int",
           "check_levels", "as64", "log_sigma", "draw_device", "draw"]

_REGISTRY: dict[str, type] = {}


def register(kind: str):
    """Class decorator: record ``cls`` under ``kind`` for :func:`sigma_distribution_from_dict`."""

    def deco(cls):
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return deco


def check_real(cls_name: str, field: str, value, *, lo=None, hi=None, lo_open=True, hi_open=True) -> None:
    """Refuse a non-real, non-finite or out-of-range parameter with a message naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{cls_name}.{field} must be a finite real number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{cls_name}.{field} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ConfigError(f"{cls_name}.{field} must be {'<' if hi_open else '<='} {hi}, got {value!r}")


def check_int(cls_name: str, field: str, value, *, lo: int) -> None:
    """Refuse a non-integer (bools and floats included) or an integer below ``lo``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ConfigError(f"{cls_name}.{field} must be an integer >= {lo}, got {value!r}")


def as64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def log_sigma(sigma) -> torch.Tensor:
    """``ln sigma`` with ``-inf`` for ``sigma <= 0`` (so ``cdf(0) = 0``); NaN is refused."""
    s = as64(sigma)
    if torch.isnan(s).any():
        raise ValueError("sigma contains NaN")
    return torch.where(s > 0, torch.log(s.clamp_min(torch.finfo(torch.float64).tiny)), -torch.inf)


def check_levels(q) -> torch.Tensor:
    """``q`` as float64, refusing levels outside [0, 1] (and NaN)."""
    q = as64(q)
    if torch.isnan(q).any() or (q < 0).any() or (q > 1).any():
        raise ValueError("quantile levels q must lie in [0, 1]")
    return q


def draw_device(n: int, generator: torch.Generator | None, device):
    """The device to draw ``n`` values on: the generator's if given (its stream is device-bound), else ``device``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return generator.device if generator is not None else (device or "cpu")


def draw(kind: str, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(n,) float64 standard normals (``kind='randn'``) or U[0, 1) (``'rand'``) on the generator's device,
    then moved to ``device`` if one is given."""
    fn = torch.randn if kind == "randn" else torch.rand
    x = fn(int(n), generator=generator, device=draw_device(n, generator, device), dtype=torch.float64)
    return x if device is None else x.to(device)


class SigmaDistribution:
    """Mixin: the public sigma-space API on top of the subclass's ``ln sigma`` methods.

    Subclasses implement ``sample``, ``_cdf_log``, ``_quantile_log``, ``_log_pdf_log`` and ``_params_text``.
    """

    kind: ClassVar[str] = ""
    label: ClassVar[str] = ""

    def cdf(self, sigma) -> torch.Tensor:
        """``P(Sigma <= sigma)``, float64."""
        return self._cdf_log(log_sigma(sigma))

    def quantile(self, q) -> torch.Tensor:
        """Inverse CDF (the smallest sigma with ``cdf(sigma) >= q``), float64; ``q`` in [0, 1]."""
        return torch.exp(self._quantile_log(check_levels(q)))

    def log_pdf(self, sigma) -> torch.Tensor:
        """Log density of ``ln(sigma)`` evaluated at ``ln(sigma)`` (the curves of wsnr.txt Fig. 1, left)."""
        return self._log_pdf_log(log_sigma(sigma))

    @property
    def median_log_sigma(self) -> float:
        """``ln`` of the median sigma."""
        return float(self._quantile_log(as64(0.5)))

    def shift(self, log_factor: float) -> "SigmaDistribution":
        """The law of ``sigma * exp(log_factor)``; families closed under scaling override this."""
        return Shifted(self, log_factor)

    def to_dict(self) -> dict:
        """``{"kind": ..., <fields in declaration order>}`` (what checkpoints and exports store)."""
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def describe(self) -> str:
        """One human-readable line: family, parameters, median sigma."""
        m = self.median_log_sigma
        return f"{self.label}: {self._params_text()}; median ln sigma = {m:+.4f} (sigma = {math.exp(m):.4g})"


@dataclass(frozen=True)
class Shifted(SigmaDistribution):
    """``sigma = exp(log_factor) * sigma_base`` for any base (a constant shift of ``ln sigma``).

    Nested shifts collapse: ``Shifted(Shifted(b, a), c) == Shifted(b, a + c)``.
    """

    base: Any
    log_factor: float = 0.0
    kind: ClassVar[str] = "shifted"
    label: ClassVar[str] = "shifted"

    def __post_init__(self):
        if not isinstance(self.base, SigmaDistribution):
            raise ConfigError(f"Shifted.base must be a sigma distribution, got {type(self.base).__name__}")
        check_real("Shifted", "log_factor", self.log_factor)
        if isinstance(self.base, Shifted):
            object.__setattr__(self, "log_factor", float(self.base.log_factor + self.log_factor))
            object.__setattr__(self, "base", self.base.base)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return self.base.sample(n, generator, device) * math.exp(self.log_factor)

    def _cdf_log(self, lam):
        return self.base._cdf_log(lam - self.log_factor)

    def _quantile_log(self, q):
        return self.base._quantile_log(q) + self.log_factor

    def _log_pdf_log(self, lam):
        return self.base._log_pdf_log(lam - self.log_factor)

    def shift(self, log_factor: float) -> "Shifted":
        return Shifted(self.base, self.log_factor + log_factor)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "log_factor": self.log_factor, "base": self.base.to_dict()}

    def describe(self) -> str:
        c = self.log_factor
        return (f"[{self.base.describe()}] x exp({c:+.4f}) (sigma x {math.exp(c):.4g}); "
                f"median ln sigma = {self.median_log_sigma:+.4f}")


def _shifted_from_dict(d: dict) -> Shifted:
    if "base" not in d:
        raise ConfigError("sigma distribution kind 'shifted' needs a 'base' entry")
    extra = set(d) - {"base", "log_factor"}
    if extra:
        raise ConfigError(f"sigma distribution kind 'shifted' got unknown fields {sorted(extra)}")
    return Shifted(sigma_distribution_from_dict(d["base"]), d.get("log_factor", 0.0))


def sigma_distribution_from_dict(d: dict) -> SigmaDistribution:
    """Inverse of ``.to_dict()`` for every distribution (what checkpoints and exports store)."""
    if not isinstance(d, dict):
        raise ConfigError(f"a sigma distribution dict must be a dict, got {type(d).__name__}")
    d = dict(d)
    kind = d.pop("kind", None)
    if kind == Shifted.kind:
        return _shifted_from_dict(d)
    if kind not in _REGISTRY:
        known = sorted([*_REGISTRY, Shifted.kind])
        raise ConfigError(f"unknown sigma distribution kind {kind!r}; expected one of {known}")
    cls = _REGISTRY[kind]
    known = {f.name for f in fields(cls)}
    extra = set(d) - known
    if extra:
        raise ConfigError(
            f"sigma distribution kind {kind!r} got unknown fields {sorted(extra)}; it takes {sorted(known)}")
    return cls(**d)
