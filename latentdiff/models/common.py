"""What every denoiser network of ``latentdiff.models`` shares: its null class, its JSON config and the
check of the labels it is called with."""
from __future__ import annotations

from dataclasses import asdict

import torch

__all__ = ["DenoiserNetMixin"]


class DenoiserNetMixin:
    """For a network with ``name``, ``arch`` and a dataclass ``cfg`` holding ``num_classes``/``null_label``."""

    @property
    def null_label(self) -> int | None:
        """Index of the learned null class (None for an unconditional model)."""
        return self.cfg.null_label if self.cfg.num_classes > 0 else None

    @property
    def config(self) -> dict:
        """JSON-serializable description; ``latentdiff.models.from_config`` rebuilds the model."""
        return {"name": self.name, "arch": self.arch, **asdict(self.cfg)}

    def _check_labels(self, x: torch.Tensor, labels) -> None:
        """``labels``: None for an unconditional network, else (B,) integers (the null class for unconditional rows)."""
        c = self.cfg
        if c.num_classes == 0:
            if labels is not None:
                raise ValueError(f"{self.name} is unconditional (num_classes=0) but labels were given")
            return
        if labels is None:
            raise ValueError(
                f"{self.name} is class-conditional (num_classes={c.num_classes}): pass labels "
                f"(use the null class {self.null_label} for unconditional samples)"
            )
        if labels.shape != (x.shape[0],) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{self.name}: labels must be an integer tensor of shape ({x.shape[0]},), "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )
