"""Input listing for the encoder: image folders, tar shards of images, list files.

Every ``--input`` is one of

* a **directory**: searched recursively (hidden files/folders skipped, symlinked folders not followed)
  for files with an image extension (:data:`~latentdiff.data.images.IMAGE_EXTENSIONS`, any case).
  An image inside a sub-folder gets the class named by its *top-level* folder (ImageNet layout
  ``root/n01440764/xxx.JPEG``); images directly in the root have no label.  Sorted by relative path.
* an uncompressed **tar** (``.tar``, e.g. webdataset shards): members with an image extension, in
  archive order.  The label is the integer in a sibling ``<key>.cls`` member (webdataset convention,
  key = member name up to the first dot of its base name) or else the class named by the member's
  top-level folder.  A truncated/corrupt tar keeps the members listed before the damage and records a
  ``corrupt_container`` skip.
* a **list file** (any other file, UTF-8): one image path per line, optionally ``<TAB>class_name``;
  relative paths are relative to the list file; blank lines and ``#`` comments are ignored.
* a single **image file**.

Inputs are visited in command-line order, so the global order is deterministic.  Class names from all
inputs are merged and sorted; label ``i`` is the i-th name.  Integer ``.cls`` labels cannot be mixed
with named classes.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.utils.errors import EncodeError
from latentdiff.data.images import DEFAULT_MAX_FILE_BYTES, IMAGE_EXTENSIONS, ImageSkip

__all__ = ["InputItem", "Listing", "list_inputs", "read_item_bytes"]


@dataclass(frozen=True)
class InputItem:
    """One image to encode.  ``offset``/``size`` locate a tar member's data (-1 for plain files)."""

    source: str
    member: str | None = None
    offset: int = -1
    size: int = -1
    class_name: str | None = None
    cls: int | None = None  # integer label from a .cls member

    def display(self) -> str:
        return self.source if self.member is None else f"{self.source}::{self.member}"

    def to_tuple(self) -> tuple:
        return (self.source, self.member, self.offset, self.size, self.class_name, self.cls)


