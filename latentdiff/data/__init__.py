"""Image decoding, webdataset shards, manifests and dataset statistics.

Writing side: :func:`latentdiff.data.encode.encode_dataset` (``tools/encode_latents.py``).
Reading side (trainer): :class:`LatentShardDataset`, :func:`make_loader`, :func:`sample_latent`,
:func:`verify_dataset`, :func:`check_normalization`, :class:`DatasetStats`, :func:`load_manifest`.
The names are imported lazily so ``latentdiff.data.photos`` stays cheap to import.
"""
import importlib

_EXPORTS = {
    "DatasetStats": "stats",
    "LatentShardDataset": "reader",
    "check_normalization": "reader",
    "load_manifest": "manifest",
    "make_loader": "reader",
    "sample_latent": "reader",
    "to_model_batch": "reader",
    "verify_dataset": "reader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
