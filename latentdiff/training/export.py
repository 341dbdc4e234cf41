"""The train stage's last step: a checkpoint consolidated into an export (``latentdiff.contracts.export``).

``raw.safetensors`` holds DeepSpeed's fp32 master weights (``zero_to_fp32`` for ZeRO-1/2/3, the module
state for ZeRO-0), one ``ema-<rate>.safetensors`` per EMA rate; ``model.json`` everything the sampler
needs (:class:`~latentdiff.contracts.export.ExportMeta`).  A checkpoint with power-function EMAs adds one
``phema-<sigma_rel>.safetensors`` per tracked profile.  :func:`write_weights_export` writes the export of
weights made elsewhere (the post-hoc EMA reconstruction) with the same metadata.
"""
from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file

from latentdiff.contracts.export import ExportMeta
from latentdiff.contracts.schedule import TrainingSchedule
from latentdiff.models import from_config
from latentdiff.training.state import STATE_FILE, TrainerState, load_trainer_state
from latentdiff.training.ema import PowerEMA, consolidate
from latentdiff.utils.errors import ExportError
from latentdiff.utils.io import atomic_dir

__all__ = ["export_checkpoint", "write_weights_export"]


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
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:  # ZeRO-0: the module state is the weights
        files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ExportError(f"{ckpt} holds no DeepSpeed model or optimizer states")
        state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    return _strip(state)


def _checked_weights(ckpt: Path, model_config: dict):
    """(raw fp32 weights, the network's buffers that are not in them) of a checkpoint."""
    raw = _raw_weights(ckpt)
    empty = [k for k, v in raw.items() if v.numel() == 0]
    if empty:
        raise ExportError(f"{ckpt}: consolidated tensors with 0 elements: {empty[:5]} (a ZeRO-3 partition was not gathered)")
    net = from_config(model_config)
    missing, unexpected = net.load_state_dict(raw, strict=False)
    if missing or unexpected:
        raise ExportError(f"{ckpt}: weights do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return raw, {k: v for k, v in net.state_dict().items() if k not in raw}


def _metadata(state: TrainerState, ckpt: Path, weights: dict, step: int | None = None,
              images_seen: int | None = None) -> ExportMeta:
    """model.json of a checkpoint's trainer state (``trainer_state.json``)."""
    dataset = {k: v for k, v in state.dataset.items() if k != "vae"}  # the VAE is recorded once, as ``vae``
    precond = {k: v for k, v in state.precond.items() if k != "sigma_data"}  # the schedule's sigma_data
    return ExportMeta(
        model=state.model_config, precond=precond,
        schedule=TrainingSchedule.from_dict(state.schedule, f"{ckpt / STATE_FILE} schedule"),
        vae=state.dataset["vae"], weights=weights, dataset=dataset, step=state.step if step is None else step,
        images_seen=state.images_seen if images_seen is None else images_seen, train_config=state.config,
        checkpoint=str(ckpt),
    )


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Write an export of checkpoint directory ``ckpt`` to ``out`` (replaced atomically); returns ``out``."""
    ckpt, out = Path(ckpt), Path(out)
    state = load_trainer_state(ckpt)
    raw, buffers = _checked_weights(ckpt, state.model_config)
    emas = consolidate(ckpt)
    with atomic_dir(out) as tmp:
        save_file(raw, str(tmp / "raw.safetensors"))
        weights = {"raw": "raw.safetensors", "ema": {}}
        for rate, tensors in emas.items():
            fname = f"ema-{rate:g}.safetensors"
            save_file({**{k: v.float() for k, v in buffers.items()}, **_strip(tensors)}, str(tmp / fname))
            weights["ema"][repr(float(rate))] = fname
        if list(ckpt.glob(f"{PowerEMA.STEM}*.safetensors")):
            weights["phema"] = {}
            for s, tensors in consolidate(ckpt, stem=PowerEMA.STEM).items():
                weights["phema"][repr(float(s))] = phema_file(s)
                save_file({**{k: v.float() for k, v in buffers.items()}, **_strip(tensors)}, str(tmp / phema_file(s)))
        _metadata(state, ckpt, weights).write(tmp)
    return out


def phema_file(sigma_rel: float) -> str:
    return f"phema-{float(sigma_rel):g}.safetensors"


def write_weights_export(ckpt: str | Path, out: str | Path, phema: dict[float, dict[str, torch.Tensor]], *,
                         step: int, images_seen: int) -> Path:
    """An export (no raw weights) of weights ``phema`` {sigma_rel: {engine-module name: tensor}} of the run of
    checkpoint ``ckpt`` (its model config, schedule and dataset), at ``step`` / ``images_seen``."""
    ckpt, out = Path(ckpt), Path(out)
    state = load_trainer_state(ckpt)
    net = from_config(state.model_config)
    phema = {s: _strip(t) for s, t in phema.items()}  # engine-module names (``model.`` prefix) -> network names
    for s, tensors in phema.items():
        missing, unexpected = net.load_state_dict(tensors, strict=False)
        if unexpected or any(k in dict(net.named_parameters()) for k in missing):
            raise ExportError(f"{ckpt}: reconstructed weights (sigma_rel {s}) do not match the model config: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    buffers = {k: v.float() for k, v in net.state_dict().items() if k not in dict(net.named_parameters())}
    with atomic_dir(out) as tmp:
        weights = {"raw": None, "ema": {}, "phema": {}}
        for s, tensors in phema.items():
            weights["phema"][repr(float(s))] = phema_file(s)
            save_file({**buffers, **{k: v.float().contiguous() for k, v in tensors.items()}}, str(tmp / phema_file(s)))
        _metadata(state, ckpt, weights, step, images_seen).write(tmp)
    return out
