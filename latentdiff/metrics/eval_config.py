"""``latentdiff-eval``'s configuration: one dataclass of flags / YAML keys -> :class:`EvalSettings`."""
from __future__ import annotations

from dataclasses import dataclass, field

from latentdiff.metrics.evaluation import METRICS, EvalSettings
from latentdiff.metrics.features import FEATURE_KINDS
from latentdiff.metrics.swd import SWDSettings
from latentdiff.utils.errors import FIDError

__all__ = ["EvalConfig", "INCEPTION_MODES"]

INCEPTION_MODES = ("auto", "on", "off")


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


def _names(spec: str, allowed, flag: str) -> tuple:
    names = tuple(n.strip() for n in str(spec).split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad:
        raise FIDError(f"{flag}: unknown {', '.join(bad)}; choose from {', '.join(allowed)} (comma-separated)")
    return names


@dataclass
class EvalConfig:
    """What ``latentdiff-eval`` computes; every field is a flag and a YAML key (``samples`` is positional)."""

    samples: str | None = field(default=None, metadata=_help("samples directory (PNGs or samples.npz) or .npz"))
    ref: str | None = field(default=None, metadata=_help(
        "reference: an encoded dataset directory (decoded through its VAE), an image folder / samples.npz, or "
        "statistics saved with --save-ref"))
    out: str | None = field(default=None, metadata=_help("metrics.json path (default: SAMPLES/metrics.json)"))
    save_ref: str | None = field(default=None, metadata=_help(
        "also save the reference's statistics to this .npz, to pass as --ref next time"))
    metrics: str = field(default="fwd,swd,kid,pr", metadata=_help(
        f"comma-separated metrics from {', '.join(METRICS)} (fid: Inception weights needed)"))
    features: str = field(default="pixels,wavelet", metadata=_help(
        f"comma-separated feature sets for KID and precision/recall from {', '.join(FEATURE_KINDS[:2])} "
        "(inception is added when the weights are used)"))
    inception: str = field(default="auto", metadata=_help(
        "auto: use Inception features (FID, KID, PR) when the weights are found; on: require them; off"))
    inception_weights: str | None = field(default=None, metadata=_help("torch-fidelity Inception state dict"))
    fwd_level: int = field(default=4, metadata=_help("Haar packet level of FWD and the wavelet features"))
    swd_patches: int = field(default=128, metadata=_help("SWD 7x7 patches per image and pyramid level"))
    swd_dir_repeats: int = field(default=4, metadata=_help("SWD direction repeats"))
    swd_dirs_per_repeat: int = field(default=128, metadata=_help("SWD random directions per repeat"))
    swd_max_images: int = field(default=16384, metadata=_help("SWD uses at most this many images per set"))
    kid_subsets: int = field(default=100, metadata=_help("KID subsets"))
    kid_subset_size: int = field(default=1000, metadata=_help("KID subset size (both sets need at least this many)"))
    pr_k: int = field(default=3, metadata=_help("precision/recall nearest-neighbour k"))
    pixel_size: int = field(default=32, metadata=_help("pixel features: area-average to at most this size"))
    seed: int = field(default=0, metadata=_help("seed of the SWD patches and directions and the KID subsets"))
    allow_small_fid: bool = field(default=False, metadata=_help("allow FID from fewer than 2048 images"))
    vae: str | None = field(default=None, metadata=_help("VAE directory overriding the one an encoded --ref names"))
    batch_size: int = field(default=64, metadata=_help("images per batch per rank"))
    input_format: str = field(default="auto", metadata=_help("samples format: auto, png or npz"))
    device: str | None = field(default=None, metadata=_help("torch device (default: this rank's accelerator)"))
    no_progress: bool = field(default=False, metadata=_help("no progress bar"))

    def validate(self) -> "EvalConfig":
        if not self.samples or not self.ref:
            raise FIDError("give SAMPLES (a directory of PNGs or samples.npz) and --ref REF")
        if self.inception not in INCEPTION_MODES:
            raise FIDError(f"--inception must be one of {', '.join(INCEPTION_MODES)}, got {self.inception!r}")
        for name in ("batch_size", "kid_subsets", "swd_patches", "swd_dir_repeats", "swd_dirs_per_repeat",
                     "swd_max_images", "pr_k", "pixel_size"):
            if getattr(self, name) < 1:
                raise FIDError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.kid_subset_size < 2:
            raise FIDError(f"--kid-subset-size must be >= 2, got {self.kid_subset_size}")
        if self.fwd_level < 1:
            raise FIDError(f"--fwd-level must be >= 1, got {self.fwd_level}")
        self.settings(inception=False)
        return self

    def settings(self, inception: bool) -> EvalSettings:
        """The :class:`EvalSettings`; with ``inception`` the Inception features and FID are added."""
        metrics = _names(self.metrics, METRICS, "--metrics")
        features = _names(self.features, FEATURE_KINDS, "--features")
        if inception:
            features = features + (() if "inception" in features else ("inception",))
            metrics = metrics + (() if "fid" in metrics else ("fid",))
        swd = SWDSettings(patches_per_image=self.swd_patches, dir_repeats=self.swd_dir_repeats,
                          dirs_per_repeat=self.swd_dirs_per_repeat, max_images=self.swd_max_images, seed=self.seed)
        return EvalSettings(metrics=metrics, features=features, fwd_level=self.fwd_level, swd=swd,
                            kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size, pr_k=self.pr_k,
                            pixel_size=self.pixel_size, seed=self.seed, allow_small_fid=self.allow_small_fid)
