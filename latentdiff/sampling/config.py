"""The sample stage's configuration: one dataclass, loaded from YAML and flags by ``latentdiff.utils.config``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from latentdiff.solvers.nfe_guided import H_TAU
from latentdiff.solvers.registry import SAMPLERS, check_options
from latentdiff.utils.errors import SampleError

__all__ = ["SampleConfig", "SOLVER_FLAGS", "MAX_NFE", "CLI_DEFAULT_SOLVER", "CLI_DEFAULT_SCHEDULE"]

# The CLI's default pair: the evidence-best solver x schedule of the trained-network benchmark
# (tools/bench/trained/, README "Samplers"), not ``sample()``'s default (``auto``, best on the ideal
# denoiser).  --schedule not given: the default solver gets CLI_DEFAULT_SCHEDULE, any other Karras.
CLI_DEFAULT_SOLVER = "ipndm"
CLI_DEFAULT_SCHEDULE = "karras"

# the largest --nfe / --steps accepted: 10x the converged references of tools/bench (256 Ode3 steps use
# 768 evaluations) and ~30x the paper's largest budget; above it a run would take days per image batch
MAX_NFE = 10_000

# config field -> the sampler option it sets (``latentdiff.solvers.registry.SOLVERS[...].options``)
SOLVER_FLAGS = {"schedule": "schedule", "placement": "placement", "h_tau": "h_tau", "num_ode3": "num_ode3", "midpoint": "is_midpoint",
                "s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax", "s_noise": "s_noise"}


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class SampleConfig:
    """What ``latentdiff-sample`` does; every field is a flag (``--decode-batch``) and a YAML key."""

    export: str | None = field(default=None, metadata=_help("export directory (model.json + safetensors) from "
                                                            "latentdiff-export"))
    diffusers_unet: str | None = field(default=None, metadata=_help(
        "a local diffusers UNet2DModel (epsilon-prediction DDPM) or pipeline directory, instead of --export"))
    out: str | None = field(default=None, metadata=_help("output directory (required; resumable)"))
    seeds: str = field(default="0-63", metadata=_help("seed list/ranges, e.g. 0-49999 (one image per seed)"))
    batch: int = field(default=64, metadata=_help(
        "images sampled per step per rank (memory and overlap only: the images do not depend on it)"))
    decode_batch: int = field(default=8, metadata=_help(
        "latents handed to the VAE per call (memory only: the images do not depend on it)"))
    micro_batch: int = field(default=8, metadata=_help(
        "rows of every solver run, network forward and VAE decode: the fixed kernel shapes (the images depend on "
        "it, never on --batch, --decode-batch or the number of ranks)"))
    solver: str = field(default=CLI_DEFAULT_SOLVER, metadata=_help(
        f"ODE solver: {', '.join(SAMPLERS)} (default: the trained-network benchmark's best, README 'Samplers')"))
    nfe: int = field(default=35, metadata=_help(
        f"denoiser evaluations per image (budget, never exceeded; at most {MAX_NFE})"))
    steps: int | None = field(default=None, metadata=_help(
        "noise levels instead of an NFE budget (fixed-method solvers; required by hybrid)"))
    sigma_max: str = field(default="data", metadata=_help(
        "data (the export's data-driven value), edm (80), vp (~152) or a number"))
    sigma_min: float | None = field(default=None, metadata=_help("not given: the export's sigma_min (0.002)"))
    rho: float = field(default=7.0, metadata=_help("Karras grid exponent (edm.txt Eq. 5)"))
    schedule: str | None = field(default=None, metadata=_help(
        "time schedule of a fixed-grid solver: karras (edm.txt Eq. 5; used when not given), log-uniform, or gits "
        "(levels chosen from warm-up trajectories of the model, computed once and cached in EXPORT/gits/)"))
    gits_warmup: int | None = field(default=None, metadata=_help("gits: warm-up trajectories (256 when not given)"))
    gits_fine: int | None = field(default=None, metadata=_help(
        "gits: levels of the fine Eq. 5 grid the levels are picked from (81 when not given; >= the NFE)"))
    placement: str | None = field(default=None, metadata=_help(
        "RK stage noise levels: log (wsnr.txt Alg. 3; used when not given) or classical"))
    h_tau: float | None = field(default=None, metadata=_help(f"nfe-guided: step-size threshold h_tau of wsnr.txt Algorithm 1 ({H_TAU} when not given)"))
    num_ode3: int | None = field(default=None, metadata=_help(
        "hybrid: number of third-order steps (largest sigma first; 0 when not given)"))
    midpoint: bool | None = field(default=None, metadata=_help(
        "hybrid: midpoint instead of Heun for the second-order steps"))
    cfg: float = field(default=1.0, metadata=_help("guidance scale w: D_u + w (D_c - D_u); 1 = conditional model"))
    guidance_interval: str | None = field(default=None, metadata=_help(
        "sigma_lo,sigma_hi: guide only inside this interval"))
    class_label: int | None = field(default=None, metadata=_help("one class for every image (not given: drawn per seed)"))
    weights: str = field(default="ema", metadata=_help("ema (largest rate), an EMA rate such as 0.9999, "
                                                       "phema-<sigma_rel> such as phema-0.1 (power EMA), or raw"))
    vae: str | None = field(default=None, metadata=_help(
        "load the export's VAE from this directory (its sha256 is still checked)"))
    s_churn: float | None = field(default=None, metadata=_help("edm-stochastic: S_churn (edm.txt Alg. 2; 0 when not given)"))
    s_tmin: float | None = field(default=None, metadata=_help("edm-stochastic: S_tmin"))
    s_tmax: float | None = field(default=None, metadata=_help("edm-stochastic: S_tmax"))
    s_noise: float | None = field(default=None, metadata=_help("edm-stochastic: S_noise"))
    grid: int = field(default=64, metadata=_help("images in grid.png (0 = none)"))
    no_npz: bool = field(default=False, metadata=_help("do not write samples.npz"))
    no_progress: bool = field(default=False, metadata=_help("no progress bar"))

    def validate(self) -> "SampleConfig":
        """Raise :class:`SampleError` naming the flag when a value is out of range; returns self."""
        if (self.export is None) == (self.diffusers_unet is None):
            raise SampleError("give exactly one of --export EXPORT_DIR or --diffusers-unet DIR")
        if not self.out:
            raise SampleError("--out DIR is required (the output directory)")
        if self.solver not in SAMPLERS:
            raise SampleError(f"--solver {self.solver!r}: choose one of {', '.join(SAMPLERS)}")
        for name in ("batch", "decode_batch", "micro_batch"):
            if getattr(self, name) < 1:
                raise SampleError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps is None and not 1 <= self.nfe <= MAX_NFE:
            raise SampleError(f"--nfe must be in [1, {MAX_NFE}], got {self.nfe} (35 is the paper's budget; "
                              "converged references need a few hundred)")
        if self.steps is not None and not 1 <= self.steps <= MAX_NFE:
            raise SampleError(f"--steps must be in [1, {MAX_NFE}], got {self.steps}")
        if not math.isfinite(self.cfg):
            raise SampleError(f"--cfg must be a finite number, got {self.cfg}")
        if self.sigma_min is not None and not (self.sigma_min > 0 and math.isfinite(self.sigma_min)):
            raise SampleError(f"--sigma-min must be positive, got {self.sigma_min}")
        if self.grid < 0:
            raise SampleError("--grid must be >= 0")
        if (self.gits_warmup is not None or self.gits_fine is not None) and self.schedule != "gits":
            raise SampleError("--gits-warmup / --gits-fine set GITS' warm-up; they need --schedule gits")
        if self.gits_warmup is not None and self.gits_warmup < 1 or self.gits_fine is not None and self.gits_fine < 2:
            raise SampleError("--gits-warmup must be >= 1 and --gits-fine >= 2")
        try:
            check_options(self.solver, self.solver_options())
        except ValueError as e:  # an option the solver does not use: refused, never ignored
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in SOLVER_FLAGS)
            raise SampleError(f"--solver {self.solver}: {e} (flags {flags} set the options)") from None
        return self

    @property
    def budget(self) -> dict:
        """``{"nfe": N, "steps": None}`` or ``{"nfe": None, "steps": S}``: the budget the solver gets."""
        return {"nfe": None if self.steps is not None else self.nfe, "steps": self.steps}

    def solver_options(self) -> dict:
        """The sampler options set by flags, by option name (``--midpoint`` sets ``is_midpoint``); the
        registry refuses one the solver does not use, so this is what takes effect."""
        out = {}
        for name, option in SOLVER_FLAGS.items():
            value = getattr(self, name)
            if value is not None:
                out[option] = value
        if self.schedule is None and self.solver == CLI_DEFAULT_SOLVER and CLI_DEFAULT_SCHEDULE != "karras":
            out["schedule"] = CLI_DEFAULT_SCHEDULE  # the default pair (karras needs no option: it is every default)
        return out

    def gits_params(self):
        """The GITS parameters (``latentdiff.solvers.schedules.GITSParams``), defaults where not given."""
        from latentdiff.solvers.schedules import GITSParams

        kw = {"warmup": self.gits_warmup, "fine_levels": self.gits_fine}
        return GITSParams(**{k: v for k, v in kw.items() if v is not None})
