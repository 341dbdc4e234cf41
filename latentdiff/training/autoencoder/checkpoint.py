"""Resumable autoencoder checkpoints: safetensors weights, torch-free JSON state, optimizer state.

``OUT/checkpoint/``: ``model.safetensors``, ``ema.safetensors``, ``optimizer.pt`` (``torch.save`` of the
AdamW + scheduler state dicts, read back with ``weights_only=True``) and ``state.json`` (step, the
architecture, the data hash, the held-out history).  The directory is replaced atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from latentdiff.utils.errors import TrainError
from latentdiff.utils.io import atomic_dir, atomic_write_json

__all__ = ["CHECKPOINT", "load_checkpoint", "save_checkpoint"]

CHECKPOINT = "checkpoint"


def _state_dict(m: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}


def save_checkpoint(out: Path, model, ema, opt, sched, state: dict) -> None:
    with atomic_dir(out / CHECKPOINT) as tmp:
        save_file(_state_dict(model), str(tmp / "model.safetensors"))
        save_file(_state_dict(ema), str(tmp / "ema.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", state)


def load_checkpoint(out: Path, arch: dict, data_sha256: str, model, ema, opt, sched) -> dict | None:
    """The saved state (weights loaded into the objects), or None when there is no checkpoint.

    A checkpoint of another architecture or other training images is refused (:class:`TrainError`)."""
    ck = out / CHECKPOINT
    if not (ck / "state.json").is_file():
        return None
    try:
        state = json.loads((ck / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exn:
        raise TrainError(f"{ck / 'state.json'}: unreadable ({exn}); delete {ck} to start over") from exn
    if state.get("architecture") != arch:
        diff = sorted(k for k in set(arch) | set(state.get("architecture", {}))
                      if arch.get(k) != state.get("architecture", {}).get(k))
        raise TrainError(
            f"{ck}: the checkpoint was trained with another architecture (differs in {', '.join(diff)}); "
            f"re-run with the original flags to resume, or use a new --output (or delete {ck}) to start over")
    if state.get("data_sha256") != data_sha256:
        raise TrainError(
            f"{ck}: the checkpoint was trained on other images (data hash {state.get('data_sha256', '?')[:12]} "
            f"!= {data_sha256[:12]}); pass the same --input/--resolution to resume, or use a new --output")
    model.load_state_dict(load_file(str(ck / "model.safetensors")))
    ema.load_state_dict(load_file(str(ck / "ema.safetensors")))
    blob = torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    return state
