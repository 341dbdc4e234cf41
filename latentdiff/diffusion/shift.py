"""Shift rules: the constant ``c`` with ``sigma' = exp(c) sigma`` that adapts a base distribution to the data.

* ``none``        c = 0.
* ``wsnr``        c = 0.5 ln(K_target / K_ref) (wsnr.txt Sec. 4, "WSNR-Equivalent"): WSNR(P, sigma) = K(P)/sigma^2
                  (Eq. 2-3), so p(WSNR) on the target data equals p(WSNR) of the base on the reference data
                  iff sigma' = sigma sqrt(K_target / K_ref), for every base.  K from
                  :func:`latentdiff.diffusion.spectral.wsnr_constant` (with or without the DC bin).
* ``resolution``  c = ln(d / d_ref): simple diffusion (Hoogeboom et al. 2023, Sec. 3) shifts
                  ``logSNR(t) + 2 ln(d_ref / d)``; with sigma = exp(-logSNR/2) that is ``ln sigma + ln(d/d_ref)``.
                  SD3 (Esser et al. 2024, Sec. 5.3.2) scales sigma by sqrt(m/n) for pixel counts m = d^2,
                  n = d_ref^2: the same factor d/d_ref.

Every rule is a pure constant shift of ``ln sigma``, so it applies to any base.  The two rules agree when
the reference is the target band-limited-upsampled from d to d_ref: its spectrum is (d_ref/d)^2 P_target on
the target's band and 0 elsewhere, so K_ref = (d_ref/d)^2 K_target.  ``side`` and ``side_ref`` must be
measured in one space: for latents, ``side`` is the spatial side of the array the denoiser sees, and
against a pixel-space reference the rule ignores how the autoencoder reshapes the spectrum and scales the
data (which ``wsnr`` measures).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from latentdiff.diffusion.noise_base import SigmaDistribution
from latentdiff.diffusion.spectral import wsnr_constant
from latentdiff.utils.errors import ConfigError

__all__ = ["ShiftRule", "wsnr_log_factor", "resolution_log_factor", "SHIFT_RULES"]

SHIFT_RULES = ("none", "wsnr", "resolution")


def wsnr_log_factor(power_ref, power_target, *, include_dc: bool = True) -> float:
    """``0.5 ln(K_target / K_ref)`` (wsnr.txt Sec. 4 with Eq. 2-3)."""
    k_ref = float(wsnr_constant(power_ref, include_dc=include_dc))
    k_tgt = float(wsnr_constant(power_target, include_dc=include_dc))
    return 0.5 * math.log(k_tgt / k_ref)


def resolution_log_factor(side, side_ref=64) -> float:
    """``ln(side / side_ref)`` (simple diffusion Sec. 3: logSNR + 2 ln(d_ref/d); SD3 Sec. 5.3.2: sqrt(m/n))."""
    for name, v in (("side", side), ("side_ref", side_ref)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"resolution shift: {name} must be a positive number of pixels, got {v!r}")
    return math.log(side / side_ref)


@dataclass(frozen=True)
class ShiftRule:
    """Which shift to apply and its settings; ``resolve`` turns it into a number plus provenance.

    ``include_dc`` (wsnr) keeps the (0, 0) bin in both K's; ``reference`` (wsnr) names the reference
    spectrum, ``"rgb64"`` = the 64x64 RGB spectrum stored with the dataset (or a dataset path);
    ``side_ref`` (resolution) is d_ref.
    """

    rule: str = "none"
    include_dc: bool = True
    reference: str = "rgb64"
    side_ref: int = 64

    def __post_init__(self):
        if self.rule not in SHIFT_RULES:
            raise ConfigError(f"ShiftRule.rule must be one of {SHIFT_RULES}, got {self.rule!r}")
        if not isinstance(self.include_dc, bool):
            raise ConfigError(f"ShiftRule.include_dc must be true or false, got {self.include_dc!r}")
        if not isinstance(self.reference, str) or not self.reference:
            raise ConfigError(f"ShiftRule.reference must be a non-empty string, got {self.reference!r}")
        if isinstance(self.side_ref, bool) or not isinstance(self.side_ref, numbers.Integral) or self.side_ref < 1:
            raise ConfigError(f"ShiftRule.side_ref must be a positive integer (pixels), got {self.side_ref!r}")

    def _wsnr_record(self, power_target, power_ref) -> dict:
        if power_target is None or power_ref is None:
            raise ValueError("ShiftRule(rule='wsnr') needs power_target and power_ref (mean power spectra)")
        dc = self.include_dc
        return {"reference": self.reference, "include_dc": dc,
                "k_reference": float(wsnr_constant(power_ref, include_dc=dc)),
                "k_target": float(wsnr_constant(power_target, include_dc=dc)),
                "log_factor_other_dc": wsnr_log_factor(power_ref, power_target, include_dc=not dc),
                "log_factor": wsnr_log_factor(power_ref, power_target, include_dc=dc)}

    def resolve(self, *, power_target=None, power_ref=None, side=None) -> dict:
        """``{"rule", "log_factor", "sigma_factor", ...details}`` for the given data (plain floats).

        ``wsnr`` adds ``reference``, ``include_dc``, ``k_reference``, ``k_target`` and
        ``log_factor_other_dc`` (the factor with the DC bin treated the other way); ``resolution`` adds
        ``side`` and ``side_ref``.
        """
        out: dict = {"rule": self.rule}
        if self.rule == "none":
            out["log_factor"] = 0.0
        elif self.rule == "wsnr":
            out.update(self._wsnr_record(power_target, power_ref))
        else:
            if side is None:
                raise ValueError("ShiftRule(rule='resolution') needs side (the data's spatial side, see side_ref)")
            out.update(side=side, side_ref=self.side_ref, log_factor=resolution_log_factor(side, self.side_ref))
        out["sigma_factor"] = math.exp(out["log_factor"])
        return out

    def apply(self, base: SigmaDistribution, **data) -> tuple[SigmaDistribution, dict]:
        """``(base.shift(c), record)``; ``none`` returns ``base`` itself."""
        rec = self.resolve(**data)
        return (base if self.rule == "none" else base.shift(rec["log_factor"])), rec

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShiftRule":
        extra = set(d) - {"rule", "include_dc", "reference", "side_ref"}
        if extra:
            raise ConfigError(f"ShiftRule got unknown fields {sorted(extra)}")
        return cls(**d)
