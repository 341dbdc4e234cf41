"""The Inception-v3 feature extractor of FID: torch-fidelity's TF-compatible network, 2048-d pool features.

The network takes **uint8** RGB NCHW images of any size and resizes them itself to 299x299 with its
TF1.x-compatible bilinear resize, then maps ``[0, 255] -> [-1, 1]``, so generated samples and reference
images go through exactly the same path.

Weights are never downloaded silently.  They are looked up, in order, at

1. ``weights=`` / ``--inception-weights PATH``,
2. the ``LATENTDIFF_INCEPTION_WEIGHTS`` environment variable,
3. torch-fidelity's standard location: ``$TORCH_HOME/hub/checkpoints/<file name of the URL>``
   (what ``torch.hub.load_state_dict_from_url`` would have written),

and a missing file raises :class:`~latentdiff.errors.FIDError` naming the URL and the cache path.
``download_inception_weights()`` / ``--download-weights`` fetch them on explicit request only.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from latentdiff.utils import dist as ldist
from latentdiff.utils.errors import FIDError
from latentdiff.utils.io import sha256_file
from latentdiff.utils.safe_load import (
    UnsafeFileError,
    safe_torch_load_scope,
    torch_load,
)

__all__ = [
    "FEATURE_DIM",
    "WEIGHTS_ENV",
    "OFFICIAL_WEIGHTS_SHA256",
    "EXTRACTOR_NAME",
    "RESIZE_DESCRIPTION",
    "inception_weights_url",
    "default_weights_path",
    "resolve_weights_path",
    "download_inception_weights",
    "InceptionFeatures",
    "load_feature_extractor",
]

FEATURE_DIM = 2048
WEIGHTS_ENV = "LATENTDIFF_INCEPTION_WEIGHTS"
# sha256 of torch-fidelity's converted TF Inception weights (its first 8 hex digits are the
# hash suffix in the published file name, the torch.hub convention).
OFFICIAL_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
EXTRACTOR_NAME = "torch-fidelity FeatureExtractorInceptionV3 ('inception-v3-compat', layer '2048')"
RESIZE_DESCRIPTION = (
    "torch-fidelity interpolate_bilinear_2d_like_tensorflow1x to 299x299 (align_corners=False), "
    "then (x - 128) / 128, inside the extractor"
)


# --------------------------------------------------------------------------------------------
# Inception weights and the feature extractor


def _fidelity_inception():
    # torch-fidelity is imported when the network is needed: it takes seconds, and the sample readers,
    # statistics and reference files of this stage do not use it
    import torch_fidelity
    import torch_fidelity.feature_extractor_inceptionv3 as inception_v3

    return torch_fidelity, inception_v3


def inception_weights_url() -> str:
    return _fidelity_inception()[1].URL_INCEPTION_V3


def default_weights_path() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (torch-fidelity's loader) caches the weights."""
    url = inception_weights_url()
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _missing_weights_message(looked: list[str]) -> str:
    url = inception_weights_url()
    dest = default_weights_path()
    return (
        "Inception weights for FID not found (looked at: " + "; ".join(looked) + "). "
        "latentdiff never downloads them silently. Fix: pass --inception-weights PATH "
        f"(Python: load_feature_extractor(weights=PATH)) or set {WEIGHTS_ENV}=PATH, or pre-download "
        f"torch-fidelity's file once where there is network: `python -m latentdiff.fid --download-weights` "
        f"or `curl -L --create-dirs -o {dest} {url}` (the cache directory follows TORCH_HOME)."
    )


def resolve_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """The weights file to use (explicit path, then ``$LATENTDIFF_INCEPTION_WEIGHTS``, then the cache)."""
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise FIDError(
                f"--inception-weights {p} does not exist or is not a file. "
                + _missing_weights_message([f"{p} (--inception-weights)"])
            )
        return p
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FIDError(f"{WEIGHTS_ENV}={env} does not exist or is not a file. " + _missing_weights_message([f"{p} ({WEIGHTS_ENV})"]))
        return p
    p = default_weights_path()
    if p.is_file():
        return p
    raise FIDError(_missing_weights_message([f"{p} (torch-fidelity cache)"]))


