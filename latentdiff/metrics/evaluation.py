"""Sample quality without a hub: FWD, SWD, KID and precision/recall (and FID with Inception weights)
of generated images against a reference, in one pass over each set.

* FWD (:mod:`latentdiff.metrics.fwd`) and SWD (:mod:`latentdiff.metrics.swd`) need no network.
* KID (:mod:`latentdiff.metrics.kid`) and precision/recall (:mod:`latentdiff.metrics.precision_recall`)
  are computed on every feature set requested (:mod:`latentdiff.metrics.features`: ``pixels``,
  ``wavelet``, and ``inception`` when an Inception extractor is given, which also yields FID).
* Counts are checked before any image is read (:func:`required_samples`): each metric states how
  many images it needs and why; a set with too few is refused with that number.

:func:`evaluate` returns the ``metrics.json`` content (format ``REPORT_FORMAT``); every rank must
call it and every rank gets the same report.
"""
from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from latentdiff.metrics.eval_stats import SetStatistics, collect_statistics
from latentdiff.metrics.features import InceptionFeatureSet, PixelFeatures, WaveletFeatures
from latentdiff.metrics.frechet import MIN_SAMPLES, frechet_distance, several_ranks
from latentdiff.metrics.fwd import fwd_from_statistics, fwd_min_samples, packet_dim
from latentdiff.metrics.kid import DEFAULT_SUBSET_SIZE, DEFAULT_SUBSETS, kid
from latentdiff.metrics.precision_recall import DEFAULT_K, precision_recall
from latentdiff.metrics.swd import MIN_IMAGES as SWD_MIN_IMAGES
from latentdiff.metrics.swd import SWDSettings, pyramid_resolutions, swd_from_descriptors
from latentdiff.utils import dist as ldist
from latentdiff.utils.errors import FIDError

__all__ = ["REPORT_FORMAT", "METRICS", "EvalSettings", "required_samples", "check_counts", "make_extractors",
           "compare", "evaluate"]

REPORT_FORMAT = "latentdiff-metrics/1"
METRICS = ("fwd", "swd", "kid", "pr", "fid")


