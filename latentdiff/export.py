"""Export a training checkpoint as plain safetensors + ``model.json``, loadable without DeepSpeed.

``latentdiff-export RUN [--step S] [--out DIR]`` writes ``RUN/export/step_NNNNNNNN/`` (or DIR):

* ``raw.safetensors`` — the consolidated fp32 network weights (DeepSpeed's ``zero_to_fp32`` for
  ZeRO-1/2/3, i.e. the fp32 master weights; the module state for ZeRO-0);
* ``ema-<rate>.safetensors`` — one fp32 EMA per rate;
* ``model.json`` — everything the sampler needs: the network config (``latentdiff.models``), the
  preconditioning (EDM, sigma_data), the normalization raw <-> model space, the sigma schedule
  (training distribution, sigma_min, data-driven sigma_max, WSNR alignment), the VAE description,
  the dataset manifest hash, class count and null label, the training config.

:func:`load_export` rebuilds the denoiser and refuses an export whose metadata is missing or
inconsistent (trap T14/T21).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ExportError

__all__ = ["EXPORT_FORMAT", "export_checkpoint", "load_export", "export_hash", "main"]

EXPORT_FORMAT = "latentdiff-export"
EXPORT_VERSION = 1
REQUIRED = ("format", "format_version", "model", "precond", "normalization", "schedule", "vae", "weights", "num_classes")


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Network weights from the Precond wrapper's state (``model.`` prefix)."""
    out = {}
    for k, v in state.items():
        if not k.startswith("model."):
            continue
        out[k[len("model.") :]] = v.detach().to(torch.float32).contiguous().clone()
    return out


def _raw_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from a DeepSpeed checkpoint directory (no process group needed)."""
    if list(ckpt.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:  # ZeRO-0: the module state is the weights
        files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ExportError(f"{ckpt} holds no DeepSpeed model or optimizer states")
        state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    return _strip(state)


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


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Write an export of checkpoint directory ``ckpt`` to ``out``; returns ``out``."""
    from .models import from_config
    from .training.checkpoint import load_trainer_state
    from .training.ema import consolidate

    ckpt, out = Path(ckpt), Path(out)
    state = load_trainer_state(ckpt)
    raw = _raw_weights(ckpt)
    empty = [k for k, v in raw.items() if v.numel() == 0]
    if empty:
        raise ExportError(f"{ckpt}: consolidated tensors with 0 elements: {empty[:5]} (a ZeRO-3 partition was not gathered)")
    net = from_config(state["model_config"])
    missing, unexpected = net.load_state_dict(raw, strict=False)
    if missing or unexpected:
        raise ExportError(f"{ckpt}: weights do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    emas = consolidate(ckpt)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(raw, str(tmp / "raw.safetensors"))
    weights = {"raw": "raw.safetensors", "ema": {}}
    buffers = {k: v for k, v in net.state_dict().items() if k not in raw}
    for rate, tensors in emas.items():
        ema = {**{k: v.float() for k, v in buffers.items()}, **_strip(tensors)}
        fname = f"ema-{rate:g}.safetensors"
        save_file(ema, str(tmp / fname))
        weights["ema"][repr(float(rate))] = fname
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "step": state["step"],
        "images_seen": state["images_seen"],
        "model": state["model_config"],
        "precond": state["precond"],
        "normalization": state["schedule"]["normalization"],
        "schedule": state["schedule"],
        "vae": state["dataset"]["vae"],
        "dataset": state["dataset"],
        "num_classes": state["num_classes"],
        "null_label": state.get("null_label", state["model_config"].get("null_label")) if state["num_classes"] > 0 else None,
        "label_dropout": state["config"]["label_dropout"],
        "weights": weights,
        "train_config": state["config"],
        "checkpoint": str(ckpt),
    }
    (tmp / "model.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


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


def load_export(export_dir: str | Path, weights: str = "ema", device="cpu"):
    """(denoiser, meta): the preconditioned network with ``weights`` = ``ema`` (largest rate), an EMA
    rate such as ``0.9999``, or ``raw``; ``meta`` is model.json."""
    from .models import from_config
    from .precond import build_precond

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="latentdiff-export", description="Export a training checkpoint (no DeepSpeed needed to load it).")
    p.add_argument("run", help="run directory (with checkpoints/) or a checkpoint directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", default=None, help="output directory (default RUN/export/step_NNNNNNNN)")
    args = p.parse_args(argv)
    from .training.checkpoint import find_latest, tag_for

    run = Path(args.run)
    if (run / "trainer_state.json").is_file():
        ckpt, run = run, run.parent.parent
    else:
        root = run / "checkpoints"
        ckpt = root / tag_for(args.step) if args.step is not None else find_latest(root)
        if ckpt is None or not (ckpt / "COMPLETE").is_file():
            print(f"latentdiff-export: no complete checkpoint {'for step ' + str(args.step) if args.step is not None else ''} "
                  f"under {root}", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else run / "export" / ckpt.name
    try:
        export_checkpoint(ckpt, out)
    except ExportError as e:
        print(f"latentdiff-export: {e}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
