"""Exponential moving averages of the denoiser weights, fp32, correct under every ZeRO stage.

``ema <- rate * ema + (1 - rate) * theta`` after every optimizer step, for several rates at once.

* ZeRO-0/1/2: parameters are replicated, every rank keeps the full fp32 EMA (rank 0 saves it).
* ZeRO-3: parameters are partitioned; every rank keeps the EMA of *its own partition*
  (``param.ds_tensor``, a flat slice of ``ceil(numel / world)`` elements, zero-padded at the end), so
  no communication is needed per step and the EMA costs 1/world of the model per rate.  Each rank
  saves its shard; :meth:`EMA.full_state` gathers a full copy (a collective: every rank calls it) and
  :func:`consolidate` rebuilds full tensors offline from the shard files (for the export).

Under bf16/fp16 the module parameters hold the low-precision copy of the fp32 master weights; the EMA
accumulates those values in fp32 (the usual practice; the rounding noise averages out).

:class:`PowerEMA` is the same machinery (partitions, files, gathers, :func:`consolidate`) for EDM2's
power-function profiles keyed by σ_rel, whose decay depends on the image count
(:mod:`latentdiff.training.power_ema`); it lives in its own files (``power_ema*.safetensors``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from latentdiff.training.power_ema import power_beta, sigma_rel_to_gamma
from latentdiff.utils.dist import is_distributed
from latentdiff.utils.errors import TrainError
from latentdiff.utils.safe_load import load_safetensors, open_safetensors

__all__ = ["EMA", "PowerEMA", "consolidate", "is_zero3_param", "update_averages"]


def is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_numel")


def _key(rate: float, name: str) -> str:
    return f"{rate!r}/{name}"


class EMA:
    """Fixed-rate EMAs ``ema <- rate * ema + (1 - rate) * theta``, one per rate (the module docstring)."""

    STEM = "ema"  # file names: STEM.safetensors, or STEM_rankNNNNN.safetensors under ZeRO-3
    KIND = "EMA rates"

    def __init__(self, module: torch.nn.Module, rates):
        self.rates = [float(r) for r in rates]
        named = [(n, p) for n, p in module.named_parameters()]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.zero3 = any(is_zero3_param(p) for p in self.params)
        self.shapes = {n: list(p.ds_shape if self.zero3 else p.shape) for n, p in named}
        self.numels = {n: int(p.ds_numel if self.zero3 else p.numel()) for n, p in named}
        with torch.no_grad():
            self.shadow = {r: [self._source(p).detach().float().clone() for p in self.params] for r in self.rates}

    def _source(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if self.zero3 else p.data

    def current(self) -> list[torch.Tensor]:
        """This rank's fp32 view of the weights the averages follow (the local partition under ZeRO-3)."""
        return [self._source(p).float() for p in self.params]

    def weights(self) -> dict[float, float]:
        """The lerp weight ``1 - rate`` of every rate for this step."""
        return {r: 1.0 - r for r in self.rates}

    def update(self) -> None:
        update_averages([self], [self.weights()])

    # persistence --------------------------------------------------------------------------------
    def _file(self, directory: Path, rank: int) -> Path:
        return directory / (f"{self.STEM}_rank{rank:05d}.safetensors" if self.zero3 else f"{self.STEM}.safetensors")

    def save(self, directory: str | Path, rank: int, world_size: int) -> None:
        """ZeRO-3: every rank writes its shard; otherwise rank 0 writes the full EMA."""
        directory = Path(directory)
        if not self.zero3 and rank != 0:
            return
        tensors = {_key(r, n): t.contiguous() for r, sh in self.shadow.items() for n, t in zip(self.names, sh)}
        meta = {
            "rates": json.dumps(self.rates),
            "zero3": json.dumps(self.zero3),
            "world_size": json.dumps(world_size),
            "rank": json.dumps(rank),
            "shapes": json.dumps(self.shapes),
            "numels": json.dumps(self.numels),
        }
        save_file(tensors, str(self._file(directory, rank)), metadata=meta)

    def load(self, directory: str | Path, rank: int, world_size: int) -> None:
        path = self._file(Path(directory), rank)
        if not path.is_file():
            raise TrainError(f"{path} is missing: the checkpoint has no {self.KIND} for this rank (an incomplete "
                             "checkpoint, or one written with other EMA settings: use those, or a new --run-dir)")
        with open_safetensors(path) as f:
            meta = f.metadata() or {}
        if self.zero3 and json.loads(meta.get("world_size", "0")) != world_size:
            raise TrainError(
                f"{path}: ZeRO-3 EMA shards were written by {meta.get('world_size')} ranks but {world_size} are running; "
                "resume with the same number of ranks"
            )
        if json.loads(meta.get("rates", "[]")) != self.rates:
            raise TrainError(f"{path}: {self.KIND} {meta.get('rates')} differ from the config's {self.rates}")
        tensors = load_safetensors(path)
        with torch.no_grad():
            for r, sh in self.shadow.items():
                for n, t in zip(self.names, sh):
                    src = tensors.get(_key(r, n))
                    if src is None or src.shape != t.shape:
                        raise TrainError(f"{path}: EMA tensor {n} (rate {r}) is missing or has the wrong shape")
                    t.copy_(src)

    # full weights ---------------------------------------------------------------------------------
    @torch.no_grad()
    def full_state(self, rate: float, dst: int | None = 0) -> dict[str, torch.Tensor] | None:
        """Full fp32 EMA tensors for ``rate``.  Under ZeRO-3 this gathers (every rank must call);
        ``dst=None`` returns them on every rank, otherwise only on rank ``dst`` (None elsewhere)."""
        sh = self.shadow[float(rate)]
        if not self.zero3:
            if dst is not None and is_distributed() and dist.get_rank() != dst:
                return None
            return {n: t.clone() for n, t in zip(self.names, sh)}
        world = dist.get_world_size()
        out = {}
        for n, t in zip(self.names, sh):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t)
            out[n] = torch.cat(parts)[: self.numels[n]].view(self.shapes[n]).clone()
        if dst is not None and dist.get_rank() != dst:
            return None
        return out


