"""The training schedule: what the train stage derives from the dataset statistics and every later stage reuses.

* ``normalization``: the raw latent -> model space map (:class:`~latentdiff.vae.normalization.Normalization`),
* ``sigma_data``: the RMS of the model-space latents that EDM's c_skip/c_out/c_in assume
  (E[y^2] = sigma_data^2, edm.txt Appendix B.6),
* ``sigma_dist``: the training sigma distribution (``to_dict`` of a ``latentdiff.diffusion.noise``
  distribution) and ``noise``, the recipe that chose it,
* ``sigma_min`` and the data-driven ``sigma_max`` = sqrt(mu_d + alpha sigma_d) (wsnr.txt Eq. 7-8) with the
  moments it came from (:class:`SigmaMaxRule`),
* ``shift``: the shift rule applied to the base distribution (:mod:`latentdiff.diffusion.shift`:
  ``rule``, ``log_factor``, ``base``, the rule's details; absent in files written before it existed),
* ``wsnr``: the WSNR alignment to the 64x64 RGB reference spectrum (wsnr.txt Sec. 4, Eq. 2-3) when
  ``noise == "wsnr"`` (:class:`WSNRAlignment`).

It is stored in every checkpoint (``trainer_state.json``) and in every export (``model.json``'s
``schedule``), so the sampler reuses exactly the values the network was trained with.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from latentdiff.diffusion.distances import data_driven_sigma_max
from latentdiff.diffusion.noise import sigma_distribution_from_dict
from latentdiff.utils.errors import ExportError
from latentdiff.vae.normalization import Normalization

__all__ = ["SCHEDULE_VERSION", "NOISE_KINDS", "NORMALIZATION_KINDS", "SigmaMaxRule", "WSNRAlignment",
           "TrainingSchedule"]

SCHEDULE_VERSION = 1
NOISE_KINDS = ("wsnr", "edm", "resolution", "vp", "ve")
NORMALIZATION_KINDS = ("sd", "channel", "identity")
SIGMA_MAX_EQ = "wsnr.txt Eq. 7-8"
# the values a resumed training must find unchanged (the others are diagnostics)
RESUME_FIELDS = ("normalization", "sigma_data", "sigma_dist", "sigma_min", "sigma_max", "noise")
_LEGACY_KEYS = ("sigma_max_edm",)  # a constant (80) the first schedules also recorded; dropped on read


def _number(d: dict, key: str, where: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ExportError(f"{where}: {key} must be a finite number, got {v!r}")
    return float(v)


def _require(d, keys, where: str) -> None:
    if not isinstance(d, dict):
        raise ExportError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ExportError(f"{where}: missing field(s) {', '.join(missing)}")


def _shift_record(rec, where: str) -> dict | None:
    """The shift record (``rule``, ``log_factor``, ``base`` and the rule's details) or None (older files)."""
    if rec is None:
        return None
    if not isinstance(rec, dict) or "rule" not in rec or "log_factor" not in rec:
        raise ExportError(f"{where}.shift: expected an object with 'rule' and 'log_factor', got {rec!r}")
    _number(rec, "log_factor", f"{where}.shift")
    return dict(rec)


@dataclass(frozen=True)
class SigmaMaxRule:
    """sigma_max = ||d|| with ||d||^2 = mu_d + alpha sigma_d (wsnr.txt Eq. 7-8), from the model-space
    moments (mu_d, sigma_d) of the squared distances between data points."""

    alpha: float
    mu_d: float
    sigma_d: float

    def value(self) -> float:
        return data_driven_sigma_max((self.mu_d, self.sigma_d), self.alpha)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "mu_d": self.mu_d, "sigma_d": self.sigma_d, "eq": SIGMA_MAX_EQ}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "SigmaMaxRule":
        _require(d, ("alpha", "mu_d", "sigma_d"), where)
        return cls(*(_number(d, k, where) for k in ("alpha", "mu_d", "sigma_d")))


@dataclass(frozen=True)
class WSNRAlignment:
    """The WSNR alignment (wsnr.txt Sec. 4): WSNR(P, sigma) = K(P) / sigma^2 (Eq. 2-3), so the log-normal's
    P_mean moves by 0.5 ln(K_target / K_reference) (``p_mean_shift``; sigma scales by ``sigma_factor``).

    ``sigma_factor_dc_free`` is the factor of the DC-free WSNR (zero frequency excluded), reported as
    the alternative.  ``sigma_factor`` and ``p_mean_shift`` are derived from the two constants; they
    are written to JSON for readers and not read back.
    """

    reference: str
    include_dc: bool
    k_reference: float
    k_target: float
    sigma_factor_dc_free: float

    @property
    def sigma_factor(self) -> float:
        return math.sqrt(self.k_target / self.k_reference)

    @property
    def p_mean_shift(self) -> float:
        return 0.5 * math.log(self.k_target / self.k_reference)

    def to_dict(self) -> dict:
        return {"reference": self.reference, "include_dc": self.include_dc, "k_reference": self.k_reference,
                "k_target": self.k_target, "sigma_factor_dc_free": self.sigma_factor_dc_free,
                "sigma_factor": self.sigma_factor, "p_mean_shift": self.p_mean_shift}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "WSNRAlignment":
        keys = ("k_reference", "k_target", "sigma_factor_dc_free")
        _require(d, ("reference", "include_dc", *keys), where)
        k = [_number(d, name, where) for name in keys]
        if k[0] <= 0 or k[1] <= 0:
            raise ExportError(f"{where}: the WSNR constants must be positive, got {k[0]} and {k[1]}")
        return cls(str(d["reference"]), bool(d["include_dc"]), *k)


