"""The encode stage's validation split: deterministic by file name, disjoint, complete, its own statistics."""
from __future__ import annotations

import json
import shutil

import pytest

from latentdiff.contracts.manifest import load_manifest
from latentdiff.data.encode import EncodeConfig, encode_dataset
from latentdiff.data.inputs import list_inputs
from latentdiff.data.shards import read_shard_verified
from latentdiff.data.split import held_out, split_key
from latentdiff.data.synthetic import make_tiny_vae, write_image_folder
from latentdiff.utils.errors import EncodeError


def _names(listing, idx) -> set[str]:
    return {split_key(listing.items[i], listing.inputs) for i in idx}


def test_held_out_set_depends_only_on_the_file_names(tmp_path):
    write_image_folder(tmp_path / "a" / "images", classes=3, per_class=10, size_range=(40, 48), seed=0)
    shutil.copytree(tmp_path / "a" / "images", tmp_path / "elsewhere" / "copy")
    one, two = list_inputs([str(tmp_path / "a" / "images")]), list_inputs([str(tmp_path / "elsewhere" / "copy")])
    h1, h2 = held_out(one, 0.2), held_out(two, 0.2)
    assert len(h1) == 6 and _names(one, h1) == _names(two, h2)  # moved data: the same validation images
    assert held_out(one, 0.2) == h1  # repeatable
    assert _names(one, held_out(one, 0.5)) >= _names(one, h1)  # a larger fraction keeps the smaller one's images
    with pytest.raises(EncodeError, match="leaves no training image"):
        held_out(one, 0.99)


def _keys_and_sources(root):
    m = load_manifest(root)
    out = []
    for s in m.shards:
        samples, _, _ = read_shard_verified(root / s.name, s.name, keep=("json",))
        out += [json.loads(smp["json"])["source"] for smp in samples if not smp["__key__"].endswith("-flip")]
    return out


def test_val_fraction_encodes_two_disjoint_datasets_with_their_own_statistics(tmp_path):
    vae = make_tiny_vae(tmp_path / "vae")
    write_image_folder(tmp_path / "images", classes=3, per_class=8, size_range=(40, 64), seed=1)
    cfg = EncodeConfig(inputs=[str(tmp_path / "images")], output=str(tmp_path / "data"), resolution=32, vae=str(vae),
                       shard_size=4, batch_size=8, workers=0, progress=False, val_fraction=0.25, flip=True)
    summary = encode_dataset(cfg)
    train_root, val_root = tmp_path / "data", tmp_path / "data" / "val"
    assert summary["num_images"] == 18 and summary["validation"]["num_images"] == 6
    train, val = _keys_and_sources(train_root), _keys_and_sources(val_root)
    assert len(train) == 18 and len(val) == 6 and not set(train) & set(val)
    assert sorted(set(train) | set(val)) == sorted(str(p) for p in (tmp_path / "images").rglob("*") if p.is_file())
    listing = list_inputs([str(tmp_path / "images")])
    assert {split_key(it, listing.inputs) for it in listing.items if it.source in val} == \
        _names(listing, held_out(listing, 0.25))
    for root in (train_root, val_root):  # each part is a complete dataset with its own statistics
        assert (root / "stats.json").is_file() and (root / "dataset.json").is_file()
    tm, vm = load_manifest(train_root), load_manifest(val_root)
    assert tm.class_names == vm.class_names and tm.flip and not vm.flip  # one label vocabulary; no mirrors in val
    assert json.loads((train_root / "split.json").read_text())["validation_dataset"] == str(val_root.resolve())
    assert json.loads((val_root / "split.json").read_text())["role"] == "val"
    again = encode_dataset(cfg)  # re-running the command resumes both parts, nothing re-encoded
    assert again["encoded_this_run"] == 0 and again["validation"]["encoded_this_run"] == 0


def test_separate_validation_input_and_bad_options(tmp_path):
    vae = make_tiny_vae(tmp_path / "vae")
    write_image_folder(tmp_path / "train", classes=2, per_class=4, size_range=(40, 48), seed=2)
    write_image_folder(tmp_path / "held", classes=2, per_class=2, size_range=(40, 48), seed=3)
    base = dict(inputs=[str(tmp_path / "train")], resolution=32, vae=str(vae), shard_size=4, batch_size=8, workers=0,
                progress=False)
    s = encode_dataset(EncodeConfig(output=str(tmp_path / "d"), val_inputs=[str(tmp_path / "held")],
                                    val_output=str(tmp_path / "v"), **base))
    assert s["num_images"] == 8 and s["validation"]["num_images"] == 4 and (tmp_path / "v" / "split.json").is_file()
    with pytest.raises(EncodeError, match="either --val-fraction or --val-input"):
        EncodeConfig(output=str(tmp_path / "x"), val_fraction=0.1, val_inputs=[str(tmp_path / "held")], **base).validate()
    with pytest.raises(EncodeError, match=r"--val-fraction must be in \[0, 1\)"):
        EncodeConfig(output=str(tmp_path / "x"), val_fraction=1.5, **base).validate()