@dataclass
class Listing:
    items: list[InputItem]
    labels: list[int]  # -1 = unknown
    class_names: list[str] | None
    num_classes: int
    problems: list[dict] = field(default_factory=list)  # container-level skips (corrupt tar inputs)
    inputs: list[str] = field(default_factory=list)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for it, lab in zip(self.items, self.labels):
            h.update(f"{it.source}\t{it.member}\t{it.offset}\t{it.size}\t{lab}\n".encode())
        return h.hexdigest()


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_folder(root: Path) -> list[InputItem]:
    found: list[tuple[str, InputItem]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for fn in filenames:
            if fn.startswith(".") or not _is_image_name(fn):
                continue
            rel = fn if rel_dir == "." else os.path.join(rel_dir, fn)
            rel_posix = Path(rel).as_posix()
            parts = rel_posix.split("/")
            cname = parts[0] if len(parts) > 1 else None
            found.append((rel_posix, InputItem(str(root / rel), class_name=cname)))
    found.sort(key=lambda t: t[0])
    return [it for _, it in found]


def _wds_key(name: str) -> str:
    d, b = os.path.split(name)
    return os.path.join(d, b.split(".", 1)[0])


def _list_tar(path: Path, problems: list[dict]) -> list[InputItem]:
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                if m.isreg():
                    members.append(m)
    except tarfile.CompressionError as exn:
        raise EncodeError(f"--input {path}: compressed tar archives are not supported ({exn}); decompress it to a plain .tar") from exn
    except (tarfile.ReadError, EOFError, OSError) as exn:
        if not members:
            kind = "is not a readable tar archive" if path.stat().st_size else "is empty"
            problems.append({"path": str(path), "reason": "corrupt_container", "detail": f"tar input {kind}: {exn}"})
        else:
            problems.append({
                "path": str(path), "reason": "corrupt_container",
                "detail": f"tar input is truncated/corrupt after member {members[-1].name!r}: {type(exn).__name__}: {exn}",
            })
    cls_values: dict[str, int] = {}
    names = {m.name for m in members}
    if any(n.endswith(".cls") for n in names):
        with open(path, "rb") as f:
            for m in members:
                if m.name.endswith(".cls"):
                    f.seek(m.offset_data)
                    raw = f.read(m.size)
                    try:
                        cls_values[_wds_key(m.name)] = int(raw.decode().strip())
                    except ValueError:
                        problems.append({"path": f"{path}::{m.name}", "reason": "error", "detail": f"label {raw[:20]!r} is not an integer"})
    items = []
    for m in members:
        if not _is_image_name(m.name):
            continue
        key = _wds_key(m.name)
        parts = m.name.split("/")
        if key in cls_values:
            items.append(InputItem(str(path), m.name, m.offset_data, m.size, cls=cls_values[key]))
        else:
            items.append(InputItem(str(path), m.name, m.offset_data, m.size, class_name=parts[0] if len(parts) > 1 else None))
    return items


def _list_file(path: Path) -> list[InputItem]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exn:
        raise EncodeError(
            f"--input {path}: not a directory, .tar or image, and not a UTF-8 list file ({exn}); "
            "a list file holds one image path per line (optionally followed by a TAB and a class name)"
        ) from exn
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        p, _, cname = line.partition("\t")
        p = p.strip()
        cname = cname.strip() or None
        full = Path(p).expanduser()
        if not full.is_absolute():
            full = path.parent / full
        items.append(InputItem(str(full.resolve(strict=False)), class_name=cname))
    return items


def list_inputs(inputs: list[str]) -> Listing:
    """Deterministic global listing of all ``inputs`` (raises :class:`EncodeError` on bad arguments)."""
    if not inputs:
        raise EncodeError("no --input given: pass at least one image folder, .tar of images or list file")
    resolved: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            raise EncodeError(f"--input {raw!r} does not exist; pass an image folder, a .tar of images or a list file")
        p = p.resolve()
        if p in resolved:
            raise EncodeError(f"--input {raw!r} is given twice; every image would be encoded twice")
        resolved.append(p)
    for a in resolved:
        for b in resolved:
            if a != b and a.is_dir() and b.is_relative_to(a):
                raise EncodeError(f"--input {b} lies inside --input {a}; its images would be encoded twice")
    items: list[InputItem] = []
    problems: list[dict] = []
    for p in resolved:
        if p.is_dir():
            items.extend(_list_folder(p))
        elif p.name.lower().endswith(".tar"):
            items.extend(_list_tar(p, problems))
        elif any(p.name.lower().endswith(s) for s in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
            raise EncodeError(f"--input {p}: compressed tar archives are not supported; decompress it to a plain .tar")
        elif _is_image_name(p.name):
            items.append(InputItem(str(p)))
        else:
            items.extend(_list_file(p))
    named = sorted({it.class_name for it in items if it.class_name is not None})
    has_int = any(it.cls is not None for it in items)
    if named and has_int:
        raise EncodeError(
            "the inputs mix integer .cls labels (from tar shards) with class folders/names; "
            "encode them into separate output directories or relabel one of them"
        )
    if has_int:
        bad = sorted({it.cls for it in items if it.cls is not None and it.cls < 0})
        if bad:
            raise EncodeError(f"negative .cls labels {bad[:5]} in the tar inputs; labels must be >= 0")
        labels = [it.cls if it.cls is not None else -1 for it in items]
        class_names = None
        num_classes = max(labels) + 1
    else:
        index = {n: i for i, n in enumerate(named)}
        labels = [index[it.class_name] if it.class_name is not None else -1 for it in items]
        class_names = named or None
        num_classes = len(named)
    return Listing(items, labels, class_names, num_classes, problems, [str(p) for p in resolved])


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (after symlinks), never more than ``max_bytes``.

    Opened non-blocking (opening a FIFO for reading would wait for a writer for ever) and checked with
    ``fstat`` on the open descriptor, so a file swapped after listing is still checked."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageSkip("unreadable", f"{path} is a directory")
        if not stat.S_ISREG(st.st_mode):
            target = os.path.realpath(path)
            where = f" ({target})" if target != path else ""
            raise ImageSkip("not_a_regular_file", f"{_file_kind(st.st_mode)}{where}")
        if st.st_size > max_bytes:
            raise ImageSkip("too_large", f"{st.st_size} bytes > --max-file-bytes {max_bytes}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)  # a file growing while read is still bounded
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ImageSkip("too_large", f"more than --max-file-bytes {max_bytes} bytes (the file grew while read)")
    return data


def read_item_bytes(item: InputItem, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """Raw bytes of one input, or :class:`ImageSkip`: ``not_a_regular_file`` (devices, FIFOs, sockets,
    also behind a symlink: never opened for a blocking read), ``too_large`` (over ``max_bytes``, never
    read), ``unreadable``, ``truncated``."""
    if item.member is not None and item.size > max_bytes:
        raise ImageSkip("too_large", f"tar member of {item.size} bytes > --max-file-bytes {max_bytes}")
    try:
        if item.member is None:
            return _read_regular_file(item.source, max_bytes)
        with open(item.source, "rb") as f:
            f.seek(item.offset)
            data = f.read(item.size)
    except OSError as exn:
        raise ImageSkip("unreadable", f"{type(exn).__name__}: {exn.strerror or exn}") from None
    if len(data) < item.size:
        raise ImageSkip("truncated", f"tar member has {len(data)} of {item.size} bytes")
    return data
