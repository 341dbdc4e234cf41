"""The DeepSpeed side of training: the ds_config, the engine with AdamW and the warmup schedule, and
the fp16 loss-scale watch.

The user's ds_config JSON chooses the ZeRO stage, precision and offload; the batch sizes and the
gradient clipping always come from the :class:`~latentdiff.training.config.TrainConfig`.  The
optimizer and the learning-rate schedule are built here, never by DeepSpeed.
"""
from __future__ import annotations

import copy
import math

import deepspeed
import torch

from latentdiff.training.config import TrainConfig
from latentdiff.utils.dist import is_distributed
from latentdiff.utils.errors import ConfigError, TrainError

__all__ = ["build_ds_config", "ds_precision", "check_precision_supported", "build_engine", "warmup_steps_for",
           "LossScaleWatch", "use_fused_adamw"]


def build_ds_config(cfg: TrainConfig, base: dict | None, world_size: int) -> dict:
    """The DeepSpeed config: the user's JSON (ZeRO stage, precision, offload) + our batch/clip values.

    A batch size or clipping value in the JSON that disagrees with the TrainConfig is refused (naming
    both values) instead of being overridden; ``"auto"`` or the same value is accepted.
    """
    ds = copy.deepcopy(base or {"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}})
    for forbidden in ("optimizer", "scheduler"):
        if forbidden in ds:
            raise ConfigError(
                f"the DeepSpeed config has an '{forbidden}' section; latentdiff builds AdamW and the warmup "
                f"schedule itself from the TrainConfig (lr, betas, eps, weight_decay, warmup_images): remove it"
            )
    ours = {"train_micro_batch_size_per_gpu": cfg.micro_batch, "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.resolved_global_batch(world_size), "gradient_clipping": float(cfg.grad_clip)}
    for key, value in ours.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(
                f"the DeepSpeed config sets {key} = {given!r} but the TrainConfig gives {value!r} (micro_batch "
                f"{cfg.micro_batch} x grad_accum {cfg.grad_accum} x world size {world_size}, grad_clip "
                f"{cfg.grad_clip}): set batch sizes and clipping in the TrainConfig and remove {key} from the JSON "
                "(or write \"auto\")"
            )
    ds.update(ours)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    if cfg.precision != "auto":
        ds["bf16"] = {"enabled": cfg.precision == "bf16"}
        fp16 = ds.get("fp16", {}) if isinstance(ds.get("fp16"), dict) else {}
        fp16["enabled"] = cfg.precision == "fp16"
        ds["fp16"] = fp16
    zero = ds.setdefault("zero_optimization", {})
    if isinstance(zero.get("offload_optimizer"), dict) and zero["offload_optimizer"].get("device", "none") != "none":
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def ds_precision(ds: dict) -> str:
    """The training precision a ds_config selects: bf16, fp16 or fp32."""
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def check_precision_supported(ds: dict) -> None:
    """Refuse (ConfigError) a precision DeepSpeed's accelerator will not train in, with the cause and the fix.

    DeepSpeed raises a bare ``ValueError("Type fp16 is not supported on your device.")`` inside
    ``deepspeed.initialize`` for it.  On CPU its accelerator enables fp16 only when oneDNN has native fp16
    kernels (``torch.ops.mkldnn._is_mkldnn_fp16_supported()``: AVX512-FP16 or AMX-FP16, e.g. Intel Sapphire
    Rapids), so the same command trains on one CPU model and not on another (an AMD EPYC, an older Xeon).
    """
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    precision = ds_precision(ds)
    ok = {"fp16": acc.is_fp16_supported, "bf16": acc.is_bf16_supported}.get(precision, lambda: True)()
    if not ok:
        why = (" (DeepSpeed's CPU accelerator trains fp16 only where oneDNN has native fp16 kernels: AVX512-FP16 "
               "or AMX-FP16 CPUs)") if acc.device_name() == "cpu" else ""
        other = "bf16" if precision == "fp16" else "fp32"
        raise ConfigError(
            f"DeepSpeed does not support {precision} training on this {acc.device_name()} device{why}; "
            f"use --precision {other} or fp32 (or a DeepSpeed config with {precision} disabled)"
        )


def use_fused_adamw(impl: str, device_type: str) -> bool:
    """``adamw_impl`` -> whether torch's fused AdamW kernels run the step.

    ``auto``: fused on an accelerator (not the CPU) whose torch build has them (CUDA, XPU, ...), where
    they replace the per-parameter loop with a few multi-tensor kernels; torch's default on the CPU.
    ``fused``: fused wherever torch has them, the CPU included (an error naming the device otherwise).
    ``default``: torch's default (foreach kernels on CUDA, a loop on the CPU)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = device_type in _get_fused_kernels_supported_devices()
    if impl == "fused" and not supported:
        raise ConfigError(f"adamw_impl fused: this torch has no fused AdamW for {device_type!r} devices; "
                          "use adamw_impl auto or default")
    return impl == "fused" or (impl == "auto" and supported and device_type != "cpu")


def build_engine(denoiser: torch.nn.Module, cfg: TrainConfig, ds_config: dict, warmup_steps: int,
                 device_type: str = "cpu"):
    """``(engine, optimizer, lr_scheduler)``: AdamW over the trainable parameters (fused kernels as
    :func:`use_fused_adamw` says), a linear warmup over ``warmup_steps`` optimizer steps, wrapped by
    ``deepspeed.initialize``; the module compiled in place when ``cfg.compile``."""
    check_precision_supported(ds_config)
    opt = torch.optim.AdamW(
        [p for p in denoiser.parameters() if p.requires_grad], lr=cfg.lr, betas=tuple(cfg.betas),
        eps=cfg.eps, weight_decay=cfg.weight_decay, fused=use_fused_adamw(cfg.adamw_impl, device_type) or None,
    )
    warm = warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=denoiser, optimizer=opt, lr_scheduler=sched, config=ds_config,
        dist_init_required=not is_distributed(),
    )
    if cfg.compile:  # DeepSpeed's own entry point: module.compile() (in place) with its backend and hooks
        engine.compile()
    return engine, optimizer, lr_scheduler


class LossScaleWatch:
    """fp16: stops training with a clear :class:`TrainError` when the loss scale is stuck at its minimum.

    DeepSpeed raises a bare Exception at the first overflow at the minimum scale; that is switched off
    and the consecutive skipped steps at the minimum are counted here instead.
    """

    def __init__(self, engine, optimizer, ds_config: dict, precision: str, max_streak: int):
        self.engine, self.optimizer, self.precision, self.max_streak = engine, optimizer, precision, max_streak
        self.min_scale = ds_config.get("fp16", {}).get("min_loss_scale", 1)
        self.loss_scaler = getattr(optimizer, "loss_scaler", None)
        if precision == "fp16" and self.loss_scaler is not None:
            self.loss_scaler.raise_error_at_min_scale = False
        self.streak = 0

    def scale(self) -> float | None:
        if self.loss_scaler is not None and hasattr(self.loss_scaler, "cur_scale"):
            return float(self.loss_scaler.cur_scale)
        v = getattr(self.optimizer, "cur_scale", None)
        return None if v is None else float(v)

    def check(self, step: int) -> None:
        """Call after every optimizer step."""
        if self.precision != "fp16":
            return
        scale = self.scale()
        skipped = not self.engine.was_step_applied()
        at_min = skipped and scale is not None and scale <= self.min_scale
        self.streak = self.streak + 1 if at_min else 0
        if self.streak >= self.max_streak:
            raise TrainError(
                f"fp16 loss scale stuck at its minimum {self.min_scale} for {self.streak} skipped steps "
                f"(step {step}): the loss overflows; lower lr, use bf16 (--precision bf16) or fp32"
            )


def warmup_steps_for(cfg: TrainConfig, global_batch: int) -> int:
    """Optimizer steps of the linear warmup (``warmup_images`` rounded up to whole steps)."""
    return math.ceil(cfg.warmup_images / global_batch) if cfg.warmup_images else 0
