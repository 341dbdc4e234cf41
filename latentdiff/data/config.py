"""``EncodeConfig``: every option of the encode stage, loaded by :mod:`latentdiff.utils.config`
(``--config encode.yaml``, then one flag per field), validated before any process group starts."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from latentdiff.data.images import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
from latentdiff.utils.errors import EncodeError
from latentdiff.vae.autoencoder import DEFAULT_VAE, PRECISIONS

__all__ = ["EncodeConfig"]


def _help(text: str, **extra) -> dict:
    return {"metadata": {"help": text, **extra}}


@dataclass
class EncodeConfig:
    """Options of ``latentdiff-encode`` / ``tools/encode_latents.py``."""

    # names users try, and the field each stands for (suggested in the unknown-field error)
    ALIASES: ClassVar[dict] = {"input": "inputs", "output_dir": "output", "image_size": "resolution",
                               "size": "resolution", "batch": "batch_size", "num_workers": "workers"}

    inputs: list[str] = field(default_factory=list, **_help(
        "image folder (class sub-folders give labels), .tar of images, or list file; repeat the flag for more",
        flag="--input", repeat=True, metavar="PATH"))
    output: str = field(default="", **_help("output directory (created; re-running the same command resumes)"))
    resolution: int = field(default=0, **_help("square output size in pixels (ADM center crop), e.g. 256"))
    vae: str = field(default=DEFAULT_VAE, **_help("hub id, local directory, or 'none' for pixel space"))
    vae_revision: str | None = field(default=None, **_help("hub revision (branch, tag or commit) of --vae"))
    vae_precision: str = field(default="fp32", **_help(
        f"one of {', '.join(PRECISIONS)}; bf16/fp16 only after validation against fp32 on the first batch"))
    flip: bool = field(default=False, **_help("also store the horizontally mirrored image as its own sample"))
    shard_size: int = field(default=1000, **_help("samples per shard"))
    batch_size: int = field(default=32, **_help("images per VAE batch"))
    workers: int = field(default=4, **_help("DataLoader processes decoding images (0 = decode in the main process)"))
    min_size: int | None = field(default=None, **_help("skip images whose short side is below this (none = resolution/2)"))
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, **_help("skip images with more pixels (decompression bombs)"))
    max_file_bytes: int = field(default=DEFAULT_MAX_FILE_BYTES, **_help(
        "skip input files (and tar members) larger than this many bytes unread (default 256 MiB)"))
    val_fraction: float = field(default=0.0, **_help(
        "hold out this fraction of the listed images as a validation dataset (deterministic by file name; "
        "latentdiff.data.split)"))
    val_inputs: list[str] = field(default_factory=list, **_help(
        "a separate validation input instead of --val-fraction (folder, .tar or list file); repeat for more",
        flag="--val-input", repeat=True, metavar="PATH"))
    val_output: str = field(default="", **_help("the validation dataset directory (default: OUTPUT/val)"))
    progress: bool = field(default=True, **_help("show a progress bar on rank 0"))
    command: list[str] | None = field(default=None, **_help("the command line recorded in dataset.json"))

    def validate(self) -> "EncodeConfig":
        """Check every value (raises :class:`EncodeError` naming the flag and the fix); resolves ``min_size``."""
        if not self.inputs:
            raise EncodeError("no --input given: pass at least one image folder, .tar of images or list file")
        for raw in self.inputs:
            if not Path(raw).expanduser().exists():
                raise EncodeError(f"--input {raw!r} does not exist; pass an image folder, a .tar of images or a list file")
        if not self.output:
            raise EncodeError("--output is required: the directory that receives the shards")
        checks = [
            ("--resolution", self.resolution, 8, "the square output size in pixels, e.g. 256"),
            ("--shard-size", self.shard_size, 2 if self.flip else 1, "samples per shard, e.g. 1000"),
            ("--batch-size", self.batch_size, 1, "images per VAE batch, e.g. 32"),
            ("--workers", self.workers, 0, "DataLoader decode processes, e.g. 4 (0 = decode in the main process)"),
            ("--max-pixels", self.max_pixels, 1, "the decompression-bomb limit in pixels"),
            ("--max-file-bytes", self.max_file_bytes, 1, "the largest input file read, in bytes"),
        ]
        for name, value, lo, what in checks:
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise EncodeError(f"{name} must be an integer >= {lo} ({what}), got {value!r}")
        if self.min_size is None:
            self.min_size = max(1, self.resolution // 2)
        if not isinstance(self.min_size, int) or self.min_size < 1:
            raise EncodeError(f"--min-size must be an integer >= 1 (default: half the resolution), got {self.min_size!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 <= self.val_fraction < 1.0:
            raise EncodeError(f"--val-fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.val_fraction and self.val_inputs:
            raise EncodeError("give either --val-fraction or --val-input, not both")
        for raw in self.val_inputs:
            if not Path(raw).expanduser().exists():
                raise EncodeError(f"--val-input {raw!r} does not exist; pass an image folder, a .tar of images or a list file")
        if self.vae_precision not in PRECISIONS:
            raise EncodeError(f"--vae-precision {self.vae_precision!r}: choose one of {', '.join(PRECISIONS)}")
        return self

    @property
    def has_validation(self) -> bool:
        return bool(self.val_fraction) or bool(self.val_inputs)

    @property
    def validation_output(self) -> Path:
        return Path(self.val_output).expanduser() if self.val_output else Path(self.output).expanduser() / "val"

    @property
    def images_per_chunk(self) -> int:
        return self.shard_size // (2 if self.flip else 1)