def download_inception_weights(dest: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Explicitly download torch-fidelity's Inception weights (the only place latentdiff downloads)."""
    url = inception_weights_url()
    dest = Path(dest) if dest is not None else default_weights_path()
    if dest.is_file() and sha256_file(dest) == OFFICIAL_WEIGHTS_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=progress)
    except Exception as e:  # URLError, HTTPError, OSError ...
        tmp.unlink(missing_ok=True)
        raise FIDError(f"downloading the Inception weights from {url} to {dest} failed: {e}") from e
    digest = sha256_file(tmp)
    if digest != OFFICIAL_WEIGHTS_SHA256:
        tmp.unlink(missing_ok=True)
        raise FIDError(f"downloaded {url} but its sha256 is {digest}, expected {OFFICIAL_WEIGHTS_SHA256}")
    os.replace(tmp, dest)
    return dest


class InceptionFeatures:
    """Callable ``uint8 (B, 3, H, W) -> float32 (B, 2048)`` around torch-fidelity's Inception-v3."""

    feature_dim = FEATURE_DIM

    def __init__(self, net: torch.nn.Module, device: torch.device, weights_path: Path, weights_sha256: str):
        self.net = net
        self.device = device
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256

    @property
    def official(self) -> bool:
        return self.weights_sha256 == OFFICIAL_WEIGHTS_SHA256

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(images) or images.dtype != torch.uint8:
            raise FIDError(
                "the Inception extractor takes uint8 images in [0, 255]; got "
                f"{images.dtype if torch.is_tensor(images) else type(images).__name__} "
                "(convert with (x * 127.5 + 128).clamp(0, 255).to(torch.uint8) for x in [-1, 1])"
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise FIDError(f"the Inception extractor takes (B, 3, H, W) RGB images, got shape {tuple(images.shape)}")
        (feats,) = self.net(images.to(self.device))
        return feats

    def describe(self) -> dict:
        return {
            "name": EXTRACTOR_NAME,
            "torch_fidelity_version": getattr(_fidelity_inception()[0], "__version__", None),
            "feature_dim": FEATURE_DIM,
            "input": "uint8 RGB NCHW",
            "resize": RESIZE_DESCRIPTION,
            "weights_path": str(self.weights_path),
            "weights_sha256": self.weights_sha256,
            "official_weights": self.official,
        }


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(path)
    return _HASH_CACHE[key]


def load_feature_extractor(
    weights: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    *,
    download: bool = False,
) -> InceptionFeatures:
    """torch-fidelity's TF-compatible Inception-v3 (2048-d pool features) on ``device``.

    ``weights``: a state-dict file; ``None`` looks at ``$LATENTDIFF_INCEPTION_WEIGHTS`` and then at
    torch-fidelity's cache path.  Nothing is downloaded unless ``download=True``.  The file is first
    loaded with ``weights_only=True`` (refusing pickled code) and then handed to torch-fidelity through
    ``feature_extractor_weights_path``.
    """
    if download and weights is None and not os.environ.get(WEIGHTS_ENV):
        path = download_inception_weights()
    else:
        path = resolve_weights_path(weights)
    try:
        state = torch_load(path)
    except UnsafeFileError:
        raise
    except Exception as e:
        raise FIDError(
            f"cannot read Inception weights {path} with torch.load(weights_only=True): {e}. "
            "Expected torch-fidelity's state dict (weights-inception-2015-12-05-6726825d.pth) or a state dict "
            "saved from FeatureExtractorInceptionV3; pass the right file with --inception-weights"
        ) from e
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise FIDError(f"Inception weights {path} do not hold a state dict of tensors; pass torch-fidelity's file with --inception-weights")
    del state
    try:  # torch-fidelity loads the file again with weights_only=False: within the scope it is weights_only
        with safe_torch_load_scope(allow=()):
            net = _fidelity_inception()[1].FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                                      feature_extractor_weights_path=str(path))
    except RuntimeError as e:  # state-dict key/shape mismatch
        raise FIDError(
            f"Inception weights {path} do not fit torch-fidelity's FeatureExtractorInceptionV3: {str(e)[:500]}. "
            "Use torch-fidelity's weights-inception-2015-12-05-6726825d.pth (not torchvision's or pytorch-fid's)"
        ) from e
    dev = torch.device(device) if device is not None else ldist.device()
    net = net.to(dev).eval()
    extractor = InceptionFeatures(net, dev, path, _cached_sha256(path))
    if not extractor.official:
        warnings.warn(
            f"Inception weights {path} (sha256 {extractor.weights_sha256[:12]}...) are not torch-fidelity's "
            f"published file (sha256 {OFFICIAL_WEIGHTS_SHA256[:12]}...): distances are not comparable with "
            "published FID numbers",
            RuntimeWarning,
            stacklevel=2,
        )
    return extractor
