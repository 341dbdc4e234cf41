"""What every denoiser network of ``latentdiff.models`` shares: its null class and its JSON config."""
from __future__ import annotations

from dataclasses import asdict

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
