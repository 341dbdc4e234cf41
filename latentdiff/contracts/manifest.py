"""The dataset manifest ``OUT/dataset.json``: what the encode stage hands to the train stage.

Written last by the encoder, when every shard and the statistics are complete; read by the trainer,
the training reader and ``tools/dataset_stats.py``.  :class:`DatasetManifest` holds each value once;
the totals (samples, images, skipped files), the shard-list hash and the chunk layout are derived
from the stored values (properties), not stored beside them.

Stored fields (``format_version`` 2): ``format`` ("latentdiff-latents"), ``created_utc``, ``command``,
``latentdiff_version``, ``vae`` (``Autoencoder.description()`` or ``"none"`` for pixel space),
``vae_precision``, ``pixel_range``, ``resolution``, ``sample_shape`` [C, h, w], ``preprocessing``
(``min_size``, ``max_pixels``, ``flip`` and descriptions of the crop and RGB conversion),
``num_labelled``, ``num_classes``, ``class_names`` (list or null), ``shard_size``, ``shards`` (list of
{name, count, sha256, bytes}), ``skipped`` ({by_reason, file}), ``inputs``, ``listing_sha256``,
``num_listed``; ``stored`` and ``stats`` describe the shard members and the statistics files.

A ``format_version`` 1 manifest (which also stored the totals, ``shards_hash``, the chunk layout and a
copy of ``encode.json``) still loads: its stored totals must agree with the derived ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.utils.errors import DataError
from latentdiff.utils.io import atomic_write_json, read_json
from latentdiff.vae.decode import is_pixel_vae

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "FINGERPRINT_NAME", "ShardEntry", "DatasetManifest", "shards_hash",
           "load_manifest"]

FORMAT = "latentdiff-latents"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "dataset.json"
FINGERPRINT_NAME = "encode.json"  # the encoder's resume fingerprint (latentdiff.data.manifest)
STATS_FILES = {"json": "stats.json", "npz": "stats.npz"}
SKIPPED_FILE = "skipped.jsonl"
CROP = "adm_center_crop (BOX halving, BICUBIC resize of the short side, center square)"
RGB = "alpha composited on white; 16-bit scaled by 1/257"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHARD_NAME = re.compile(r"^shard-\d{6}\.tar$")
# fields a version-1 manifest stored although they follow from the others (checked on load, then dropped)
_V1_DERIVED = ("num_samples", "num_images", "shards_hash", "images_per_chunk", "num_chunks")


@dataclass(frozen=True)
class ShardEntry:
    """One shard of the manifest: file name, sample count, sha256 and size of the whole file."""

    name: str
    count: int
    sha256: str
    bytes: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def shards_hash(shards) -> str:
    """sha256 over the shard list (name, count, sha256 per line): what ``stats.json`` is bound to."""
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s.name}\t{int(s.count)}\t{s.sha256}\n".encode())
    return h.hexdigest()


@dataclass
class DatasetManifest:
    """The typed ``dataset.json`` (see the module docstring); :meth:`validate` is its one check."""

    vae: dict | str
    resolution: int
    sample_shape: tuple[int, int, int]
    shards: list[ShardEntry]
    vae_precision: str = "fp32"
    pixel_range: tuple[float, float] = (-1.0, 1.0)
    min_size: int = 1
    max_pixels: int = 0
    flip: bool = False
    num_labelled: int = 0
    num_classes: int = 0
    class_names: list[str] | None = None
    shard_size: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    listing_sha256: str = ""
    num_listed: int = 0
    command: str = ""
    created_utc: str = ""
    latentdiff_version: str = ""
    sample_checksums: str | None = "sha256"  # each sample's checksum member; None in datasets made before it

    # derived values ----------------------------------------------------------------------------
    @property
    def is_pixel(self) -> bool:
        return is_pixel_vae(self.vae)

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def num_images(self) -> int:
        """Images encoded: one sample each, two with ``flip``."""
        return self.num_samples // (2 if self.flip else 1)

    @property
    def shards_hash(self) -> str:
        return shards_hash(self.shards)

    @property
    def images_per_chunk(self) -> int:
        return self.shard_size // (2 if self.flip else 1)

    @property
    def num_chunks(self) -> int:
        per = self.images_per_chunk
        return (self.num_listed + per - 1) // per if per else 0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped_by_reason.values())

    def reference(self, path: str | Path) -> dict:
        """What a checkpoint and an export record about the dataset they were trained on."""
        return {"path": str(Path(path).resolve()), "vae": self.vae, "shards_hash": self.shards_hash,
                "num_samples": self.num_samples, "num_classes": self.num_classes, "class_names": self.class_names,
                "resolution": self.resolution, "sample_shape": list(self.sample_shape)}

    # the one check -----------------------------------------------------------------------------
    def validate(self, where: str = MANIFEST_NAME) -> "DatasetManifest":
        """Raise :class:`DataError` naming ``where``, the field and the fix when a value is inconsistent."""
        fix = "re-run tools/encode_latents.py"

        def bad(msg: str):
            raise DataError(f"{where}: {msg}; {fix}")

        if not _positive_int(self.resolution):
            bad(f"field 'resolution' is {self.resolution!r}, expected a positive integer")
        if len(self.sample_shape) != 3 or not all(_positive_int(v) for v in self.sample_shape):
            bad(f"field 'sample_shape' is {list(self.sample_shape)!r}, expected [C, h, w] of positive integers")
        self._validate_vae(bad)
        if not self.shards:
            bad("field 'shards' is empty (a dataset has at least one shard)")
        for s in self.shards:
            if not (_SHARD_NAME.match(s.name) and _positive_int(s.count) and _SHA256.match(s.sha256 or "")
                    and isinstance(s.bytes, int) and s.bytes > 0):
                bad(f"shard entry {s.to_json()} is malformed (name shard-NNNNNN.tar, count > 0, sha256, bytes > 0)")
        if len({s.name for s in self.shards}) != len(self.shards):
            bad("field 'shards' lists a shard twice")
        if not (isinstance(self.num_classes, int) and self.num_classes >= 0):
            bad(f"field 'num_classes' is {self.num_classes!r}, expected an integer >= 0")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            bad(f"{len(self.class_names)} class_names but num_classes is {self.num_classes}")
        if not 0 <= self.num_labelled <= self.num_samples:
            bad(f"num_labelled {self.num_labelled} is outside [0, {self.num_samples}] (the samples of the shards)")
        if self.sample_checksums not in (None, "sha256"):
            bad(f"stored.checksum is {self.sample_checksums!r}, expected 'sha256' or absent")
        return self

    def _validate_vae(self, bad) -> None:
        c, h, w = self.sample_shape
        if self.is_pixel:
            if (c, h, w) != (3, self.resolution, self.resolution):
                bad(f"pixel space (vae 'none') at resolution {self.resolution} needs sample_shape "
                    f"[3, {self.resolution}, {self.resolution}], not {list(self.sample_shape)}")
            return
        if not isinstance(self.vae, dict) or not self.vae.get("id") or "scaling_factor" not in self.vae:
            bad(f"field 'vae' is {self.vae!r}, expected the VAE description (id, scaling_factor, ...) or 'none'")
        if int(self.vae.get("latent_channels", c)) != c:
            bad(f"vae.latent_channels {self.vae['latent_channels']} != sample_shape channels {c}")
        f = int(self.vae.get("downsampling_factor", self.resolution // h))
        if (h, w) != (self.resolution // f, self.resolution // f):
            bad(f"sample_shape {list(self.sample_shape)} does not match resolution {self.resolution} / vae "
                f"downsampling_factor {f}")

    # JSON --------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created_utc": self.created_utc,
            "command": self.command, "latentdiff_version": self.latentdiff_version, "vae": self.vae,
            "vae_precision": self.vae_precision, "pixel_range": list(self.pixel_range),
            "resolution": self.resolution, "sample_shape": list(self.sample_shape),
            "stored": _stored(self.is_pixel, self.sample_checksums),
            "preprocessing": {"crop": CROP, "min_size": self.min_size, "max_pixels": self.max_pixels,
                              "flip": self.flip, "rgb": RGB},
            "num_labelled": self.num_labelled, "num_classes": self.num_classes, "class_names": self.class_names,
            "shard_size": self.shard_size, "shards": [s.to_json() for s in self.shards], "stats": dict(STATS_FILES),
            "skipped": {"by_reason": dict(sorted(self.skipped_by_reason.items())), "file": SKIPPED_FILE},
            "inputs": list(self.inputs), "listing_sha256": self.listing_sha256, "num_listed": self.num_listed,
        }

    @classmethod
    def from_json(cls, d: dict, where: str = MANIFEST_NAME) -> "DatasetManifest":
        """Parse (format version 1 or 2) and :meth:`validate`."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise DataError(f"{where}: field 'format' is {got!r}, expected {FORMAT!r}")
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise DataError(f"{where}: field 'format_version' is {version!r}, this latentdiff reads "
                            f"{' and '.join(map(str, READABLE_VERSIONS))}; re-encode the dataset with this version")
        for k in ("shards", "sample_shape", "vae", "resolution") + (("num_samples",) if version == 1 else ()):
            if k not in d:
                raise DataError(f"{where}: field {k!r} is missing; re-run tools/encode_latents.py")
        try:
            m = cls._parse(d)
        except (KeyError, TypeError, ValueError) as exn:
            raise DataError(f"{where}: malformed field ({type(exn).__name__}: {exn}); re-run tools/encode_latents.py") from None
        m.validate(where)
        if version == 1:
            m._check_v1_totals(d, where)
        return m

    @classmethod
    def _parse(cls, d: dict) -> "DatasetManifest":
        pre, skipped = d.get("preprocessing") or {}, d.get("skipped") or {}
        shards = [ShardEntry(str(s["name"]), int(s["count"]), str(s["sha256"]), int(s["bytes"])) for s in d["shards"]]
        names = d.get("class_names")
        return cls(
            vae=d["vae"], resolution=int(d["resolution"]), sample_shape=tuple(int(v) for v in d["sample_shape"]),
            shards=shards, vae_precision=str(d.get("vae_precision", "fp32")),
            pixel_range=tuple(float(v) for v in d.get("pixel_range", (-1.0, 1.0))),
            min_size=int(pre.get("min_size", 1)), max_pixels=int(pre.get("max_pixels", 0)),
            flip=bool(pre.get("flip", False)), num_labelled=int(d.get("num_labelled", 0)),
            num_classes=int(d.get("num_classes") or 0), class_names=None if names is None else [str(n) for n in names],
            shard_size=int(d.get("shard_size", 0)), skipped_by_reason=dict(skipped.get("by_reason") or {}),
            inputs=list(d.get("inputs") or []), listing_sha256=str(d.get("listing_sha256", "")),
            num_listed=int(d.get("num_listed", 0)), command=str(d.get("command", "")),
            created_utc=str(d.get("created_utc", "")), latentdiff_version=str(d.get("latentdiff_version", "")),
            sample_checksums=(d.get("stored") or {}).get("checksum"),
        )

    def _check_v1_totals(self, d: dict, where: str) -> None:
        """A version-1 manifest's stored totals must equal the values derived from its other fields."""
        if int(d["num_samples"]) != self.num_samples:
            raise DataError(f"{where}: shard counts sum to {self.num_samples} but 'num_samples' is {d['num_samples']}")
        for k in _V1_DERIVED[1:]:
            if k in d and d[k] != getattr(self, k):
                raise DataError(f"{where}: field {k!r} is {d[k]!r} but the other fields give {getattr(self, k)!r}; "
                                "the manifest was edited by hand: re-run tools/encode_latents.py")
        total = (d.get("skipped") or {}).get("total")
        if total is not None and int(total) != self.skipped_total:
            raise DataError(f"{where}: skipped.total {total} != the sum of skipped.by_reason {self.skipped_total}")

    def save(self, root: str | Path) -> Path:
        path = Path(root) / MANIFEST_NAME
        atomic_write_json(path, self.validate(str(path)).to_json())
        return path


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _stored(pixel: bool, checksum: str | None = "sha256") -> dict:
    """What the shard members hold (a description written beside the values)."""
    out = {"mean": "mean.npy", "std": "std.npy", "dtype": "float16", "label": "cls", "meta": "json",
           "content": ("pixels in [-1, 1] (mean.npy); std.npy = 0" if pixel
                       else "VAE posterior mean and std, raw VAE space (no scaling/shift applied)"),
           "key": "%09d global image index; '-flip' suffix for the mirrored copy"}
    if checksum:
        out["checksum"] = checksum  # member <key>.sha256: latentdiff.data.shards.sample_digest of the others
    return out


def load_manifest(root: str | Path) -> DatasetManifest:
    """Read and validate ``root/dataset.json`` (raises :class:`DataError` naming the problem and the fix)."""
    root = Path(root)
    path = root / MANIFEST_NAME
    unfinished = (root / FINGERPRINT_NAME).is_file()
    hint = " (the encode run has not finished: re-run the same tools/encode_latents.py command)" if unfinished else ""
    d = read_json(path, DataError, missing=f"{hint}; a dataset directory is made by tools/encode_latents.py",
                  invalid="; re-run tools/encode_latents.py")
    return DatasetManifest.from_json(d, str(path))