@dataclass
class EvalSettings:
    """Which metrics, on which features, with which parameters (all recorded in ``metrics.json``)."""

    metrics: tuple = ("fwd", "swd", "kid", "pr")
    features: tuple = ("pixels", "wavelet")
    fwd_level: int = 4
    swd: SWDSettings = field(default_factory=SWDSettings)
    kid_subsets: int = DEFAULT_SUBSETS
    kid_subset_size: int = DEFAULT_SUBSET_SIZE
    pr_k: int = DEFAULT_K
    pixel_size: int = 32
    seed: int = 0
    allow_small_fid: bool = False

    def __post_init__(self):
        self.metrics, self.features = tuple(self.metrics), tuple(self.features)
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise FIDError(f"unknown metric(s) {', '.join(bad)}; choose from {', '.join(METRICS)}")
        bad = [f for f in self.features if f not in ("pixels", "wavelet", "inception")]
        if bad:
            raise FIDError(f"unknown feature set(s) {', '.join(bad)}; choose from pixels, wavelet, inception")
        if self.swd.seed != self.seed:
            self.swd = replace(self.swd, seed=self.seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metrics"], d["features"] = list(self.metrics), list(self.features)
        return d


def required_samples(resolution, s: EvalSettings) -> dict:
    """``{metric: (images needed, why)}`` for the requested metrics at ``resolution``."""
    h, w = int(resolution[0]), int(resolution[1])
    need = {}
    if "fwd" in s.metrics:
        d = packet_dim((h, w), s.fwd_level)
        need["fwd"] = (fwd_min_samples((h, w), s.fwd_level),
                       f"2 x the {d} coefficients of one level-{s.fwd_level} packet at {h}x{w} (its covariance is {d}x{d})")
    if "swd" in s.metrics:
        need["swd"] = (SWD_MIN_IMAGES, f"{SWD_MIN_IMAGES} images x {s.swd.patches_per_image} patches per pyramid level")
    if "kid" in s.metrics:
        need["kid"] = (s.kid_subset_size, "the KID subset size (--kid-subset-size)")
    if "pr" in s.metrics:
        need["pr"] = (s.pr_k + 1, f"a {s.pr_k}-th nearest neighbour other than the image itself")
    if "fid" in s.metrics:
        need["fid"] = (2 if s.allow_small_fid else MIN_SAMPLES, "a well-conditioned 2048x2048 Inception covariance")
    return need


def check_counts(n: int, resolution, s: EvalSettings, where: str) -> None:
    """Refuse a set too small for a requested metric, saying how many images each needs."""
    short = {m: v for m, v in required_samples(resolution, s).items() if n < v[0]}
    if short:
        parts = "; ".join(f"{m.upper()} needs >= {k} ({why})" for m, (k, why) in short.items())
        raise FIDError(f"{where}: {n} images are too few: {parts}. Generate more images, or leave those metrics out "
                       f"(--metrics) or lower their parameters")


def check_geometry(resolution, s: EvalSettings, where: str) -> None:
    h, w = int(resolution[0]), int(resolution[1])
    if "fwd" in s.metrics and (h % (1 << s.fwd_level) or w % (1 << s.fwd_level)):
        raise FIDError(f"{where}: {h}x{w} images do not split into level-{s.fwd_level} Haar packets (sides must be "
                       f"divisible by {1 << s.fwd_level}); pass a smaller --fwd-level")
    if "swd" in s.metrics:
        pyramid_resolutions((h, w), s.swd.min_resolution)


def make_extractors(s: EvalSettings, inception=None) -> dict:
    out = {}
    for name in s.features:
        if name == "pixels":
            out[name] = PixelFeatures(s.pixel_size)
        elif name == "wavelet":
            out[name] = WaveletFeatures(s.fwd_level)
        elif inception is None:
            raise FIDError("the inception features need Inception weights (--inception-weights PATH); without them "
                           "leave 'inception' out of --features and 'fid' out of --metrics")
        else:
            out[name] = InceptionFeatureSet(inception)
    if "fid" in s.metrics and "inception" not in out:
        if inception is None:
            raise FIDError("FID needs Inception weights (--inception-weights PATH); without them leave 'fid' out of --metrics")
        out["inception"] = InceptionFeatureSet(inception)
    return out


def _fid(g: torch.Tensor, r: torch.Tensor) -> float:
    """Fréchet distance of the float64 means and unbiased covariances of two Inception feature sets."""
    mg, mr = g.mean(0).numpy(), r.mean(0).numpy()
    sg, sr = np.cov(g.numpy(), rowvar=False), np.cov(r.numpy(), rowvar=False)
    return frechet_distance(mg, sg, mr, sr)


def _check_same_resolution(gen, ref) -> None:
    if tuple(gen) != tuple(ref):
        raise FIDError(f"the samples are {gen[0]}x{gen[1]} but the reference is {ref[0]}x{ref[1]}: compare images of "
                       "one resolution (re-sample, or build the reference at the samples' resolution)")


def compare(gen: SetStatistics, ref: SetStatistics, s: EvalSettings) -> dict:
    """Every requested metric of ``gen`` against ``ref`` (both collected with settings ``s``)."""
    _check_same_resolution(gen.resolution, ref.resolution)
    out: dict = {}
    if "fwd" in s.metrics:
        value, per = fwd_from_statistics(gen.fwd_mu, gen.fwd_sigma, ref.fwd_mu, ref.fwd_sigma)
        out["fwd"] = {"value": value, "wavelet": "haar", "level": s.fwd_level, "packets": len(per),
                      "packet_dim": int(gen.fwd_mu.shape[1]), "per_packet_min": min(per), "per_packet_max": max(per),
                      "input_scale": "uint8 / 255"}
    if "swd" in s.metrics:
        vals = swd_from_descriptors(gen.swd_descriptors, ref.swd_descriptors,
                                    pyramid_resolutions(gen.resolution, s.swd.min_resolution), s.swd)
        out["swd"] = {"value": vals["swd_x1e3_avg"], "levels": vals, "settings": s.swd.to_dict(),
                      "images": {"samples": gen.swd_images, "reference": ref.swd_images}}
    for name in gen.features:
        if name not in ref.features:
            raise FIDError(f"the reference has no {name!r} features (it has {', '.join(ref.features) or 'none'}); "
                           "rebuild it with the same --features")
        g, r = gen.features[name], ref.features[name]
        if "kid" in s.metrics:
            out[f"kid_{name}"] = {**kid(g, r, subsets=s.kid_subsets, subset_size=s.kid_subset_size, seed=s.seed),
                                  "features": gen.extractors[name]}
        if "pr" in s.metrics:
            out[f"pr_{name}"] = {**precision_recall(g, r, s.pr_k), "features": gen.extractors[name]}
    if "fid" in s.metrics:
        out["fid"] = {"value": _fid(gen.features["inception"], ref.features["inception"]),
                      "features": gen.extractors["inception"], "official_weights":
                      bool(gen.extractors["inception"].get("network", {}).get("official_weights", False))}
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def evaluate(samples, reference, s: EvalSettings, *, inception=None, batch_size: int = 64, progress: bool = True,
             samples_info: dict | None = None, save_reference=None) -> dict:
    """The ``metrics.json`` content of ``samples`` (an ImageSource) against ``reference`` (an ImageSource
    or :class:`SetStatistics`); ``save_reference(stats)`` is called on rank 0 with the reference's
    statistics when it was computed here."""
    where = getattr(samples, "description", "samples")
    _check_same_resolution(samples.resolution, reference.resolution)
    check_geometry(samples.resolution, s, where)
    check_counts(len(samples), samples.resolution, s, where)
    extractors = make_extractors(s, inception)
    kw = {"fwd_level": s.fwd_level if "fwd" in s.metrics else None, "swd": s.swd if "swd" in s.metrics else None,
          "batch_size": batch_size, "progress": progress}
    if isinstance(reference, SetStatistics):
        ref = reference
        _check_saved(ref, s, extractors)
    else:
        rwhere = getattr(reference, "description", "reference")
        check_geometry(reference.resolution, s, rwhere)
        check_counts(len(reference), reference.resolution, s, rwhere)
        ref = collect_statistics(reference, extractors, desc="reference", **kw)
        ref.provenance = dict(getattr(reference, "provenance", None) or {"source": rwhere, "type": "images"})
        if save_reference is not None and ldist.get_rank() == 0:
            save_reference(ref)
    gen = collect_statistics(samples, extractors, desc="samples", **kw)
    result = compare(gen, ref, s) if (ldist.get_rank() == 0 or not several_ranks()) else None
    result = ldist.broadcast_object(result)
    return {
        "format": REPORT_FORMAT, "created": _now(), "metrics": result,
        "samples": {"source": where, "count": gen.n, "resolution": list(gen.resolution), **(samples_info or {})},
        "reference": {"count": ref.n, "resolution": list(ref.resolution), "provenance": ref.provenance},
        "settings": s.to_dict(), "world_size": ldist.get_world_size() if several_ranks() else 1,
        "feature_extractors": {k: ex.describe() for k, ex in extractors.items()},
    }


def _check_saved(ref: SetStatistics, s: EvalSettings, extractors: dict) -> None:
    """A saved reference must have been computed with the settings the metrics need."""
    where = ref.provenance.get("statistics_file", "the saved reference")
    check_counts(ref.n, ref.resolution, s, where)
    if "fwd" in s.metrics and (ref.fwd_mu is None or ref.fwd_level != s.fwd_level):
        raise FIDError(f"{where} holds FWD statistics at level {ref.fwd_level}, not {s.fwd_level}: rebuild it with "
                       f"--fwd-level {s.fwd_level} or pass --fwd-level {ref.fwd_level}")
    if "swd" in s.metrics and (ref.swd is None or ref.swd.to_dict() != s.swd.to_dict()):
        raise FIDError(f"{where} holds SWD descriptors made with {None if ref.swd is None else ref.swd.to_dict()}, "
                       f"not {s.swd.to_dict()}: rebuild it with the same SWD settings and --seed")
    for name, ex in extractors.items():
        if ref.extractors.get(name) != ex.describe():
            raise FIDError(f"{where}: its {name!r} features were made by {ref.extractors.get(name)}, not "
                           f"{ex.describe()}: rebuild it with the same --features settings")
