"""Post-hoc EMA reconstruction (EDM2 App. C): the EMA of any width σ_rel, ending at any image count up
to the last snapshot, as a least-squares combination of the stored power-EMA snapshots
(:mod:`latentdiff.training.snapshots`).

For each target (σ_rel, end t*) the columns are every (snapshot i, tracked profile γ_j) with t_i ≤ t*
(no weights from after the end point); :func:`~latentdiff.training.power_ema.solve_weights` gives the
weights x and the fit error.  :func:`reconstruct` then reads each snapshot file **once** for all targets
and accumulates ``Σ x · weights`` in float64 (the weights of an ill-conditioned fit are large and of both
signs; 8 bytes per parameter per target).  A snapshot stored in fp16 contributes its fp16 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from latentdiff.training.power_ema import Fit, sigma_rel_to_gamma, solve_weights
from latentdiff.training.snapshots import Snapshot
from latentdiff.utils.errors import TrainError

__all__ = ["Plan", "Target", "plan", "reconstruct"]


@dataclass(frozen=True)
class Target:
    sigma_rel: float
    images: int | None = None  # end point t*; None = the last snapshot


@dataclass
class Plan:
    """One target's fit: the columns (snapshot index, σ_rel of the tracked profile), weights, error."""

    sigma_rel: float
    gamma: float
    images: int
    step: int
    columns: list[tuple[int, float]]
    fit: Fit
    used: list[int] = field(default_factory=list)  # the snapshot indices with a column

    def summary(self) -> dict:
        return {"sigma_rel": self.sigma_rel, "gamma": self.gamma, "images": self.images, "step": self.step,
                "fit_rel_error": self.fit.rel_error, "snapshots": len(self.used),
                "columns": [{"snapshot": i, "sigma_rel": s, "weight": float(w)}
                            for (i, s), w in zip(self.columns, self.fit.weights)]}


def _step_at(snaps: list[Snapshot], images: int) -> int:
    for s in snaps:
        if s.images == images:
            return s.step
    last = max((s for s in snaps if s.images <= images), key=lambda s: s.images)
    return last.step + (images - last.images) // max(last.global_batch, 1)


def plan(snaps: list[Snapshot], targets: list[Target]) -> list[Plan]:
    """The least-squares fit of every target (no weights are read)."""
    if not snaps:
        raise TrainError("no EMA snapshots: train with --snapshot-every-images K (and power_ema_sigma_rels)")
    out = []
    for tg in targets:
        end = snaps[-1].images if tg.images is None else int(tg.images)
        if end > snaps[-1].images or end < snaps[0].images:
            raise TrainError(f"end point {end} images is outside the snapshots' range "
                             f"[{snaps[0].images}, {snaps[-1].images}]")
        cols = [(i, s, g) for i, sn in enumerate(snaps) if sn.images <= end for s, g in sn.profiles]
        gamma = sigma_rel_to_gamma(tg.sigma_rel)
        fit = solve_weights([snaps[i].images for i, _, _ in cols], [g for _, _, g in cols], end, gamma)
        out.append(Plan(tg.sigma_rel, gamma, end, _step_at(snaps, end), [(i, s) for i, s, _ in cols], fit,
                        sorted({i for i, _, _ in cols})))
    return out


def reconstruct(snaps: list[Snapshot], plans: list[Plan], log=None) -> list[dict[str, torch.Tensor]]:
    """Weights of every plan (float32), reading each needed snapshot once and converting each tensor once."""
    acc: list[dict[str, torch.Tensor] | None] = [None] * len(plans)
    needed = sorted({i for p in plans for i in p.used})
    for n, i in enumerate(needed):
        if log is not None:
            log(f"reading snapshot {n + 1}/{len(needed)}: {snaps[i].path.name}")
        weights = snaps[i].load()
        for s, _ in snaps[i].profiles:
            uses = [(j, float(x)) for j, p in enumerate(plans) for (ci, cs), x in zip(p.columns, p.fit.weights)
                    if ci == i and cs == s]
            tensors = weights.get(s)
            if not uses:
                continue
            if not tensors:
                raise TrainError(f"{snaps[i].path}: no tensors for sigma_rel {s} though its record lists it")
            for j, _ in uses:
                if acc[j] is None:
                    acc[j] = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in tensors.items()}
                if acc[j].keys() != tensors.keys():
                    raise TrainError(f"{snaps[i].path}: its tensors differ from the other snapshots' "
                                     "(snapshots of another model in the same directory?)")
            for k, v in tensors.items():
                v64 = v.double()
                for j, x in uses:
                    acc[j][k].add_(v64, alpha=x)
    return [{k: v.float() for k, v in a.items()} for a in acc]
