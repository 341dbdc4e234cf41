"""Encoding stage: preprocessing, bad input, manifest, statistics, normalization round trip.

All offline: a tiny AutoencoderKL built from a config and saved to a temp dir, images cropped from the
photos bundled with scikit-image.  Multi-process tests live in test_encode_dist.py.
"""
from __future__ import annotations

import io
import json
import math
import os
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.vae.autoencoder import Autoencoder
from latentdiff.vae.normalization import Normalization
from latentdiff.data.encode import EncodeConfig, encode_dataset, format_summary
from latentdiff.data.images import ImageSkip, adm_center_crop, decode_image, load_and_preprocess, to_rgb
from latentdiff.data.inputs import InputItem, list_inputs, read_item_bytes
from latentdiff.contracts.manifest import load_manifest
from latentdiff.data.photos import load_photo
from latentdiff.data.shards import iter_tar, npy_load
from latentdiff.data.stats import DatasetStats, rgb64_power
from latentdiff.data.synthetic import make_tiny_vae, write_image_folder, write_image_tar
from latentdiff.utils.errors import EncodeError
from latentdiff.utils.io import sha256_file

RES = 32


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "train"
    write_image_folder(root, classes=3, per_class=5, size_range=(24, 90), seed=1)
    return root


def _encode(inputs, out, vae, **kw):
    cfg = EncodeConfig(inputs=[str(i) for i in inputs], output=str(out), resolution=kw.pop("resolution", RES),
                       vae=str(vae), progress=False, workers=kw.pop("workers", 0), command=["test"], **kw)
    return encode_dataset(cfg)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, vae_dir, folder):
    out = tmp_path_factory.mktemp("enc") / "out"
    summary = _encode([folder], out, vae_dir, flip=True, shard_size=6, batch_size=5, workers=2)
    return out, summary


def _read_all(out: Path):
    m = load_manifest(out)
    samples = []
    for s in m.shards:
        for smp in iter_tar(io.BytesIO((out / s.name).read_bytes()), s.name):
            samples.append(smp)
    return m, samples


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.double() - b.double()).square().mean())
    return 10 * math.log10(4.0 / max(mse, 1e-20))


# ----------------------------------------------------------------------------------------------
# preprocessing


def test_adm_center_crop_follows_adm_steps():
    photo = load_photo("astronaut")[:300, :200]  # (h=300, w=200)
    img = Image.fromarray(photo)
    out = adm_center_crop(img, 64)
    # by hand: 200 >= 128 -> BOX halve to 100x150; 100 < 128 stop; BICUBIC to 64x96; crop rows 16..80
    ref = img.resize((100, 150), resample=Image.BOX).resize((64, 96), resample=Image.BICUBIC)
    ref = np.asarray(ref)[16:80, 0:64]
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, ref)
    # smaller than the resolution: upscaled (ADM), short side -> resolution
    small = Image.fromarray(load_photo("coffee")[:40, :50])
    up = adm_center_crop(small, 64)
    ref = np.asarray(small.resize((80, 64), resample=Image.BICUBIC))[:, 8:72]
    np.testing.assert_array_equal(up, ref)


def test_to_rgb_handles_every_mode():
    rgb = load_photo("chelsea")[:20, :30]
    gray = rgb[..., 0]
    cases = {
        "L": Image.fromarray(gray),
        "LA": Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1)),
        "P": Image.fromarray(rgb).convert("P"),
        "RGBA": Image.fromarray(np.concatenate([rgb, np.full_like(gray, 255)[..., None]], -1)),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "I;16": Image.fromarray(gray.astype(np.uint16) * 257),
        "I": Image.fromarray(gray.astype(np.int32) * 257),
        "F": Image.fromarray(gray.astype(np.float32) / 255.0),
        "1": Image.fromarray(gray > 128).convert("1"),
        "YCbCr": Image.fromarray(rgb).convert("YCbCr"),
    }
    for mode, img in cases.items():
        assert img.mode == mode
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == (30, 20), mode
    np.testing.assert_array_equal(np.asarray(to_rgb(cases["L"]))[..., 1], gray)
    np.testing.assert_array_equal(np.asarray(to_rgb(cases["I;16"]))[..., 0], gray)  # 65535 -> 255
    np.testing.assert_array_equal(np.asarray(to_rgb(cases["I"]))[..., 2], gray)
    np.testing.assert_array_equal(np.asarray(to_rgb(cases["F"]))[..., 0], gray)
    np.testing.assert_array_equal(np.asarray(to_rgb(cases["RGBA"])), rgb)  # opaque alpha: unchanged
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    np.testing.assert_array_equal(np.asarray(to_rgb(transparent)), np.full((4, 4, 3), 255))  # onto white


