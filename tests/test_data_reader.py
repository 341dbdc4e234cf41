"""Training reader: rank/worker split, equal batch counts, determinism, resume, verification."""
from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.vae.normalization import Normalization
from latentdiff.data import (
    LatentShardDataset,
    check_normalization,
    make_loader,
    sample_latent,
    verify_dataset,
)
from latentdiff.data.encode import EncodeConfig, encode_dataset
from latentdiff.contracts.manifest import load_manifest
from latentdiff.data.shards import iter_tar, npy_load
from latentdiff.data.stats import DatasetStats
from latentdiff.data.synthetic import write_image_folder
from latentdiff.utils.errors import DataError

RES = 16
BS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Pixel-space dataset: 3 classes x 14 images, 4 samples per shard -> 11 shards (the last holds 2)."""
    root = tmp_path_factory.mktemp("reader")
    write_image_folder(root / "imgs", classes=3, per_class=14, size_range=(20, 60), seed=3)
    cfg = EncodeConfig(inputs=[str(root / "imgs")], output=str(root / "ds"), resolution=RES, vae="none",
                       shard_size=4, batch_size=8, workers=0, progress=False, command=["test"])
    encode_dataset(cfg)
    return root / "ds"


def _all_samples(root: Path) -> dict:
    out = {}
    for s in load_manifest(root).shards:
        for smp in iter_tar(io.BytesIO((root / s.name).read_bytes()), s.name):
            out[smp["__key__"]] = smp
    return out


def _epoch(loader):
    return [(m.clone(), sd.clone(), lab.clone(), list(k)) for m, sd, lab, k in loader]


def test_two_ranks_two_workers_disjoint_keys_equal_batches(data_dir):
    manifest = load_manifest(data_dir)
    n = manifest.num_samples
    assert n == 42 and len(manifest.shards) == 11
    orders = []
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            loader, ds = make_loader(data_dir, BS, num_workers=2, rank=rank, world_size=2, seed=7, epoch=epoch)
            batches = _epoch(loader)
            assert len(batches) == ds.batches_per_epoch() == len(ds) and len(ds) > 0
            assert all(b[0].shape == (BS, 3, RES, RES) for b in batches)
            per_rank.append(batches)
        counts = [len(b) for b in per_rank]
        assert counts[0] == counts[1]  # equal batch counts: no DDP hang on the last step
        keys = [[k for b in batches for k in b[3]] for batches in per_rank]
        assert len(set(keys[0])) == len(keys[0]) and len(set(keys[1])) == len(keys[1])
        assert not set(keys[0]) & set(keys[1])  # disjoint across ranks
        used = len(keys[0]) + len(keys[1])
        # at most about one shard + one batch per slot is dropped to equalize the epoch
        assert used >= n - 4 * (4 + BS)
        orders.append(keys)
    assert orders[0] != orders[1]  # reshuffled per epoch


def test_batches_carry_the_stored_samples(data_dir):
    samples = _all_samples(data_dir)
    loader, ds = make_loader(data_dir, BS, num_workers=0, rank=0, world_size=1, seed=0)
    for mean, std, label, keys in loader:
        assert mean.dtype == std.dtype == torch.float32 and label.dtype == torch.int64
        for i, k in enumerate(keys):
            smp = samples[k]
            np.testing.assert_array_equal(mean[i].numpy(), npy_load(smp["mean.npy"]).astype(np.float32))
            assert torch.all(std[i] == 0)
            assert int(label[i]) == json.loads(smp["json"])["label"] == int(smp["cls"])


@pytest.mark.parametrize("workers", [0, 2])
def test_deterministic_and_resumes_mid_epoch_bitwise(data_dir, workers):
    loader, ds = make_loader(data_dir, BS, num_workers=workers, rank=1, world_size=2, seed=11, epoch=3)
    full = _epoch(loader)
    again = _epoch(loader)
    assert [b[3] for b in full] == [b[3] for b in again]
    for start in (1, 2, 3, len(full) - 1):
        ds.set_epoch(3, start_batch=start)
        assert len(loader) == len(full) - start
        part = _epoch(loader)
        assert [b[3] for b in part] == [b[3] for b in full[start:]]
        for a, b in zip(part, full[start:]):
            assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    other_loader, _ = make_loader(data_dir, BS, num_workers=workers, rank=1, world_size=2, seed=12, epoch=3)
    assert [b[3] for b in _epoch(other_loader)] != [b[3] for b in full]
    with pytest.raises(ValueError, match="start_batch"):
        ds.set_epoch(3, start_batch=len(full) + 1)


def test_unshuffled_reader_reads_in_manifest_order(data_dir):
    loader, ds = make_loader(data_dir, 2, num_workers=0, rank=0, world_size=1, shuffle=False)
    keys = [k for b in loader for k in b[3]]
    assert keys == sorted(keys) and len(keys) == 42


def test_too_few_shards_and_worker_mismatch_are_clear(data_dir):
    with pytest.raises(DataError, match=r"11 shards but 4 ranks x 3 workers = 12 readers"):
        LatentShardDataset(data_dir, BS, rank=0, world_size=4, num_workers=3)
    ds = LatentShardDataset(data_dir, BS, rank=0, world_size=1, num_workers=2)
    with pytest.raises(DataError, match="num_workers=2"):
        next(iter(ds))  # built for 2 workers, iterated in the main process
    with pytest.raises(DataError, match="batch size 40"):
        LatentShardDataset(data_dir, 40, rank=0, world_size=2, num_workers=2)


def test_corrupt_or_truncated_shard_is_named(data_dir, tmp_path):
    bad = tmp_path / "ds"
    shutil.copytree(data_dir, bad)
    name = load_manifest(bad).shards[4].name
    path = bad / name
    raw = path.read_bytes()
    # same size, one byte changed inside a payload: only the checksum sees it
    flipped = bytearray(raw)
    flipped[700] ^= 0xFF
    path.write_bytes(bytes(flipped))
    verify_dataset(bad, mode="size", rank=0, world_size=1)
    with pytest.raises(DataError, match=rf"{name}: sha256 differs"):
        LatentShardDataset(bad, BS, rank=0, world_size=1, verify="sha256")
    # truncated: named by the size check, and by the reader itself when verification is off
    path.write_bytes(raw[: len(raw) // 2 + 100])
    with pytest.raises(DataError, match=rf"{name}: \d+ bytes, manifest says"):
        verify_dataset(bad, mode="size", rank=0, world_size=1)
    for workers in (0, 2):
        loader, _ = make_loader(bad, 1, num_workers=workers, rank=0, world_size=1, verify="none", shuffle=False)
        with pytest.raises(Exception, match=rf"shard .*{name}.*(truncated|corrupt|samples but dataset.json)") as ei:
            _epoch(loader)
        assert workers == 2 or isinstance(ei.value, DataError)
    # a missing shard
    path.unlink()
    with pytest.raises(DataError, match=rf"{name}: missing"):
        verify_dataset(bad, rank=0, world_size=1)


def _flip_inside_mean_npy(path: Path, n: int = 64) -> None:
    """Flip ``n`` bytes inside the array data of the first sample's mean.npy (sizes and headers unchanged)."""
    raw = bytearray(path.read_bytes())
    start = raw.index(b"\x93NUMPY") + 128  # past the 128-byte .npy header
    for k in range(n):
        raw[start + k] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_default_check_catches_content_corruption_and_old_datasets_fall_back(data_dir, tmp_path):
    """64 flipped bytes inside a shard's mean.npy: the default verify mode names the shard, the sample
    and the fix as the sample is read; a dataset without per-sample checksums says so in one note."""
    from latentdiff.training.config import TrainConfig

    assert TrainConfig().verify_shards == "sample"
    bad = tmp_path / "ds"
    shutil.copytree(data_dir, bad)
    name = load_manifest(bad).shards[2].name
    _flip_inside_mean_npy(bad / name)
    for workers in (0, 2):
        loader, ds = make_loader(bad, 1, num_workers=workers, rank=0, world_size=1, verify="sample", shuffle=False)
        assert ds.notes == []
        with pytest.raises(Exception, match=rf"shard .*{name}: sample '\d+' does not match its checksum; .*"
                                            r"restore .* re-run the same tools/encode_latents.py command"):
            _epoch(loader)
    # the intact dataset reads the same batches with and without the per-sample check
    a = [b[0] for b in _epoch(make_loader(data_dir, 4, num_workers=0, rank=0, world_size=1, verify="sample")[0])]
    b = [b[0] for b in _epoch(make_loader(data_dir, 4, num_workers=0, rank=0, world_size=1, verify="size")[0])]
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))
    # a dataset encoded before per-sample checksums: the size check, with one line saying so
    old = tmp_path / "old"
    shutil.copytree(data_dir, old)
    d = json.loads((old / "dataset.json").read_text())
    del d["stored"]["checksum"]
    (old / "dataset.json").write_text(json.dumps(d))
    ds = LatentShardDataset(old, 1, rank=0, world_size=1, verify="sample", shuffle=False)
    assert len(ds.notes) == 1 and "no per-sample checksums" in ds.notes[0] and "--verify-shards sha256" in ds.notes[0]
    assert not ds.check_samples