class PowerEMA(EMA):
    """EDM2 power-function EMAs, one per σ_rel (EDM2 Sec. 3.1, App. C), fp32, ZeRO-aware like :class:`EMA`.

    After the optimizer step that brings the image count to ``t`` (``dt`` images per step):
    ``ema <- beta * ema + (1 - beta) * theta`` with ``beta = (1 - dt/t)^(gamma + 1)`` (EDM2 Sec. 3.1).
    ``rates`` holds the σ_rel values (the keys of the shadow and of the files)."""

    STEM = "power_ema"
    KIND = "power-EMA sigma_rels"

    def __init__(self, module: torch.nn.Module, sigma_rels):
        super().__init__(module, sigma_rels)
        self.gammas = {s: sigma_rel_to_gamma(s) for s in self.rates}

    def weights(self, t: int, dt: int) -> dict[float, float]:  # type: ignore[override]
        """The lerp weight ``1 - beta`` of every σ_rel for the step that brings the image count to ``t``."""
        return {s: 1.0 - power_beta(self.gammas[s], float(t), float(dt)) for s in self.rates}

    def update(self, t: int, dt: int) -> None:  # type: ignore[override]
        update_averages([self], [self.weights(t, dt)])


@torch.no_grad()
def update_averages(averages: list[EMA], weights: list[dict[float, float]]) -> None:
    """``shadow <- shadow + w (theta - shadow)`` (= ``rate * shadow + (1 - rate) * theta`` with
    ``w = 1 - rate``) for every shadow of every average, in one ``torch._foreach_lerp_`` call.

    ``averages`` follow the same parameters (the trainer's EMA and power EMA): the fp32 view of the
    weights is made once (a copy only under bf16/fp16) and, under ZeRO-3, is this rank's partition, so
    the update never communicates.  ``weights[i]`` maps each rate of ``averages[i]`` to its ``w``.
    """
    if not averages:
        return
    cur = averages[0].current()
    dst, src, w = [], [], []
    for avg, ws in zip(averages, weights):
        if len(avg.params) != len(cur) or any(a is not b for a, b in zip(avg.params, averages[0].params)):
            raise ValueError("update_averages: the averages follow different parameters")
        for r, sh in avg.shadow.items():
            dst += sh
            src += cur
            w += [ws[r]] * len(sh)
    if dst:
        torch._foreach_lerp_(dst, src, w)


def consolidate(directory: str | Path, stem: str = EMA.STEM) -> dict[float, dict[str, torch.Tensor]]:
    """Full fp32 EMA weights per rate (or per σ_rel, ``stem=PowerEMA.STEM``) from a checkpoint
    directory, without a process group."""
    directory = Path(directory)
    single = directory / f"{stem}.safetensors"
    if single.is_file():
        files = [single]
    else:
        files = sorted(directory.glob(f"{stem}_rank*.safetensors"))
        if not files:
            raise TrainError(f"{directory} holds no EMA ({stem}.safetensors or {stem}_rank*.safetensors)")
    with open_safetensors(files[0]) as f:
        meta = f.metadata() or {}
    rates = json.loads(meta["rates"])
    shapes, numels = json.loads(meta["shapes"]), json.loads(meta["numels"])
    zero3 = json.loads(meta["zero3"])
    if zero3 and len(files) != json.loads(meta["world_size"]):
        raise TrainError(f"{directory}: {len(files)} EMA shards found, {meta['world_size']} expected (incomplete checkpoint)")
    shards = [load_safetensors(p) for p in files]
    out: dict[float, dict[str, torch.Tensor]] = {}
    for r in rates:
        out[r] = {}
        for n in shapes:
            k = _key(r, n)
            if zero3:
                full = torch.cat([s[k] for s in shards])[: numels[n]]
            else:
                full = shards[0][k].reshape(-1)
            if full.numel() != numels[n] or numels[n] == 0:
                raise TrainError(f"{directory}: EMA tensor {n} has {full.numel()} elements, expected {numels[n]} (> 0)")
            out[r][n] = full.view(shapes[n]).clone()
    return out
