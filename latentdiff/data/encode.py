"""The latent encoding stage: images -> webdataset shards + manifest + statistics.

Layout and determinism
----------------------
The inputs are listed in one deterministic global order (:func:`~latentdiff.data.inputs.list_inputs`)
and cut into fixed *chunks* of ``images_per_chunk = shard_size // (2 if flip else 1)`` images;
chunk ``k`` becomes ``shard-%06d.tar`` number ``k`` (or no tar when every image of the chunk was
skipped: no empty shards).  Sample keys are the global image index (``%09d``, ``-flip`` for the
mirrored copy), so the output depends only on the inputs and the options, never on the world size.

Every chunk is committed by two atomic renames: first the shard, then its sidecar
``shard-%06d.stats.npz`` (exact float64 partial statistics, sample count, sha256, keys, skipped files;
:mod:`latentdiff.data.encode_chunks`).  **A chunk is complete iff its sidecar exists.**  After a kill, a re-run of the same command deletes
temporary files, skips complete chunks and deals the remaining ones round-robin over the ranks of the
new run (any world size): every good image ends up encoded exactly once.

Multi-rank
----------
Rank 0 lists the inputs, checks/creates ``encode.json`` and broadcasts the plan; each rank encodes its
chunks (DataLoader workers decode images while the VAE runs); then all ranks run the statistics pass 2
over the written shards (verifying each shard's sha256) and rank 0 writes ``stats.json``/``stats.npz``,
``skipped.jsonl`` and finally ``dataset.json`` (:mod:`latentdiff.data.encode_finish`).  Partial sums
are combined in shard order, so the statistics do not depend on the number of ranks.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from latentdiff.contracts.manifest import FORMAT
from latentdiff.data.config import EncodeConfig
from latentdiff.data.encode_chunks import encode_chunks, read_sidecar
from latentdiff.data.encode_finish import finish_dataset, on_rank0
from latentdiff.data.images import DEFAULT_MAX_FILE_BYTES, IMAGE_EXTENSIONS
from latentdiff.data.inputs import list_inputs
from latentdiff.data.manifest import FINGERPRINT_VERSION, check_or_write_fingerprint
from latentdiff.data.shards import sidecar_name
from latentdiff.data.split import held_out, select, write_split_record
from latentdiff.utils.dist import barrier, device, get_rank, get_world_size, init_distributed
from latentdiff.utils.errors import EncodeError
from latentdiff.vae.autoencoder import Autoencoder

__all__ = ["EncodeConfig", "encode_dataset", "format_summary"]


def _fingerprint(cfg: EncodeConfig, vae_desc: dict, listing) -> dict:
    return {
        "format": FORMAT,
        "format_version": FINGERPRINT_VERSION,
        "inputs": listing.inputs,
        "listing_sha256": listing.sha256(),
        "num_listed": len(listing.items),
        "resolution": cfg.resolution,
        "vae": vae_desc,
        "vae_precision": cfg.vae_precision,
        "flip": cfg.flip,
        "min_size": cfg.min_size,
        "max_pixels": cfg.max_pixels,
        "shard_size": cfg.shard_size,
        # only when set: outputs of earlier versions (no such cap) keep resuming
        **({"max_file_bytes": cfg.max_file_bytes} if cfg.max_file_bytes != DEFAULT_MAX_FILE_BYTES else {}),
    }


def _completed_chunks(out: Path, n_chunks: int) -> list[int]:
    """Chunks whose sidecar is readable and whose shard exists; an unreadable sidecar is deleted (redone)."""
    done = []
    for k in range(n_chunks):
        sc = out / sidecar_name(k)
        if not sc.is_file():
            continue
        try:
            _, meta = read_sidecar(sc)
            ok = meta["chunk"] == k and (meta["count"] == 0 or (out / meta["name"]).is_file())
        except Exception:  # noqa: BLE001 - an unreadable sidecar means the chunk is redone
            ok = False
        if ok:
            done.append(k)
        else:
            sc.unlink()
    return done


def _plan(cfg: EncodeConfig, ae: Autoencoder, out: Path, part=None) -> dict:
    """Rank 0: listing (``part``: the listing -> the part of it to encode), output-dir check, cleanup of
    temporaries, list of pending chunks."""
    listing = list_inputs(cfg.inputs)
    if not listing.items:
        found = "; ".join(f"{p['path']}: {p['detail']}" for p in listing.problems)
        raise EncodeError(f"no image files found under {', '.join(listing.inputs)} (extensions "
                          f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case; hidden files are ignored)"
                          + (f"; {found}" if found else ""))
    if part is not None:
        listing = part(listing)
    fp = _fingerprint(cfg, ae.description(), listing)
    check_or_write_fingerprint(out, fp)
    for p in out.iterdir():  # partial files of a killed run
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink()
    per = cfg.images_per_chunk
    n_chunks = (len(listing.items) + per - 1) // per
    done = set(_completed_chunks(out, n_chunks))
    return {
        "items": [it.to_tuple() for it in listing.items],
        "labels": listing.labels,
        "class_names": listing.class_names,
        "num_classes": listing.num_classes,
        "problems": listing.problems,
        "fingerprint": fp,
        "n_chunks": n_chunks,
        "pending": [k for k in range(n_chunks) if k not in done],
        "resumed_chunks": len(done),
    }


def encode_dataset(cfg: EncodeConfig) -> dict:
    """Run the whole stage on every rank; returns the summary (validates ``cfg`` first).

    With ``val_fraction`` or ``val_inputs`` the validation dataset is encoded after the training one,
    with the same VAE and options (no mirrored copies), into ``cfg.validation_output``; each gets its
    own shards, statistics and manifest, and a ``split.json`` (:mod:`latentdiff.data.split`).
    """
    cfg.validate()
    ae = Autoencoder.load(cfg.vae, revision=cfg.vae_revision, device=device())
    if not cfg.has_validation:
        return _encode(cfg, ae)
    frac = float(cfg.val_fraction) or None
    train_part = (lambda lst: select(lst, set(range(len(lst.items))) - held_out(lst, frac))) if frac else None
    val_part = (lambda lst: select(lst, held_out(lst, frac))) if frac else None
    base = replace(cfg, val_fraction=0.0, val_inputs=[], val_output="")
    train = _encode(base, ae, train_part)
    val_cfg = replace(base, inputs=list(cfg.inputs if frac else cfg.val_inputs), output=str(cfg.validation_output),
                      flip=False)
    val = _encode(val_cfg, ae, val_part)
    counts = {"train_images": train["num_images"], "val_images": val["num_images"]}
    if get_rank() == 0:
        write_split_record(Path(train["output"]), "train", frac, counts, Path(val["output"]), cfg.val_inputs)
        write_split_record(Path(val["output"]), "val", frac, counts, Path(train["output"]), cfg.val_inputs)
    barrier()
    return {**train, "validation": val}


def _encode(cfg: EncodeConfig, ae: Autoencoder, part=None) -> dict:
    out = Path(cfg.output).expanduser().resolve()
    sample_shape = ae.latent_shape(cfg.resolution)  # fails fast when not divisible
    init_distributed()
    rank, world = get_rank(), get_world_size()
    t0 = time.time()
    plan = on_rank0(lambda: _plan(cfg, ae, out, part), rank, f"preparing {out}")
    t1 = time.time()
    encoded_here = encode_chunks(cfg, ae, out, plan, plan["pending"][rank::world], rank, sample_shape)
    t2 = time.time()
    barrier()
    summary = finish_dataset(cfg, out, plan, sample_shape, rank, world, ae)
    summary["encoded_this_run"] = encoded_here
    summary["encode_seconds"] = t2 - t1  # this rank: DataLoader + VAE + shard writing
    summary["finalize_seconds"] = time.time() - t2  # statistics pass 2 + manifest
    summary["seconds"] = time.time() - t0
    barrier()
    return summary


def format_summary(summary: dict) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in summary["skipped_by_reason"].items()) or "none"
    resumed = (f" ({summary['resumed_chunks']} of {summary['num_chunks']} chunks done by an earlier run)"
               if summary.get("resumed_chunks") else "")
    text = (
        f"encoded {summary['num_images']} images -> {summary['num_samples']} samples in {summary['num_shards']} shards"
        f"{resumed}; skipped {summary['skipped']} (by reason: {reasons}) -> {summary['output']}"
    )
    if summary.get("validation"):
        text += "\nvalidation: " + format_summary(summary["validation"])
    return text
