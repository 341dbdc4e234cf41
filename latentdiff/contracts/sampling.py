"""The sampling record (``sampling.json``): what the sample stage did, read back by the FID stage.

Written by ``latentdiff.sampling`` when a sample set is complete (removed when a run starts), beside
``images/`` and ``samples.npz``.  It names the source (export hash or diffusers UNet hash), the seeds
(compact ranges in request order, as ``--seeds`` takes them), the solver with its budget and only the
options that took effect, the number of denoiser calls actually made (``nfe_used``), the sigma grid
and every evaluated sigma, the guidance, the EMA profile, the VAE and how it decoded (precision,
tiling, read from the autoencoder), the batch sizes that fixed the forward shapes, and the timing.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.solvers.registry import SOLVERS, check_options
from latentdiff.utils.errors import SampleError
from latentdiff.utils.io import atomic_write_text
from latentdiff.utils.seeds import format_seeds, parse_seeds

__all__ = ["SAMPLING_FORMAT", "SAMPLING_JSON", "SamplingRecord"]

SAMPLING_FORMAT = "latentdiff-sampling/2"
SAMPLING_JSON = "sampling.json"
_V1_FORMAT = "latentdiff-sampling/1"  # the same fields plus weights_file (the EMA profile's file name)
SOURCE_KINDS = ("export", "diffusers-unet")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class SamplingRecord:
    """``sampling.json`` of one complete sample set."""

    source: str
    source_kind: str
    export_hash: str
    seeds: str
    solver: str
    nfe_used: int
    sigma_min: float
    sigma_max: float
    cfg: float
    ema_profile: str
    vae_decode_precision: str
    vae_tiling: bool
    image_size: list
    nfe_requested: int | None = None
    steps: int | None = None
    network_evals_per_image: int | None = None
    sigma_grid: list = field(default_factory=list)
    eval_sigmas: list = field(default_factory=list)
    sigma_grid_per_image: bool = False
    sigma_grid_seed: int | None = None
    plan: dict | None = None
    solver_kwargs: dict = field(default_factory=dict)
    sigma_max_choice: str | None = None
    rho: float = 7.0
    guidance_interval: list | None = None
    class_label: int | None = None
    null_label: int | None = None
    vae: dict | str | None = None
    normalization: dict | None = None
    world_size: int = 1
    network_batch: int | None = None
    decode_batch: int | None = None
    micro_batch: int | None = None
    intra_op_threads: int | None = None
    cpu_capability: str | None = None
    generated_this_run: int = 0
    seconds: float | None = None
    images_per_second: float | None = None
    files: dict = field(default_factory=dict)
    scheduler: dict | None = None
    gits: dict | None = None  # --schedule gits: the cache file, its key and whether it was reused

    @property
    def num_images(self) -> int:
        return len(self.seed_list())

    def seed_list(self) -> list[int]:
        """The seeds in request order."""
        return parse_seeds(self.seeds, error=SampleError, flag="sampling.json seeds")

    def validate(self, where: str = SAMPLING_JSON) -> "SamplingRecord":
        """Raise :class:`SampleError` naming ``where`` when the values do not fit together; returns self."""
        problems = []
        if self.source_kind not in SOURCE_KINDS:
            problems.append(f"source_kind {self.source_kind!r} is not one of {'/'.join(SOURCE_KINDS)}")
        self.seed_list()
        if self.solver not in SOLVERS:
            problems.append(f"solver {self.solver!r} is not one of {', '.join(SOLVERS)}")
        else:
            try:
                check_options(self.solver, self.solver_kwargs)
            except ValueError as e:
                problems.append(f"solver_kwargs: {e}")
        if self.nfe_requested is not None and not 1 <= self.nfe_used <= self.nfe_requested:
            problems.append(f"nfe_used {self.nfe_used} is outside [1, nfe_requested {self.nfe_requested}]")
        if self.eval_sigmas and len(self.eval_sigmas) != self.nfe_used:
            problems.append(f"{len(self.eval_sigmas)} eval_sigmas for nfe_used {self.nfe_used}")
        if not (0 < self.sigma_min < self.sigma_max and math.isfinite(self.sigma_max)):
            problems.append(f"needs 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}")
        if not math.isfinite(self.cfg):
            problems.append(f"cfg {self.cfg} is not finite")
        if self.vae_decode_precision not in PRECISIONS:
            problems.append(f"vae_decode_precision {self.vae_decode_precision!r} is not one of {'/'.join(PRECISIONS)}")
        if problems:
            raise SampleError(f"{where}: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        """The JSON record; ``num_images`` is written for readers (it is the number of ``seeds``)."""
        return {"format": SAMPLING_FORMAT, "num_images": self.num_images, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, where: str = SAMPLING_JSON) -> "SamplingRecord":
        """Parse and validate a record of this format (or of ``latentdiff-sampling/1``)."""
        if not isinstance(d, dict):
            raise SampleError(f"{where}: expected a JSON object, got {type(d).__name__}")
        fmt = d.get("format")
        if fmt not in (SAMPLING_FORMAT, _V1_FORMAT):
            raise SampleError(f"{where}: format {fmt!r} is not {SAMPLING_FORMAT!r}: not written by latentdiff-sample "
                              "(move it away from the samples, or re-run latentdiff-sample)")
        d = {k: v for k, v in d.items() if k not in ("format", "num_images", "weights_file")}
        if isinstance(d.get("seeds"), list):  # format 1 recorded a non-contiguous request as a list
            d["seeds"] = format_seeds(d["seeds"], ordered=True)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SampleError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            record = cls(**d)
        except TypeError as e:
            raise SampleError(f"{where}: {e}") from None
        return record.validate(where)

    @classmethod
    def read(cls, path: str | Path) -> "SamplingRecord":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SampleError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d, str(path))

    def write(self, path: str | Path) -> None:
        """Validate, then write atomically."""
        self.validate(str(path))
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
