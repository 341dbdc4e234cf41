"""The export contract (``model.json`` + safetensors): what the train stage hands to the sample stage.

An export directory holds ``raw.safetensors`` (consolidated fp32 weights), ``ema-<rate>.safetensors``
and ``model.json``: the network config (``latentdiff.models``), the preconditioning (EDM, sigma_data),
the normalization raw <-> model space, the sigma schedule (training distribution, sigma_min,
data-driven sigma_max, WSNR alignment), the VAE description, the dataset manifest hash, class count
and null label, the training config.  :func:`load_export` rebuilds the denoiser without DeepSpeed and
refuses an export whose metadata is missing or inconsistent.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from safetensors.torch import load_file

from latentdiff.diffusion.distances import data_driven_sigma_max
from latentdiff.diffusion.precond import build_precond
from latentdiff.models import from_config
from latentdiff.utils.errors import ExportError, SampleError
from latentdiff.vae.decode import is_pixel_vae
from latentdiff.vae.normalization import Normalization

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "load_export", "export_hash", "check_export_meta"]

EXPORT_FORMAT = "latentdiff-export"
EXPORT_VERSION = 1
REQUIRED = ("format", "format_version", "model", "precond", "normalization", "schedule", "vae", "weights", "num_classes")


def export_hash(export_dir: str | Path) -> str:
    """sha256 over model.json and the weight files (what sampling.json records)."""
    d = Path(export_dir)
    h = hashlib.sha256()
    for name in ["model.json"] + sorted(p.name for p in d.glob("*.safetensors")):
        h.update(name.encode())
        with open(d / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _check_meta(meta: dict, path: Path) -> None:
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ExportError(f"{path}: missing fields {missing}; re-export with latentdiff-export RUN")
    if meta["format"] != EXPORT_FORMAT:
        raise ExportError(f"{path}: format {meta['format']!r} is not {EXPORT_FORMAT!r}")
    sched, norm = meta["schedule"], meta["normalization"]
    for k in ("sigma_min", "sigma_max", "sigma_data", "sigma_dist", "normalization"):
        if k not in sched:
            raise ExportError(f"{path}: schedule lacks {k!r}; re-export with latentdiff-export RUN")
    if sched["normalization"] != norm:
        raise ExportError(f"{path}: 'normalization' disagrees with 'schedule.normalization'; the export was edited by hand")
    for k in ("kind", "shift", "scale"):
        if k not in norm:
            raise ExportError(f"{path}: normalization lacks {k!r}")
    c = int(meta["model"].get("in_channels", -1))
    if len(norm["shift"]) != c or len(norm["scale"]) != c:
        raise ExportError(f"{path}: normalization has {len(norm['scale'])} channels but the model takes {c}")
    if meta["precond"].get("kind") == "edm" and not math.isclose(meta["precond"].get("sigma_data", -1), sched["sigma_data"]):
        raise ExportError(f"{path}: precond.sigma_data {meta['precond'].get('sigma_data')} != schedule.sigma_data {sched['sigma_data']}")
    if not (0 < sched["sigma_min"] < sched["sigma_max"] and math.isfinite(sched["sigma_max"])):
        raise ExportError(f"{path}: inconsistent sigma range [{sched['sigma_min']}, {sched['sigma_max']}]")


def check_export_meta(meta: dict, where: str = "model.json") -> None:
    """Raise :class:`SampleError` when the export's normalization / sigma schedule / VAE / class
    metadata is inconsistent.  ``load_export`` already checked the presence of the fields, the
    normalization's channel count against the model, sigma_data against the preconditioning and
    0 < sigma_min < sigma_max; this adds the cross-checks the sampler relies on."""
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


def load_export(export_dir: str | Path, weights: str = "ema", device="cpu"):
    """(denoiser, meta): the preconditioned network with ``weights`` = ``ema`` (largest rate), an EMA
    rate such as ``0.9999``, or ``raw``; ``meta`` is model.json."""
    d = Path(export_dir)
    path = d / "model.json"
    if not path.is_file():
        raise ExportError(f"{path} not found: pass an export directory (RUN/export/step_NNNNNNNN) made by latentdiff-export")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    _check_meta(meta, path)
    if weights == "raw":
        fname = meta["weights"]["raw"]
    else:
        emas = meta["weights"]["ema"]
        if not emas:
            raise ExportError(f"{path}: the export has no EMA weights; use weights='raw'")
        if weights == "ema":
            key = max(emas, key=float)
        else:
            key = next((k for k in emas if math.isclose(float(k), float(weights))), None)
            if key is None:
                raise ExportError(f"{path}: no EMA with rate {weights}; available: {sorted(emas)} or 'raw'")
        fname = emas[key]
    net = from_config(meta["model"])
    state = load_file(str(d / fname))
    net.load_state_dict(state, strict=True)
    denoiser = build_precond(meta["precond"], net).to(device).eval()
    meta["_weights_file"] = fname
    return denoiser, meta
