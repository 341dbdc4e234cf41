"""The export contract: what the train stage hands to the sample stage (``model.json`` + safetensors).

An export directory holds ``raw.safetensors`` (consolidated fp32 weights), one ``ema-<rate>.safetensors``
per EMA rate, one ``phema-<sigma_rel>.safetensors`` per power-function EMA (EDM2; tracked in training or
reconstructed post hoc by ``latentdiff-reconstruct-ema``, whose exports hold no raw weights) and ``model.json`` (:class:`ExportMeta`): the network config (``latentdiff.models``; it
also holds the class count and the null class), the preconditioning kind and parameters, the training
schedule (:class:`~latentdiff.contracts.schedule.TrainingSchedule`: normalization, sigma_data, sigma
range and its rule, training distribution, WSNR alignment), the VAE description, the dataset record
and the training config.  Each value is stored once.  :func:`load_export` rebuilds the denoiser
without DeepSpeed and refuses an export whose metadata is missing or inconsistent; an export of
``format_version`` 1 is converted on read (``latentdiff.contracts.export_v1``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from latentdiff.contracts.export_v1 import REEXPORT, upgrade_v1
from latentdiff.contracts.schedule import TrainingSchedule
from latentdiff.diffusion.guidance import resolve_null_label
from latentdiff.diffusion.precond import build_precond
from latentdiff.models import from_config
from latentdiff.utils.errors import ConfigError, ExportError, LatentdiffError
from latentdiff.utils.io import atomic_write_text, sha256_files
from latentdiff.vae.decode import is_pixel_vae
from latentdiff.vae.normalization import Normalization

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "MODEL_JSON", "ExportMeta", "LoadedExport", "load_export", "export_hash"]

EXPORT_FORMAT = "latentdiff-export"
EXPORT_VERSION = 2
MODEL_JSON = "model.json"
_FIELDS = ("format", "format_version", "model", "precond", "schedule", "vae", "weights", "dataset", "step",
           "images_seen", "train_config", "checkpoint")
_STORED_ELSEWHERE = {"normalization": "schedule.normalization", "num_classes": "model.num_classes",
                     "null_label": "model.null_label", "label_dropout": "train_config.label_dropout"}


def _same_number(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b))
    except ValueError:
        return False


def export_hash(export_dir: str | Path) -> str:
    """sha256 over model.json and the weight files (what sampling.json records)."""
    d = Path(export_dir)
    return sha256_files([d / MODEL_JSON] + sorted(d.glob("*.safetensors"), key=lambda p: p.name))


def _vae_channels(vae, norm: Normalization, where: str) -> int:
    """The VAE's latent channels; an ``sd`` normalization must be the VAE's own scaling (edm2 / SD recipe)."""
    if is_pixel_vae(vae):
        return 3
    if not isinstance(vae, dict) or vae.get("latent_channels") is None:
        raise ExportError(f"{where}: vae.latent_channels is missing (the VAE description is incomplete); {REEXPORT}")
    if norm.kind == "sd":
        sf, sh = float(vae.get("scaling_factor", float("nan"))), float(vae.get("shift_factor") or 0.0)
        if not all(math.isclose(s, sf, rel_tol=1e-12) for s in norm.scale) or not all(
            math.isclose(s, sh, rel_tol=1e-12, abs_tol=1e-15) for s in norm.shift
        ):
            raise ExportError(
                f"{where}: normalization kind 'sd' must use the VAE's scaling_factor {sf} and shift_factor {sh}, "
                f"but it has scale {list(norm.scale)} and shift {list(norm.shift)}"
            )
    return int(vae["latent_channels"])


@dataclass(frozen=True)
class ExportMeta:
    """``model.json``: everything the sample stage needs besides the weights (format_version 2)."""

    model: dict
    precond: dict  # {"kind": ...} plus the wrapper's parameters; EDM's sigma_data is schedule.sigma_data
    schedule: TrainingSchedule
    vae: dict | str
    weights: dict  # {"raw": file or None, "ema": {rate: file}, optional "phema": {sigma_rel: file}}
    dataset: dict = field(default_factory=dict)
    step: int | None = None
    images_seen: int | None = None
    train_config: dict = field(default_factory=dict)
    checkpoint: str | None = None

    @property
    def normalization(self) -> Normalization:
        return self.schedule.normalization

    @property
    def shape(self) -> tuple[int, int, int]:
        """The model-space sample shape (channels, height, width)."""
        res = int(self.model["resolution"])
        return int(self.model["in_channels"]), res, res

    @property
    def num_classes(self) -> int:
        return int(self.model.get("num_classes") or 0)

    @property
    def null_label(self) -> int | None:
        """The class guidance uses as unconditional (None for an unconditional model)."""
        nc = self.num_classes
        return resolve_null_label(nc, self.model.get("null_label"), "model") if nc > 0 else None

    def precond_spec(self) -> dict:
        """The ``build_precond`` record: the stored parameters plus EDM's sigma_data from the schedule."""
        spec = dict(self.precond)
        if spec.get("kind") == "edm":
            spec["sigma_data"] = self.schedule.sigma_data
        return spec

    def weights_file(self, choice: str = "ema", where: str = MODEL_JSON) -> str:
        """The file of ``choice``: ``ema`` (the largest rate; without fixed-rate EMAs the widest power EMA),
        an EMA rate such as ``0.9999``, ``phema-<sigma_rel>`` such as ``phema-0.1``, or ``raw``."""
        phema = self.weights.get("phema") or {}
        if choice == "raw":
            if self.weights["raw"] is None:
                raise ExportError(f"{where}: this export holds no raw weights (a post-hoc EMA reconstruction); "
                                  f"use weights 'ema' or one of {sorted('phema-' + k for k in phema)}")
            return self.weights["raw"]
        if choice.startswith("phema-"):
            key = next((k for k in phema if _same_number(k, choice[len("phema-"):])), None)
            if key is None:
                raise ExportError(f"{where}: no power EMA {choice}; available: {sorted('phema-' + k for k in phema)}")
            return phema[key]
        emas = self.weights["ema"]
        if choice == "ema" and not emas and phema:
            return phema[max(phema, key=float)]
        if not emas:
            raise ExportError(f"{where}: the export has no EMA weights; use weights='raw'")
        if choice == "ema":
            return emas[max(emas, key=float)]
        try:
            rate = float(choice)
        except ValueError:
            raise ExportError(f"{where}: weights {choice!r}: use ema, raw or an EMA rate of {sorted(emas)}") from None
        key = next((k for k in emas if math.isclose(float(k), rate)), None)
        if key is None:
            raise ExportError(f"{where}: no EMA with rate {choice}; available: {sorted(emas)} or 'raw'")
        return emas[key]

    def validate(self, where: str = MODEL_JSON) -> "ExportMeta":
        """Raise :class:`ExportError` naming ``where`` when the values do not fit together; returns self."""
        if not all(isinstance(self.model.get(k), int) for k in ("in_channels", "resolution")):
            raise ExportError(f"{where}: model needs integer in_channels and resolution; {REEXPORT}")
        if "sigma_data" in self.precond:
            raise ExportError(f"{where}: precond.sigma_data is stored once, in schedule.sigma_data; remove it")
        if not isinstance(self.precond.get("kind"), str):
            raise ExportError(f"{where}: precond.kind is missing; {REEXPORT}")
        self.schedule.validate(f"{where} schedule")
        c, res, _ = self.shape
        norm = self.normalization
        if norm.channels != c:
            raise ExportError(f"{where}: normalization has {norm.channels} channels but model.in_channels is {c}")
        vae_c = _vae_channels(self.vae, norm, where)
        if vae_c != c:
            raise ExportError(f"{where}: the VAE has {vae_c} latent channels but model.in_channels is {c}")
        shape = self.dataset.get("sample_shape")
        if shape is not None and [int(v) for v in shape] != [c, res, res]:
            raise ExportError(f"{where}: the model takes ({c}, {res}, {res}) but dataset.sample_shape is {list(shape)}; "
                              "the export does not belong to this dataset")
        try:
            self.null_label
        except ConfigError as e:
            raise ExportError(f"{where}: {e}") from None
        raw, phema = self.weights.get("raw"), self.weights.get("phema", {})
        if not ((isinstance(raw, str) or (raw is None and phema)) and isinstance(self.weights.get("ema"), dict)
                and isinstance(phema, dict)):
            raise ExportError(f"{where}: weights must name the raw file (or, in a post-hoc EMA export, power EMAs) "
                              f"and a mapping of EMA rates; {REEXPORT}")
        return self

    def to_dict(self) -> dict:
        return {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "model": self.model,
                "precond": self.precond, "schedule": self.schedule.to_dict(), "vae": self.vae, "weights": self.weights,
                "dataset": self.dataset, "step": self.step, "images_seen": self.images_seen,
                "train_config": self.train_config, "checkpoint": self.checkpoint}

    @classmethod
    def from_dict(cls, d: dict, where: str = MODEL_JSON) -> "ExportMeta":
        """Parse and validate ``model.json``'s content (format_version 1 is converted first)."""
        if not isinstance(d, dict) or d.get("format") != EXPORT_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ExportError(f"{where}: format {got!r} is not {EXPORT_FORMAT!r}")
        version = d.get("format_version")
        if version == 1:
            d = upgrade_v1(d, where)
        elif version != EXPORT_VERSION:
            raise ExportError(f"{where}: format_version {version!r} is not one this latentdiff reads (1, {EXPORT_VERSION})")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            hints = [f"{k} (stored once, in {_STORED_ELSEWHERE[k]})" if k in _STORED_ELSEWHERE else k for k in unknown]
            raise ExportError(f"{where}: unknown field(s) {', '.join(hints)}")
        missing = [k for k in ("model", "precond", "schedule", "vae", "weights") if k not in d]
        if missing:
            raise ExportError(f"{where}: missing field(s) {', '.join(missing)}; {REEXPORT}")
        if not isinstance(d["model"], dict) or not isinstance(d["precond"], dict):
            raise ExportError(f"{where}: model and precond must be JSON objects; {REEXPORT}")
        try:
            schedule = TrainingSchedule.from_dict(d["schedule"], f"{where} schedule")
        except ExportError as e:
            raise ExportError(f"{e}; {REEXPORT}") from None
        return cls(
            model=d["model"], precond=d["precond"], schedule=schedule, vae=d["vae"], weights=d["weights"],
            dataset=dict(d.get("dataset") or {}), step=d.get("step"), images_seen=d.get("images_seen"), train_config=dict(d.get("train_config") or {}),
            checkpoint=d.get("checkpoint"),
        ).validate(where)

    @classmethod
    def read(cls, export_dir: str | Path) -> "ExportMeta":
        """``model.json`` of an export directory, parsed and validated."""
        path = Path(export_dir) / MODEL_JSON
        if not path.is_file():
            raise ExportError(f"{path} not found: pass an export directory (RUN/export/step_NNNNNNNN) made by "
                              "latentdiff-export")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ExportError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d, str(path))

    def write(self, export_dir: str | Path) -> Path:
        """Validate, then write ``export_dir/model.json`` atomically."""
        path = Path(export_dir) / MODEL_JSON
        self.validate(str(path))
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True))
        return path


@dataclass(frozen=True)
class LoadedExport:
    """An export as :func:`load_export` loaded it: where, its metadata and the weights file it used."""

    directory: Path
    meta: ExportMeta
    weights_file: str

    @property
    def ema_profile(self) -> str:
        """The weights' name without the suffix: ``ema-0.9999`` or ``raw``."""
        return Path(self.weights_file).name.rsplit(".safetensors", 1)[0]

    def hash(self) -> str:
        return export_hash(self.directory)


def load_export(export_dir: str | Path, weights: str = "ema", device="cpu"):
    """``(denoiser, LoadedExport)``: the preconditioned network with ``weights`` = ``ema`` (largest rate),
    an EMA rate such as ``0.9999``, or ``raw``, rebuilt from ``model.json`` without DeepSpeed."""
    d = Path(export_dir)
    meta = ExportMeta.read(d)
    where = str(d / MODEL_JSON)
    fname = meta.weights_file(weights, where)
    try:
        net = from_config(meta.model)
        net.load_state_dict(load_file(str(d / fname)), strict=True)
        denoiser = build_precond(meta.precond_spec(), net).to(device).eval()
    except LatentdiffError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as e:
        raise ExportError(f"{where}: cannot rebuild the model from model.json and {fname} ({type(e).__name__}: {e}); "
                          f"{REEXPORT}") from e
    return denoiser, LoadedExport(directory=d, meta=meta, weights_file=fname)
