"""Reading files other people wrote without running their code: the one home of every checkpoint load.

Checkpoints, exports, EMA snapshots and reference statistics travel between people and clusters, and a
pickle runs whatever its ``__reduce__`` names.  Everything latentdiff reads goes through this module:

* torch files (DeepSpeed's ``mp_rank_*_model_states.pt`` / ``*optim_states.pt``, Inception weights):
  :func:`torch_load` = ``torch.load(weights_only=True)`` with only the extra classes a caller names.
  DeepSpeed's checkpoints need exactly :data:`DEEPSPEED_CHECKPOINT_GLOBALS` (found with
  ``torch.serialization.get_unsafe_globals_in_checkpoint`` on real ZeRO-0/1/2/3, ZeRO-3-offload, bf16
  and fp16 checkpoints written by this project): its loss scaler (static or dynamic), the ZeRO stage
  enum and the fp32-fragment address.  Their constructors only store numbers.
* DeepSpeed's own loaders (the engine's checkpoint engine on resume, ``zero_to_fp32`` in the export)
  call ``torch.load(weights_only=False)``.  :func:`safe_torch_load_scope` replaces ``torch.load`` for the
  duration of such a call with :func:`torch_load` (``weights_only`` forced on, the DeepSpeed classes
  allowed), whatever the caller asked for.
* safetensors (exports, EMA): :func:`load_safetensors` / :func:`open_safetensors` (the format cannot
  hold code); a corrupt header becomes an error naming the file.
* ``.npz`` / ``.npy``: :func:`load_npz` with ``allow_pickle=False``.

A refusal is an :class:`UnsafeFileError` naming the file and the class it would have had to import.
"""
from __future__ import annotations

import contextlib
import importlib
import pickle
import re
import threading
from pathlib import Path

import numpy as np
import torch

from latentdiff.utils.errors import LatentdiffError

__all__ = [
    "DEEPSPEED_CHECKPOINT_GLOBALS",
    "UnreadableFileError",
    "UnsafeFileError",
    "deepspeed_globals",
    "load_npz",
    "load_safetensors",
    "open_safetensors",
    "safe_torch_load_scope",
    "torch_load",
]

# what a DeepSpeed ZeRO-0/1/2/3 checkpoint of this project holds besides tensors and containers
DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_REAL_TORCH_LOAD = torch.load
_SCOPE_LOCK = threading.RLock()


class UnsafeFileError(LatentdiffError):
    """A file holds more than plain tensors/arrays and containers (pickled code or objects): not loaded."""


class UnreadableFileError(LatentdiffError):
    """A weights file is truncated or corrupt (e.g. a broken safetensors header)."""


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def deepspeed_globals() -> list:
    """The classes of :data:`DEEPSPEED_CHECKPOINT_GLOBALS` (imports DeepSpeed)."""
    return [_resolve(n) for n in DEEPSPEED_CHECKPOINT_GLOBALS]


def _refusal(path, what: str, detail: str) -> UnsafeFileError:
    m = re.search(r"GLOBAL (\S+)", detail) or re.search(r"global[s]? [`'\"]?([\w.]+)", detail)
    named = f" (it needs {m.group(1)})" if m else ""
    return UnsafeFileError(
        f"refusing to load {path}: it holds {what}{named}, not plain tensors and containers. Unpickling it could "
        "run code; latentdiff loads checkpoints with weights_only. If the file is yours and trusted, convert it "
        "to plain tensors (or safetensors) where it was made; otherwise delete it"
    )


def torch_load(path, *, map_location="cpu", allow=(), mmap: bool | None = None):
    """``torch.load(path, weights_only=True)`` with only the classes ``allow`` permitted besides tensors and
    containers; :class:`UnsafeFileError` naming ``path`` otherwise."""
    kw = {} if mmap is None else {"mmap": mmap}
    try:
        with torch.serialization.safe_globals(list(allow)):
            return _REAL_TORCH_LOAD(path, map_location=map_location, weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL " in str(e):
            raise _refusal(path, "pickled objects", str(e)) from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+?)\s*(\n|$)", str(e))
        raise pickle.UnpicklingError(  # not a torch file, or opcodes weights_only cannot read: never unpickled
            f"{path} cannot be read with torch.load(weights_only=True): {detail.group(1) if detail else e}"
        ) from None


def _scoped_load(allow):
    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        if pickle_module is not None or kwargs:
            raise UnsafeFileError(f"refusing to load {f}: a custom pickle module / {sorted(kwargs)} was requested")
        return torch_load(f, map_location=map_location, allow=allow, mmap=mmap)

    return load


@contextlib.contextmanager
def safe_torch_load_scope(allow=None):
    """Within the block, every ``torch.load`` (DeepSpeed's included, whatever ``weights_only`` it passes) is
    :func:`torch_load` with ``allow`` (default: the DeepSpeed checkpoint classes).  Process-wide while it
    lasts (the call paths it guards are single-threaded); nested scopes are fine."""
    allow = deepspeed_globals() if allow is None else list(allow)
    with _SCOPE_LOCK:
        previous = torch.load
        torch.load = _scoped_load(allow)
        try:
            yield
        finally:
            torch.load = previous


def _safetensors_error(path, e: Exception) -> LatentdiffError:
    return UnreadableFileError(
        f"cannot read {path}: not a valid safetensors file ({type(e).__name__}: {e}); the file is truncated or "
        "corrupt - restore it or re-create it (re-export / resume from an earlier checkpoint)"
    )


def load_safetensors(path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a corrupt file is an error naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as e:  # SafetensorError, OSError, ValueError: one message naming the file
        raise _safetensors_error(path, e) from e


@contextlib.contextmanager
def open_safetensors(path):
    """``safetensors.safe_open(path, "pt")`` whose open errors name the file."""
    from safetensors import safe_open

    try:
        f = safe_open(str(path), "pt")
    except Exception as e:
        raise _safetensors_error(path, e) from e
    with f:
        yield f


def _pickle_refusal(e: ValueError) -> bool:
    return "allow_pickle" in str(e) or "Object arrays" in str(e) or "pickled" in str(e)


def load_npz(path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` read with ``allow_pickle=False``; pickled data (an object array, or a
    pickle under an .npz name) is refused naming the file (and the key)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:1] == b"\x80":  # a pickle (protocol >= 2), whatever the name says
        raise _refusal(path, "pickled data", "")
    if head[:4] != b"PK\x03\x04" and head != b"\x93NUMPY":
        raise ValueError(f"{path} is not an .npz archive (it starts with {head!r}, not a zip signature)")
    out = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise UnsafeFileError(f"{path} is a single .npy array, not an .npz archive of named arrays")
            for k in data.files:
                try:
                    out[k] = data[k]
                except ValueError as e:
                    if _pickle_refusal(e):
                        raise _refusal(path, f"a pickled object array '{k}'", str(e)) from None
                    raise
    except ValueError as e:
        if _pickle_refusal(e):
            raise _refusal(path, "pickled data", str(e)) from None
        raise
    return out
