"""The train stage's last step: a checkpoint consolidated into an export (``latentdiff.contracts.export``).

``raw.safetensors`` holds DeepSpeed's fp32 master weights (``zero_to_fp32`` for ZeRO-1/2/3, the module
state for ZeRO-0), one ``ema-<rate>.safetensors`` per EMA rate; ``model.json`` everything the sampler
needs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentdiff.contracts.export import EXPORT_FORMAT, EXPORT_VERSION
from latentdiff.models import from_config
from latentdiff.training.state import load_trainer_state
from latentdiff.training.ema import consolidate
from latentdiff.utils.errors import ExportError

__all__ = ["export_checkpoint"]


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


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Write an export of checkpoint directory ``ckpt`` to ``out``; returns ``out``."""
    ckpt, out = Path(ckpt), Path(out)
    state = load_trainer_state(ckpt)
    raw = _raw_weights(ckpt)
    empty = [k for k, v in raw.items() if v.numel() == 0]
    if empty:
        raise ExportError(f"{ckpt}: consolidated tensors with 0 elements: {empty[:5]} (a ZeRO-3 partition was not gathered)")
    net = from_config(state.model_config)
    missing, unexpected = net.load_state_dict(raw, strict=False)
    if missing or unexpected:
        raise ExportError(f"{ckpt}: weights do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    emas = consolidate(ckpt)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
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
        "step": state.step,
        "images_seen": state.images_seen,
        "model": state.model_config,
        "precond": state.precond,
        "normalization": state.schedule["normalization"],
        "schedule": state.schedule,
        "vae": state.dataset["vae"],
        "dataset": state.dataset,
        "num_classes": state.num_classes,
        "null_label": state.null_label,
        "label_dropout": state.config["label_dropout"],
        "weights": weights,
        "train_config": state.config,
        "checkpoint": str(ckpt),
    }
    (tmp / "model.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