@dataclass(frozen=True)
class TrainingSchedule:
    """The normalization, sigma_data, training sigma distribution and sigma range of one training run."""

    normalization: Normalization
    sigma_data: float
    sigma_min: float
    sigma_max: float
    sigma_dist: dict
    noise: str | None = None
    sigma_max_rule: SigmaMaxRule | None = None
    wsnr: WSNRAlignment | None = None
    shift: dict | None = None
    model_space_rms: float | None = None
    stats_shards_hash: str | None = None
    version: int = field(default=SCHEDULE_VERSION)

    def validate(self, where: str = "schedule") -> "TrainingSchedule":
        """Raise :class:`ExportError` naming ``where`` when the values do not fit together; returns self."""
        if self.version != SCHEDULE_VERSION:
            raise ExportError(f"{where}: schedule version {self.version} is not {SCHEDULE_VERSION}")
        if self.normalization.kind not in NORMALIZATION_KINDS:
            raise ExportError(f"{where}: normalization.kind {self.normalization.kind!r} is not one of "
                              f"{'/'.join(NORMALIZATION_KINDS)}")
        if not (self.sigma_data > 0 and math.isfinite(self.sigma_data)):
            raise ExportError(f"{where}: sigma_data must be a positive number, got {self.sigma_data!r}")
        if not (0 < self.sigma_min < self.sigma_max and math.isfinite(self.sigma_max)):
            raise ExportError(f"{where}: needs 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}")
        rule = self.sigma_max_rule
        if rule is not None and not math.isclose(rule.value(), self.sigma_max, rel_tol=1e-9):
            raise ExportError(
                f"{where}: sigma_max = {self.sigma_max} but sigma_max_rule (alpha {rule.alpha}, mu_d {rule.mu_d}, "
                f"sigma_d {rule.sigma_d}) gives sqrt(mu_d + alpha sigma_d) = {rule.value()}; the file was edited by hand"
            )
        if self.noise is not None and self.noise not in NOISE_KINDS:
            raise ExportError(f"{where}: noise {self.noise!r} is not one of {'/'.join(NOISE_KINDS)}")
        if (self.noise == "wsnr") != (self.wsnr is not None):
            raise ExportError(f"{where}: a wsnr alignment record goes with noise 'wsnr' (noise is {self.noise!r})")
        try:
            sigma_distribution_from_dict(self.sigma_dist)
        except (TypeError, ValueError) as e:
            raise ExportError(f"{where}: sigma_dist {self.sigma_dist!r} is not a training distribution ({e})") from None
        return self

    def distribution(self):
        """The training sigma distribution object (``latentdiff.diffusion.noise``)."""
        return sigma_distribution_from_dict(self.sigma_dist)

    def to_dict(self) -> dict:
        out = {"version": self.version, "normalization": self.normalization.to_dict(), "sigma_data": self.sigma_data,
               "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "sigma_dist": dict(self.sigma_dist),
               "noise": self.noise, "model_space_rms": self.model_space_rms, "stats_shards_hash": self.stats_shards_hash}
        if self.sigma_max_rule is not None:
            out["sigma_max_rule"] = self.sigma_max_rule.to_dict()
        if self.wsnr is not None:
            out["wsnr"] = self.wsnr.to_dict()
        if self.shift is not None:
            out["shift"] = dict(self.shift)
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "schedule") -> "TrainingSchedule":
        """Parse and validate a :meth:`to_dict` record (:class:`ExportError` naming ``where``)."""
        _require(d, ("normalization", "sigma_data", "sigma_min", "sigma_max", "sigma_dist"), where)
        known = {"version", "normalization", "sigma_data", "sigma_min", "sigma_max", "sigma_dist", "noise",
                 "model_space_rms", "stats_shards_hash", "sigma_max_rule", "wsnr", "shift", *_LEGACY_KEYS}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ExportError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            norm = Normalization.from_dict(d["normalization"])
        except (TypeError, ValueError, AttributeError) as e:
            raise ExportError(f"{where}: normalization is invalid ({e})") from None
        rule, wsnr = d.get("sigma_max_rule"), d.get("wsnr")
        rms = d.get("model_space_rms")
        return cls(
            normalization=norm, sigma_data=_number(d, "sigma_data", where), sigma_min=_number(d, "sigma_min", where),
            sigma_max=_number(d, "sigma_max", where), sigma_dist=d["sigma_dist"], noise=d.get("noise"),
            sigma_max_rule=None if rule is None else SigmaMaxRule.from_dict(rule, f"{where}.sigma_max_rule"),
            wsnr=None if wsnr is None else WSNRAlignment.from_dict(wsnr, f"{where}.wsnr"),
            shift=_shift_record(d.get("shift"), where),
            model_space_rms=None if rms is None else _number(d, "model_space_rms", where),
            stats_shards_hash=d.get("stats_shards_hash"), version=int(d.get("version", SCHEDULE_VERSION)),
        ).validate(where)

    def diff(self, new: "TrainingSchedule") -> list[str]:
        """What changed from this schedule (a checkpoint's) to ``new`` in the values a training depends
        on (``RESUME_FIELDS``; numbers compare with a relative tolerance of 1e-9)."""
        a, b = self.to_dict(), new.to_dict()
        out = []
        for k in RESUME_FIELDS:
            old, now = a[k], b[k]
            same = math.isclose(old, now, rel_tol=1e-9) if isinstance(old, float) and isinstance(now, float) else old == now
            if not same:
                out.append(f"schedule.{k}: {json.dumps(old)} (checkpoint) -> {json.dumps(now)} (now; derived from the "
                           "dataset stats)")
        return out