def test_sample_latent_is_fresh_and_exact():
    mean = torch.randn(4, 3, 8, 8)
    std = torch.rand(4, 3, 8, 8) + 0.1
    g = torch.Generator().manual_seed(0)
    a, b = sample_latent(mean, std, g), sample_latent(mean, std, g)
    assert not torch.equal(a, b)  # a fresh latent every call
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(sample_latent(mean, std, g2), a)  # reproducible from the generator
    assert torch.equal(sample_latent(mean, torch.zeros_like(std), g), mean)  # pixel space: std = 0
    big_mean, big_std = torch.full((20000,), 2.0), torch.full((20000,), 3.0)
    z = sample_latent(big_mean.view(1, -1, 1, 1).reshape(1, 1, 100, 200), big_std.reshape(1, 1, 100, 200), g)
    assert abs(float(z.mean()) - 2.0) < 0.1 and abs(float(z.std()) - 3.0) < 0.1


def test_normalization_check_at_load_trap_t2(data_dir):
    stats = DatasetStats.load(data_dir)
    good = Normalization.channel(stats, sigma_target=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_normalization(stats, good) == []
        LatentShardDataset(data_dir, BS, rank=0, world_size=1, normalization=good)
    # pixels in [-1, 1] have std ~0.5, not the identity's target 1: warned at load
    ident = Normalization.identity(3)
    with pytest.warns(UserWarning, match="normalization 'identity' does not map this dataset"):
        ds = LatentShardDataset(data_dir, BS, rank=0, world_size=1, normalization=ident)
    assert any("std" in p for p in ds.problems)
    shifted = Normalization("channel", [s + 0.3 for s in good.shift], good.scale, 0.5)
    assert any("mean" in p for p in check_normalization(stats, shifted, warn=False))
    # the normalized batch a trainer sees: model = (z - shift) * scale
    loader, _ = make_loader(data_dir, BS, num_workers=0, rank=0, world_size=1)
    mean, std, _, _ = next(iter(loader))
    torch.testing.assert_close(good.to_model(sample_latent(mean, std)), (mean - torch.tensor(good.shift).view(-1, 1, 1)) * torch.tensor(good.scale).view(-1, 1, 1))