def _png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bomb_png(w=40000, h=40000) -> bytes:
    """A tiny PNG whose header claims w x h pixels (no pixel data is ever decoded)."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decode_skip_reasons(tmp_path, monkeypatch):
    photo = load_photo("rocket")[:64, :64]
    png, jpg = _png_bytes(photo), _jpeg_bytes(photo)
    expect = {
        b"": "empty_file",
        b"definitely not an image": "not_an_image",
        png[: len(png) // 2]: "corrupt",
        jpg[: len(jpg) // 2]: "corrupt",
        _bomb_png(): "decompression_bomb",
        _png_bytes(photo[:8, :8]): "too_small",
    }
    for data, reason in expect.items():
        with pytest.raises(ImageSkip) as ei:
            load_and_preprocess(data, 32, min_size=16)
        assert ei.value.reason == reason, (reason, ei.value)
    # a bomb between the PIL warning and error thresholds is skipped too (warning -> skip)
    with pytest.raises(ImageSkip) as ei:
        decode_image(_png_bytes(photo), max_pixels=1000)
    assert ei.value.reason == "decompression_bomb"
    assert load_and_preprocess(png, 32, min_size=16).shape == (32, 32, 3)
    # unreadable: permissions (simulated: the tests run as root), a directory, a dangling path
    p = tmp_path / "x.png"
    p.write_bytes(png)

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr("builtins.open", deny)
        m.setattr("os.open", deny)
        with pytest.raises(ImageSkip) as ei:
            read_item_bytes(InputItem(str(p)))
    assert ei.value.reason == "unreadable" and "Permission" in ei.value.detail
    (tmp_path / "dir.jpg").mkdir()
    for bad in (tmp_path / "dir.jpg", tmp_path / "missing.jpg"):
        with pytest.raises(ImageSkip) as ei:
            read_item_bytes(InputItem(str(bad)))
        assert ei.value.reason == "unreadable"


# ----------------------------------------------------------------------------------------------
# inputs


def test_input_kinds_and_deterministic_order(tmp_path, folder):
    tar = write_image_tar(tmp_path / "wds.tar", n=5, size=40)
    lst = tmp_path / "list.txt"
    files = sorted(folder.rglob("*.png"))[:3]
    lst.write_text("# comment\n" + "".join(f"{f}\tlisted_{i % 2}\n" for i, f in enumerate(files)) + "\n")
    a = list_inputs([str(folder), str(lst)])
    b = list_inputs([str(folder), str(lst)])
    assert [i.to_tuple() for i in a.items] == [i.to_tuple() for i in b.items] and a.sha256() == b.sha256()
    assert a.class_names == sorted({"chelsea", "coffee", "astronaut", "listed_0", "listed_1"})
    assert len(a.items) == 15 + 3
    first = a.items[0]
    assert Path(first.source).parent.name == a.class_names[a.labels[0]]
    t = list_inputs([str(tar)])
    assert t.class_names is None and t.labels == [0, 1, 2, 0, 1] and t.num_classes == 3
    assert read_item_bytes(t.items[2])[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(EncodeError, match="mix integer .cls labels"):
        list_inputs([str(folder), str(tar)])
    with pytest.raises(EncodeError, match="given twice"):
        list_inputs([str(folder), str(folder)])
    with pytest.raises(EncodeError, match="does not exist"):
        list_inputs([str(tmp_path / "nope")])


# ----------------------------------------------------------------------------------------------
# the encoded dataset


def test_vae_gets_channels_last_batches_with_the_decoded_pixels(vae_dir, folder, tmp_path, monkeypatch):
    """The tool hands the VAE each batch as an NCHW view of NHWC memory (channels_last: the faster
    layout for its convolutions on CPU, see tools/bench/encode_throughput.py) holding exactly the
    preprocessed pixels, with and without DataLoader workers."""
    seen = []
    real = Autoencoder.encode

    def spy(self, x, precision=None):
        seen.append((x.is_contiguous(memory_format=torch.channels_last), x.clone()))
        return real(self, x, precision)

    monkeypatch.setattr(Autoencoder, "encode", spy)
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    want = torch.stack([torch.from_numpy(load_and_preprocess(p.read_bytes(), RES, min_size=1)) for p in paths])
    want = want.permute(0, 3, 1, 2).float() / 127.5 - 1
    for workers in (0, 2):
        seen.clear()
        _encode([folder], tmp_path / f"w{workers}", vae_dir, batch_size=4, workers=workers)
        assert seen and all(cl for cl, _ in seen)
        got = torch.cat([x for _, x in seen])
        assert got.shape == want.shape and torch.equal(got, want)


def test_manifest_contents(dataset, vae_dir, folder):
    out, summary = dataset
    m, samples = _read_all(out)
    raw = json.loads((out / "dataset.json").read_text())
    assert raw["format"] == "latentdiff-latents" and raw["format_version"] == 2
    vae = m.vae
    assert vae["kind"] == "AutoencoderKL" and vae["id"] == str(Path(vae_dir).resolve()) and vae["source"] == "local"
    assert vae["scaling_factor"] == pytest.approx(0.18215) and vae["shift_factor"] is None
    assert vae["latent_channels"] == 4 and vae["downsampling_factor"] == 2 and vae["in_pixel_range"] == [-1.0, 1.0]
    assert vae["weights_sha256"] == sha256_file(Path(vae_dir) / "diffusion_pytorch_model.safetensors")
    assert m.vae_precision == "fp32" and list(m.pixel_range) == [-1.0, 1.0] == raw["pixel_range"]
    assert m.resolution == RES and list(m.sample_shape) == [4, RES // 2, RES // 2] == raw["sample_shape"]
    assert m.class_names == ["astronaut", "chelsea", "coffee"] and m.num_classes == 3
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    n_images = 15 - len(skipped)
    assert all(s["reason"] == "too_small" for s in skipped)  # size_range starts below RES/2
    assert m.num_images == n_images and m.num_samples == 2 * n_images == len(samples)
    assert m.skipped_total == len(skipped) == summary["skipped"]
    assert m.flip is True and m.min_size == RES // 2 and raw["preprocessing"]["flip"] is True
    assert m.command == "test" and raw["stored"]["dtype"] == "float16"
    for s in m.shards:
        assert 0 < s.count <= 6 and sha256_file(out / s.name) == s.sha256
        assert (out / s.name).stat().st_size == s.bytes
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards_hash"] == m.shards_hash and stats["n"] == m.num_samples
    # each value is stored once: the totals, the shard-list hash and the encode.json copy are derived
    assert not {"num_samples", "num_images", "shards_hash", "fingerprint", "num_chunks"} & set(raw)
    # every sample: members, dtypes, label = folder name, flip pairs, key = global index
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys)
    for smp in samples:
        meta = json.loads(smp["json"])
        mean, std = npy_load(smp["mean.npy"]), npy_load(smp["std.npy"])
        assert mean.dtype == std.dtype == np.float16 and mean.shape == (4, RES // 2, RES // 2)
        assert (std > 0).all()
        assert int(smp["cls"]) == meta["label"] == m.class_names.index(Path(meta["source"]).parent.name)
        assert smp["__key__"] == f"{meta['index']:09d}" + ("-flip" if meta["flipped"] else "")
    # no temporaries left, writers closed (every shard parses to the end)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_rerun_of_a_complete_dataset_is_a_noop_and_other_dataset_refused(dataset, vae_dir, folder, tmp_path):
    out, _ = dataset
    before = {p.name: sha256_file(p) for p in out.glob("shard-*.tar")}
    summary = _encode([folder], out, vae_dir, flip=True, shard_size=6, batch_size=5, workers=0)
    assert summary["resumed_chunks"] == summary["num_chunks"] and summary["encoded_this_run"] == 0
    assert {p.name: sha256_file(p) for p in out.glob("shard-*.tar")} == before
    for kw, field in [({"resolution": 16}, "resolution"), ({"flip": False}, "flip"), ({"vae": "none"}, "vae")]:
        args = dict(flip=True, shard_size=6)
        args.update(kw)
        with pytest.raises(EncodeError, match=rf"--output .* different dataset .*{field}") as ei:
            _encode([folder], out, args.pop("vae", vae_dir), **args)
        assert "new --output" in str(ei.value)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.png").write_bytes(_png_bytes(load_photo("coins")[:64, :64]))
    with pytest.raises(EncodeError, match="listing_sha256|inputs"):
        _encode([other], out, vae_dir, flip=True, shard_size=6)


def test_normalization_round_trip_and_swapped_metadata_fails(dataset, vae_dir):
    """Trap T1: image -> stored latent -> to_model -> to_raw -> decode matches the VAE's own reconstruction."""
    out, _ = dataset
    m, samples = _read_all(out)
    smp = next(s for s in samples if not json.loads(s["json"])["flipped"])
    meta = json.loads(smp["json"])
    ae = Autoencoder.load(m.vae["id"])
    img = load_and_preprocess(Path(meta["source"]).read_bytes(), RES, min_size=RES // 2)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    mean_ref, std_ref = ae.encode(x)
    stored = torch.from_numpy(npy_load(smp["mean.npy"]).astype(np.float32))[None]
    assert torch.allclose(stored, mean_ref, rtol=2e-3, atol=2e-3)  # float16 storage of the posterior mean
    assert torch.allclose(torch.from_numpy(npy_load(smp["std.npy"]).astype(np.float32))[None], std_ref, rtol=2e-3, atol=1e-4)
    reference = ae.decode(mean_ref)
    sd = Normalization.sd(m.vae)
    ch = Normalization.channel(DatasetStats.load(out))
    assert sd.scale == (0.18215,) * 4 and sd.shift == (0.0,) * 4
    for norm in (sd, ch, Normalization.from_dict(json.loads(json.dumps(ch.to_dict())))):
        z = norm.to_model(stored)
        assert torch.allclose(norm.to_raw(z), stored, rtol=1e-6, atol=1e-6)
        assert _psnr(ae.decode(norm.to_raw(z)), reference) > 40
    # swapped metadata: encode with one recipe, decode with the other's inverse -> garbage
    assert _psnr(ae.decode(ch.to_raw(sd.to_model(stored))), reference) < 25
    assert _psnr(ae.decode(sd.to_raw(ch.to_model(stored))), reference) < 25
    # the flipped sample is the encoding of the mirrored image
    flip = next(s for s in samples if s["__key__"] == smp["__key__"] + "-flip")
    mf, _ = ae.encode(x.flip(-1))
    assert torch.allclose(torch.from_numpy(npy_load(flip["mean.npy"]).astype(np.float32))[None], mf, rtol=2e-3, atol=2e-3)


def test_statistics_equal_brute_force(dataset):
    out, _ = dataset
    m, samples = _read_all(out)
    st = DatasetStats.load(out)
    mean = torch.from_numpy(np.stack([npy_load(s["mean.npy"]) for s in samples]).astype(np.float64))
    std = torch.from_numpy(np.stack([npy_load(s["std.npy"]) for s in samples]).astype(np.float64))
    n = mean.shape[0]
    assert st.n == n == m.num_samples
    rt = dict(rtol=1e-12, atol=0)
    torch.testing.assert_close(st.channel_mean, mean.mean(dim=(0, 2, 3)), **rt)
    var_m = mean.var(dim=(0, 2, 3), unbiased=False)
    e_s2 = std.square().mean(dim=(0, 2, 3))
    torch.testing.assert_close(st.channel_std_mean_only, var_m.sqrt(), **rt)
    torch.testing.assert_close(st.latent_var_mean, e_s2, **rt)
    torch.testing.assert_close(st.channel_std, (var_m + e_s2).sqrt(), **rt)
    fft = torch.fft.fft2(mean, norm="ortho")
    torch.testing.assert_close(st.latent_power, (fft.real.square() + fft.imag.square()).mean(0), **rt)
    # O(N^2) distances, raw and under a per-channel scale
    for scale in (None, torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)):
        y = mean if scale is None else mean * scale.view(1, -1, 1, 1)
        flat = y.reshape(n, -1)
        d2 = (flat[:, None, :] - flat[None, :, :]).square().sum(-1)
        di = d2.sum(1) / (n - 1)
        mu, sd = st.distance_stats().moments(scale)
        assert mu == pytest.approx(float(di.mean()), rel=1e-10)
        assert sd == pytest.approx(float(di.std(unbiased=False)), rel=1e-8)
    # RGB 64x64 reference spectrum, recomputed from the source files (flips included)
    acc = torch.zeros(3, 64, 64, dtype=torch.float64)
    for s in samples:
        meta = json.loads(s["json"])
        img = load_and_preprocess(Path(meta["source"]).read_bytes(), RES, min_size=RES // 2)
        acc += rgb64_power(img[:, ::-1] if meta["flipped"] else img)
    torch.testing.assert_close(st.rgb64_power, acc / n, rtol=1e-10, atol=0)
    assert st.rgb64_n == n
    # spectrum of sampled latents = latent_power + latent_var_mean (Monte Carlo, one sample's spectrum)
    g = torch.Generator().manual_seed(0)
    k = 4000
    eps = torch.randn(k, *mean.shape[1:], generator=g, dtype=torch.float64)
    z = mean[0] + std[0] * eps
    fz = torch.fft.fft2(z, norm="ortho")
    emp = (fz.real.square() + fz.imag.square()).mean(0)
    f0 = torch.fft.fft2(mean[0], norm="ortho")
    theory = f0.real.square() + f0.imag.square() + std[0].square().mean(dim=(1, 2)).view(-1, 1, 1)
    assert float(((emp - theory) / theory).abs().mean()) < 0.05


def test_dataset_stats_tool_recomputes_exactly(dataset, capsys):
    import importlib.util

    out, _ = dataset
    spec = importlib.util.spec_from_file_location("dataset_stats", Path(__file__).parents[1] / "tools" / "dataset_stats.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(out), "--no-progress", "--rtol", "1e-12"]) == 0
    text = capsys.readouterr().out
    assert "agree" in text and "latent_power" in text
    from latentdiff.data.recompute import recompute_stats, relative_difference

    new, notes = recompute_stats(out)
    assert notes == [] and max(relative_difference(new, DatasetStats.load(out)).values()) == 0.0


def test_bad_corpus_never_stops_the_run(tmp_path, vae_dir, capsys):
    good_dir = tmp_path / "in" / "good"
    good_dir.mkdir(parents=True)
    photo = load_photo("astronaut")
    goods = []
    modes = [("rgb.png", photo[:80, :70]), ("rgb.jpg", photo[100:160, 50:140]),
             ("gray.png", photo[:64, :64, 0]), ("cmyk.jpg", photo[:64, :64])]
    for name, arr in modes:
        p = good_dir / name
        img = Image.fromarray(arr)
        if name == "cmyk.jpg":
            img = img.convert("CMYK")
        img.save(p)
        goods.append(p)
    p16 = good_dir / "deep16.png"
    Image.fromarray(photo[:48, :48, 1].astype(np.uint16) * 257).save(p16)
    pa = good_dir / "alpha.png"
    Image.fromarray(np.concatenate([photo[:50, :50], np.full((50, 50, 1), 128, np.uint8)], -1)).save(pa)
    goods += [p16, pa]
    bad_dir = tmp_path / "in" / "bad"
    bad_dir.mkdir()
    png, jpg = _png_bytes(photo[:64, :64]), _jpeg_bytes(photo[:64, :64])
    bads = {
        "truncated.png": (png[: len(png) // 2], "corrupt"),
        "truncated.jpg": (jpg[: len(jpg) // 3], "corrupt"),
        "empty.jpg": (b"", "empty_file"),
        "text.png": (b"this is a text file with an image extension\n", "not_an_image"),
        "bomb.png": (_bomb_png(), "decompression_bomb"),
        "tiny.png": (_png_bytes(photo[:10, :12]), "too_small"),
    }
    for name, (data, _) in bads.items():
        (bad_dir / name).write_bytes(data)
    os.symlink(tmp_path / "does-not-exist.png", bad_dir / "dangling.png")
    # a tar input truncated inside its last member, and a list file with a directory / missing path
    tar = write_image_tar(tmp_path / "shard.tar", n=3, size=48, with_cls=False)
    with tarfile.open(tar) as tf:
        last = tf.getmembers()[-1]  # 000002.png
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[: last.offset_data + last.size // 2])
    (tmp_path / "adir.png").mkdir()
    lst = tmp_path / "list.txt"
    lst.write_text(f"{tmp_path / 'adir.png'}\n{tmp_path / 'gone.jpg'}\n")
    out = tmp_path / "out"
    cfg = EncodeConfig(inputs=[str(tmp_path / "in"), str(cut), str(lst)], output=str(out), resolution=RES,
                       vae="none", progress=False, workers=2, batch_size=4, shard_size=3, command=["t"])
    summary = encode_dataset(cfg)
    print(format_summary(summary))
    skipped = {Path(s["path"].split("::")[0]).name + ("::" + s["path"].split("::")[1] if "::" in s["path"] else ""): s
               for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    for name, (_, reason) in bads.items():
        assert skipped[name]["reason"] == reason, (name, skipped[name])
    assert skipped["dangling.png"]["reason"] == "unreadable"
    assert skipped["adir.png"]["reason"] == "unreadable" and skipped["gone.jpg"]["reason"] == "unreadable"
    assert skipped["cut.tar::000002.png"]["reason"] == "truncated"
    m, samples = _read_all(out)
    sources = sorted(json.loads(s["json"])["source"] for s in samples if json.loads(s["json"])["member"] is None)
    assert sources == sorted(str(p) for p in goods)  # every good file, exactly once
    members = sorted(json.loads(s["json"])["member"] for s in samples if json.loads(s["json"])["member"])
    assert members == ["000000.png", "000001.png"]
    assert skipped["cut.tar"]["reason"] == "corrupt_container"  # the tar itself ends early
    assert summary["skipped"] == len(bads) + 5 == m.skipped_total
    assert summary["num_images"] == len(goods) + 2
    text = capsys.readouterr().out
    assert "skipped 11" in text and "decompression_bomb 1" in text


def test_pixel_space_vae_none(tmp_path, folder):
    out = tmp_path / "px"
    _encode([folder], out, "none", shard_size=4)
    m, samples = _read_all(out)
    assert m.vae == "none" and list(m.sample_shape) == [3, RES, RES]
    assert "pixels in [-1, 1]" in json.loads((out / "dataset.json").read_text())["stored"]["content"]
    for smp in samples[:5]:
        meta = json.loads(smp["json"])
        img = load_and_preprocess(Path(meta["source"]).read_bytes(), RES, min_size=RES // 2)
        mean = npy_load(smp["mean.npy"]).astype(np.float64)
        assert (npy_load(smp["std.npy"]) == 0).all()
        x = img.transpose(2, 0, 1) / 127.5 - 1
        assert np.abs(mean - x).max() < 1e-3 and mean.min() >= -1 and mean.max() <= 1
        np.testing.assert_array_equal(np.round((mean + 1) * 127.5).astype(np.uint8), img.transpose(2, 0, 1))
    st = DatasetStats.load(out)
    assert torch.all(st.latent_var_mean == 0) and torch.equal(st.channel_std, st.channel_std_mean_only)
    ident = Normalization.sd("none")
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(ident.to_model(x), x) and torch.equal(ident.to_raw(x), x)
    assert Autoencoder.load("none").description()["kind"] == "none"


def test_bad_arguments_fail_fast(tmp_path, folder, vae_dir, monkeypatch):
    out = tmp_path / "o"
    with pytest.raises(EncodeError, match="--input .*does not exist"):
        _encode([tmp_path / "missing"], out, vae_dir)
    with pytest.raises(EncodeError, match="--resolution 33 is not divisible by the VAE downsampling factor 2"):
        _encode([folder], out, vae_dir, resolution=33)
    with pytest.raises(EncodeError, match="--vae .*neither an existing directory nor a hub id"):
        _encode([folder], out, "./no/such/vae")
    with pytest.raises(EncodeError, match="--shard-size must be an integer >= 2"):
        _encode([folder], out, vae_dir, shard_size=1, flip=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(EncodeError) as ei:
        _encode([folder], out, "someorg/not-a-cached-vae")
    assert time.time() - t < 30  # no network retries (those take minutes); generous for a busy machine
    msg = str(ei.value)
    assert "HF_HUB_OFFLINE=1" in msg and "--vae /path/vae" in msg and "save_pretrained" in msg
    # an output dir with an unrelated dataset
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "shard-000000.tar").write_bytes(b"x")
    with pytest.raises(EncodeError, match="--output .*no encode.json"):
        _encode([folder], tmp_path / "foreign", vae_dir)
    assert not out.exists() or not any(out.glob("shard-*"))


def test_cli_reads_a_yaml_config_and_flags_override_it(tmp_path, folder, capsys):
    """``latentdiff-encode --config encode.yaml``: the same EncodeConfig fields as the flags, flags win."""
    from latentdiff.cli.encode import main

    cfg = tmp_path / "encode.yaml"
    cfg.write_text(f"inputs: [{folder}]\noutput: {tmp_path / 'out'}\nresolution: {RES}\nvae: none\n"
                   "shard_size: 100\nworkers: 0\nmin_size: null\n")
    summary = tmp_path / "summary.json"
    assert main(["--config", str(cfg), "--shard-size", "4", "--flip", "--min-size", "20", "--no-progress",
                 "--summary-json", str(summary)]) == 0
    m = load_manifest(tmp_path / "out")
    assert (m.shard_size, m.flip, m.min_size, m.vae, m.resolution) == (4, True, 20, "none", RES)
    assert json.loads(summary.read_text())["num_samples"] == m.num_samples > 0
    assert f"-> {tmp_path / 'out'}" in capsys.readouterr().out
    # repeated --input flags; a YAML typo gets a suggestion; a missing input is named; all exit 2
    assert main(["--input", str(folder / "chelsea"), "--input", str(folder / "coffee"), "--output",
                 str(tmp_path / "two"), "--resolution", str(RES), "--vae", "none", "--workers", "0",
                 "--no-progress"]) == 0
    assert load_manifest(tmp_path / "two").class_names is None  # two class folders given as roots: no labels
    cfg.write_text("input: [x]\nimage_size: 64\n")
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "input (did you mean inputs?)" in err and "image_size (did you mean resolution?)" in err
    assert main(["--output", str(tmp_path / "o2"), "--resolution", "32"]) == 2
    assert "no --input given" in capsys.readouterr().err


def test_vae_fp32_outside_autocast_and_precision_validation(vae_dir):
    """Trap T3: fp32 whatever the caller's autocast; large images stay finite; lower precision is validated."""
    ae = Autoencoder.load(str(vae_dir))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    m0, s0 = ae.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m1, s1 = ae.encode(x)
        d1 = ae.decode(m1)
    assert m1.dtype == s1.dtype == d1.dtype == torch.float32
    assert torch.equal(m0, m1) and torch.equal(s0, s1)
    # a 1024 px image through a tiny VAE without mid-block attention: finite in fp32
    big_dir = make_tiny_vae(Path(vae_dir).parent / "noattn", mid_block_add_attention=False)
    big = Autoencoder.load(str(big_dir))
    photo = load_photo("astronaut")  # 512 x 512 -> 1024 x 1024
    xb = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 127.5 - 1
    xb = xb.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    assert xb.shape == (1, 3, 1024, 1024)
    mb, sb = big.encode(xb)
    assert torch.isfinite(mb).all() and torch.isfinite(sb).all()
    assert torch.isfinite(big.decode(mb[..., :128, :128])).all()  # decode checked on a 256 px tile (cost)
    with pytest.raises(EncodeError, match="--vae-precision bf16: the VAE is not accurate"):
        ae.validate_precision("bf16", x, rtol=1e-12)
    assert ae.precision == "fp32"
    rep = ae.validate_precision("bf16", x, rtol=0.5)
    assert ae.precision == "bf16" and rep["max_rel_error"] > 0
    mb16, _ = ae.encode(x)
    assert mb16.dtype == torch.float32 and torch.isfinite(mb16).all() and not torch.equal(mb16, m0)


def test_normalization_dataclass():
    n = Normalization("channel", [1.0, -2.0], [0.5, 4.0], 0.5)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(n.to_raw(n.to_model(x)), x, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(n.to_model(x)[:, 1], (x[:, 1] + 2.0) * 4.0)
    assert Normalization.from_dict(n.to_dict()) == n
    with pytest.raises(ValueError, match="channels"):
        n.to_model(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="non-zero"):
        Normalization("x", [0.0], [0.0])
    with pytest.raises(ValueError, match="lacks"):
        Normalization.from_dict({"kind": "sd"})
    stats = {"mean": [1.0, 2.0], "std": [2.0, 0.5], "std_mean_only": [1.0, 0.4]}
    ch = Normalization.channel(stats, sigma_target=0.5)
    assert ch.shift == (1.0, 2.0) and ch.scale == (0.25, 1.0) and ch.target_std == 0.5
    m, s = ch.normalized_moments(stats["mean"], stats["std"])
    assert m == [0.0, 0.0] and s == [0.5, 0.5]


def test_nonfinite_latents_are_skipped_not_stored(tmp_path, folder, monkeypatch):
    """A VAE that returns NaN/Inf for an image: that image is skipped with its reason, the rest is kept."""
    orig = Autoencoder.encode

    def poisoned(self, x, precision=None):
        m, s = (t.clone() for t in orig(self, x, precision))
        m[0, 0, 0, 0] = float("nan")
        s[-1, 0, 0, 0] = float("inf")
        return m, s

    monkeypatch.setattr(Autoencoder, "encode", poisoned)
    out = tmp_path / "nan"
    summary = _encode([folder], out, "none", shard_size=100, batch_size=4)
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    bad = [s for s in skipped if s["reason"] == "nonfinite_latent"]
    m, samples = _read_all(out)
    n_batches = math.ceil((15 - (len(skipped) - len(bad))) / 4)
    assert n_batches <= len(bad) <= 2 * n_batches
    for smp in samples:
        assert np.isfinite(npy_load(smp["mean.npy"])).all() and np.isfinite(npy_load(smp["std.npy"])).all()
    assert summary["num_samples"] == len(samples) == 15 - len(skipped)
    assert DatasetStats.load(out).n == len(samples)


_BOUNDED_READ = """
import os, resource, sys
from latentdiff.data.images import ImageSkip
from latentdiff.data.inputs import InputItem, read_item_bytes
vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))  # an unbounded read dies here, not the machine
for path in sys.argv[1:]:
    try:
        read_item_bytes(InputItem(path), 50_000)
        print(path, 'read')
    except ImageSkip as s:
        print(path, s.reason, s.detail)
"""


def test_devices_fifos_and_huge_files_are_skipped_unread(tmp_path):
    """A link to /dev/zero, a FIFO and a file over --max-file-bytes are skipped with the reason in
    skipped.jsonl (they used to grow a worker to tens of GB / hang for ever); an empty folder says so."""
    import subprocess
    import sys

    photo = load_photo("astronaut")
    cls = tmp_path / "in" / "c"
    cls.mkdir(parents=True)
    (cls / "good.png").write_bytes(_png_bytes(photo[:64, :64]))
    os.symlink("/dev/zero", cls / "z.png")
    os.mkfifo(cls / "f.jpg")
    big = _png_bytes(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    assert len(big) > 50_000
    (cls / "big.png").write_bytes(big)
    # the read itself, in a child with a memory cap and a time limit (what a bug would cost)
    paths = [str(cls / n) for n in ("z.png", "f.jpg", "big.png", "good.png")]
    p = subprocess.run([sys.executable, "-c", _BOUNDED_READ, *paths], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert p.returncode == 0, p.stderr[-2000:]
    got = dict(line.split(" ", 2)[:2] for line in p.stdout.splitlines())
    assert got == {paths[0]: "not_a_regular_file", paths[1]: "not_a_regular_file", paths[2]: "too_large",
                   paths[3]: "read"}, p.stdout
    assert "a character device (/dev/zero)" in p.stdout and "a FIFO" in p.stdout
    # the encoder: the good image is encoded, the others are recorded with their reason
    out = tmp_path / "out"
    summary = encode_dataset(EncodeConfig(inputs=[str(tmp_path / "in")], output=str(out), resolution=RES, vae="none",
                                          progress=False, workers=1, batch_size=4, max_file_bytes=50_000))
    skipped = {Path(s["path"]).name: s for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert {k: v["reason"] for k, v in skipped.items()} == {
        "z.png": "not_a_regular_file", "f.jpg": "not_a_regular_file", "big.png": "too_large"}
    assert "--max-file-bytes 50000" in skipped["big.png"]["detail"]
    assert summary["num_samples"] == 1
    # a folder without images: no empty skipped.jsonl to look at, the message says what was searched
    (tmp_path / "empty" / "c").mkdir(parents=True)
    (tmp_path / "empty" / "c" / "notes.txt").write_text("x")
    with pytest.raises(EncodeError, match="no image files found under .*empty"):
        encode_dataset(EncodeConfig(inputs=[str(tmp_path / "empty")], output=str(tmp_path / "o2"), resolution=RES,
                                    vae="none", progress=False, workers=0))
