"""The FID stage's configuration: one dataclass, loaded from YAML and flags by ``latentdiff.utils.config``."""
from __future__ import annotations

from dataclasses import dataclass, field

from latentdiff.metrics.frechet import MIN_SAMPLES
from latentdiff.metrics.image_sources import parse_seed_set
from latentdiff.metrics.inception import WEIGHTS_ENV
from latentdiff.utils.errors import FIDError

__all__ = ["FIDConfig", "INPUT_FORMATS"]

INPUT_FORMATS = ("auto", "png", "npz")


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


@dataclass
class FIDConfig:
    """What ``latentdiff-fid`` computes; every field is a flag and a YAML key (``samples`` is positional)."""

    samples: list = field(default_factory=list, metadata=_help(
        "samples directories (PNGs or samples.npz) or ADM samples.npz files"))
    ref: str | None = field(default=None, metadata=_help(
        "reference statistics .npz (mu, sigma), e.g. from tools/fid_reference.py, EDM or ADM"))
    seeds: list = field(default_factory=list, metadata=_help(
        "seed range(s) to evaluate, e.g. 0-49999; repeat the flag for several FIDs (min/mean reported)",
        repeat=True, metavar="SEEDS"))
    inception_weights: str | None = field(default=None, metadata=_help(
        f"torch-fidelity Inception state dict (default: ${WEIGHTS_ENV} or the torch hub cache)"))
    download_weights: bool = field(default=False, metadata=_help(
        "explicitly download the official weights to the torch hub cache"))
    allow_small: bool = field(default=False, metadata=_help(
        f"allow fewer than {MIN_SAMPLES} samples (smoke tests only)"))
    batch_size: int = field(default=64, metadata=_help("images per forward pass per rank"))
    input_format: str = field(default="auto", metadata=_help(f"one of {', '.join(INPUT_FORMATS)}"))
    out: str | None = field(default=None, metadata=_help(
        "fid.json path (default: SAMPLES/fid.json for one samples directory, else ./fid.json)"))
    save_stats: str | None = field(default=None, metadata=_help(
        "also write the samples' statistics (.npz + provenance) for a single run"))
    device: str | None = field(default=None, metadata=_help("torch device (default: this rank's accelerator device)"))
    no_progress: bool = field(default=False, metadata=_help("no progress bar"))

    def validate(self) -> "FIDConfig":
        """Raise :class:`FIDError` naming the flag when a value is missing or out of range; returns self."""
        if not self.samples or not self.ref:
            raise FIDError("give --ref REF.npz and at least one samples directory or samples.npz")
        if self.batch_size < 1:
            raise FIDError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.input_format not in INPUT_FORMATS:
            raise FIDError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}")
        for spec in self.seeds:
            parse_seed_set(spec)
        return self

    @property
    def seed_specs(self) -> list:
        """The seed ranges, one FID each (``[None]``: all images once)."""
        return list(self.seeds) or [None]
