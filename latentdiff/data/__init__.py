"""The encode stage and its reader: image decoding and crops, webdataset shards, statistics.

Writing side: :func:`latentdiff.data.encode.encode_dataset` (``latentdiff-encode``,
``tools/encode_latents.py``) with its :class:`~latentdiff.data.config.EncodeConfig`.  Reading side
(trainer): :class:`LatentShardDataset`, :func:`make_loader`, :func:`sample_latent`,
:func:`verify_dataset`, :func:`check_normalization`, :class:`DatasetStats`.  The manifest
``dataset.json`` is the typed :class:`latentdiff.contracts.manifest.DatasetManifest`.

The names are imported on first use, so ``latentdiff.data.photos`` (used by tests and tools without
the reader) stays cheap to import.
"""
import importlib

_EXPORTS = {
    "DatasetStats": "stats",
    "LatentShardDataset": "reader",
    "check_normalization": "reader",
    "make_loader": "reader",
    "sample_latent": "reader",
    "verify_dataset": "reader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
