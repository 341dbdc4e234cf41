"""FID: Fréchet distance math, statistics across ranks, reference files, and the real torch-fidelity network.

The Inception network is torch-fidelity's real ``FeatureExtractorInceptionV3``, built with its weight
loader patched so that nothing is fetched, with every Conv2d re-initialized (PyTorch's default init
makes all pool features vanish), saved to this session's tmp dir and loaded back through the real
``--inception-weights`` path.  No test touches the network.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch

from latentdiff.utils import io as checksums, seeds
from latentdiff.contracts.sampling import SamplingRecord
from latentdiff.metrics import fid, frechet, image_sources, inception, reference
from latentdiff.cli import fid as fid_cli
from latentdiff.utils.errors import FIDError

ROOT = Path(__file__).resolve().parents[1]
N_REAL = 12  # images per set through the real network (~0.2-0.4 s each on 2 CPU cores)


def _load_tool():
    spec = importlib.util.spec_from_file_location("fid_reference_tool", ROOT / "tools" / "fid_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fid_reference = _load_tool()


# ------------------------------------------------------------------------------------------------
# helpers


def _no_network(*args, **kwargs):
    raise AssertionError(f"a network fetch was attempted: {args[:1]}")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _write_pngs(folder: Path, images_nchw: torch.Tensor, first_seed: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, img in enumerate(images_nchw):
        p = folder / f"{first_seed + k:06d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    return paths


def _write_sampling_json(folder: Path, **fields) -> SamplingRecord:
    """A sampling.json as latentdiff-sample writes it, with the given fields (the rest: neutral values)."""
    base = dict(source="export", source_kind="export", export_hash="0" * 8, seeds="0", solver="heun", nfe_used=1,
                sigma_min=0.002, sigma_max=80.0, cfg=1.0, ema_profile="ema-0.999", vae_decode_precision="fp32",
                vae_tiling=False, image_size=[8, 8])
    record = SamplingRecord(**{**base, **fields})
    record.write(folder / "sampling.json")
    return record


class StandIn:
    """Tiny deterministic feature function (for fast statistics tests): uint8 NCHW -> (B, dim) float32."""

    def __init__(self, in_dim: int, dim: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.feature_dim = dim
        self.w = torch.randn(in_dim, dim, generator=g, dtype=torch.float64) / in_dim**0.5

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3
        return torch.tanh((x.double().flatten(1) / 127.5 - 1) @ self.w).float()


class Recorder:
    """Wraps an extractor and keeps every feature batch it returns."""

    def __init__(self, inner):
        self.inner = inner
        self.feature_dim = getattr(inner, "feature_dim", inception.FEATURE_DIM)
        self.batches: list[torch.Tensor] = []

    def __call__(self, x):
        f = self.inner(x)
        self.batches.append(f.detach().cpu().double())
        return f

    def features(self) -> np.ndarray:
        return torch.cat(self.batches).numpy()


def _random_spd(d: int, rng: np.random.Generator, cond: float = 50.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eig = np.exp(rng.uniform(0, np.log(cond), d))
    return (q * eig) @ q.T


def _fd_eigh(mu1, s1, mu2, s2) -> float:
    """Independent formula: tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), with symmetric eigendecompositions."""
    w, v = scipy.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    lam = scipy.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_closed_form_diagonal():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-14)


def test_frechet_matches_independent_scipy_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.5
    s1, s2 = _random_spd(d, rng), _random_spd(d, rng, cond=1e3)
    got, info = frechet.frechet_distance(mu1, s1, mu2, s2, return_info=True)
    assert got == pytest.approx(_fd_eigh(mu1, s1, mu2, s2), rel=1e-10)
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert got == pytest.approx(tf["frechet_inception_distance"], rel=1e-9)
    assert info["eps"] == 0.0 and info["residual"] < 1e-10
    # symmetric in its arguments, zero for identical Gaussians
    assert frechet.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-10)
    assert abs(frechet.frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)


def test_frechet_rank_deficient_covariances():
    # covariances from fewer samples than dimensions are singular (the small-n FID situation)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((10, 64)), rng.standard_normal((12, 64)) + 0.3
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    got = frechet.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(_fd_eigh(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_eps_fallback_and_invalid_covariance(monkeypatch):
    rng = np.random.default_rng(3)
    d = 8
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(d, rng), _random_spd(d, rng)
    exact = frechet.frechet_distance(mu1, s1, mu2, s2)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def flaky(a, *args, **kwargs):  # the first root comes back non-finite -> eps * I retry
        calls.append(a)
        r = real_sqrtm(a)
        return np.full_like(r, np.nan) if len(calls) == 1 else r

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky)
    with pytest.warns(RuntimeWarning, match="non-finite.*1e-06"):
        got, info = frechet.frechet_distance(mu1, s1, mu2, s2, return_info=True)
    assert len(calls) == 2 and info["eps"] == 1e-6 and "non-finite" in info["first_attempt"]
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(d)) @ (s2 + 1e-6 * np.eye(d)), rtol=1e-14)
    assert got == pytest.approx(exact, rel=1e-5)
    monkeypatch.setattr(scipy.linalg, "sqrtm", real_sqrtm)

    # a "covariance" with a clearly negative eigenvalue has no real root: imaginary part -> refused
    bad = np.diag([1.0] * (d - 1) + [-0.5])
    with pytest.warns(RuntimeWarning, match="imaginary"):
        with pytest.raises(FIDError, match="imaginary"):
            frechet.frechet_distance(mu1, bad, mu2, np.eye(d))


def test_frechet_rejects_bad_inputs():
    with pytest.raises(FIDError, match="covariances"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(FIDError, match="mean vectors"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
    with pytest.raises(FIDError, match="non-finite"):
        frechet.frechet_distance(np.array([0.0, np.nan]), np.eye(2), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------------------------------
# statistics (single rank), seeds, sample inputs


def test_statistics_match_numpy_for_every_input_kind():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (23, 3, 4, 4), generator=g, dtype=torch.uint8)
    ext = Recorder(StandIn(48))
    mu, sigma, n = frechet.compute_statistics(imgs, ext, batch_size=5, allow_small=True, progress=False)
    feats = ext.features()
    assert n == 23 and feats.shape == (23, 24) and mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-11, atol=1e-14)
    # NHWC numpy (ADM layout), an iterable of batches, batch size 1: same statistics
    nhwc = imgs.permute(0, 2, 3, 1).numpy()
    for inp, bs in ((nhwc, 7), ([imgs[:10], imgs[10:]], 4), (imgs, 1)):
        mu2, sigma2, n2 = frechet.compute_statistics(inp, StandIn(48), batch_size=bs, allow_small=True, progress=False)
        assert n2 == 23
        np.testing.assert_allclose(mu2, mu, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(sigma2, sigma, rtol=1e-11, atol=1e-14)
    with pytest.raises(FIDError, match="uint8"):
        frechet.compute_statistics(imgs.float(), StandIn(48), allow_small=True, progress=False)


def test_refuses_fewer_than_2048_samples(tmp_path, monkeypatch, capsys):
    imgs = torch.zeros((100, 3, 4, 4), dtype=torch.uint8)
    calls = []

    def never(x):
        calls.append(1)
        raise AssertionError("features must not be computed for a refused input")

    with pytest.raises(FIDError, match=r"only 100 images.*2048.*--allow-small"):
        frechet.compute_statistics(imgs, never, progress=False)
    assert not calls
    with pytest.raises(FIDError, match="at least 2"):
        frechet.compute_statistics(imgs[:1], never, allow_small=True, progress=False)
    # the CLI refuses before it even looks for Inception weights (none exist here)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    _write_pngs(tmp_path / "samples", torch.zeros((5, 3, 8, 8), dtype=torch.uint8))
    reference.save_reference(tmp_path / "ref.npz", np.zeros(4), np.eye(4), {"resolution": [8, 8]})
    rc = fid_cli.main(["--ref", str(tmp_path / "ref.npz"), str(tmp_path / "samples")])
    err = capsys.readouterr().err
    assert rc == 2 and "only 5 images" in err and "--allow-small" in err and "weights" not in err


def test_fid_config_from_yaml_and_flags_with_help(tmp_path):
    from latentdiff.metrics.config import FIDConfig
    from latentdiff.utils.config import config_from_args

    y = tmp_path / "fid.yaml"
    y.write_text("ref: r.npz\nseeds: [0-9, 10-19]\nbatch_size: 16\n")
    parser = fid_cli.build_parser()
    args = parser.parse_args(["a", "b", "--config", str(y), "--allow-small", "--batch-size", "8"])
    cfg = config_from_args(FIDConfig, args, {"samples": args.samples})
    assert (cfg.samples, cfg.ref, cfg.seeds, cfg.batch_size, cfg.allow_small) == (["a", "b"], "r.npz", ["0-9", "10-19"], 8, True)
    cfg = config_from_args(FIDConfig, parser.parse_args(["a", "--ref", "r.npz", "--seeds", "0-4", "--seeds", "5-9"]),
                           {"samples": ["a"]})
    assert cfg.seed_specs == ["0-4", "5-9"] and FIDConfig(samples=["a"], ref="r").seed_specs == [None]
    text = parser.format_help()
    assert "--inception-weights" in text and "torch-fidelity Inception state dict" in text and "--allow-small" in text
    with pytest.raises(FIDError, match="batch-size"):
        FIDConfig(samples=["a"], ref="r", batch_size=0).validate()


def test_parse_and_format_seeds():
    assert fid.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert fid.parse_seeds("0-2, 7,9-10") == [0, 1, 2, 7, 9, 10]
    assert fid.parse_seeds([3, 1, 3]) == [1, 3]
    assert len(fid.parse_seeds("0-49999")) == 50000
    assert seeds.format_seeds(range(50000)) == "0-49999"
    assert seeds.format_seeds([5, 0, 1, 2, 9, 10]) == "0-2,5,9-10"
    assert seeds.format_seeds([7, 3, 4, 5, 0], ordered=True) == "7,3-5,0"  # the sampler's record: request order
    assert seeds.parse_seeds(seeds.format_seeds([7, 3, 4, 5, 0], ordered=True)) == [7, 3, 4, 5, 0]
    for bad in ("5-3", "a-b", "1-2-3", ""):
        with pytest.raises(FIDError):
            fid.parse_seeds(bad)


def test_npz_reader_memory_maps_adm_files(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arr_0=arr, arr_1=np.arange(6))
    np.savez_compressed(tmp_path / "packed.npz", arr_0=arr)
    plain = image_sources.read_npz_array(tmp_path / "plain.npz")
    assert isinstance(plain, np.memmap)
    np.testing.assert_array_equal(plain, arr)
    np.testing.assert_array_equal(image_sources.read_npz_array(tmp_path / "packed.npz"), arr)
    np.testing.assert_array_equal(image_sources.read_npz_array(tmp_path / "plain.npz", "arr_1"), np.arange(6))
    with pytest.raises(FIDError, match="no array 'images'.*arr_0"):
        image_sources.read_npz_array(tmp_path / "plain.npz", "images")
    src = image_sources.NpzImages(tmp_path / "plain.npz")
    assert len(src) == 6 and src.resolution == (5, 4)
    assert torch.equal(src.batch([4, 1]), torch.from_numpy(arr[[4, 1]]).permute(0, 3, 1, 2))
    np.save(tmp_path / "float.npy", arr.astype(np.float32))
    np.savez(tmp_path / "float.npz", arr_0=arr.astype(np.float32))
    with pytest.raises(FIDError, match="uint8"):
        image_sources.NpzImages(tmp_path / "float.npz")


def test_open_samples_png_npz_seeds_and_sampling_json(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (12, 3, 8, 8), generator=g, dtype=torch.uint8)
    d = tmp_path / "s"
    _write_pngs(d / "000000", imgs[:6], 0)  # EDM-style sub-folders
    _write_pngs(d / "000006", imgs[6:], 6)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(d / "grid.png")  # the sampler's grid: skipped
    _write_sampling_json(d, seeds=seeds.format_seeds(range(12)), solver="heun")
    src, sampling, spath = image_sources.open_samples(d)
    assert isinstance(src, image_sources.PngFolder) and len(src) == 12 and src.resolution == (8, 8)
    assert sampling.solver == "heun" and spath == d / "sampling.json"
    np.testing.assert_array_equal(src.seeds, np.arange(12))
    assert torch.equal(src.batch(list(range(12))), imgs)
    sub = image_sources.select_seeds(src, fid.parse_seeds("3-5,9"), "s")
    assert torch.equal(sub.batch([0, 1, 2, 3]), imgs[[3, 4, 5, 9]])
    with pytest.raises(FIDError, match=r"lacks 2 of the 4 requested seeds.*12-13"):
        image_sources.select_seeds(src, fid.parse_seeds("10-13"), "s")
    # samples.npz (ADM) takes precedence in a directory; seeds come from sampling.json
    np.savez(d / "samples.npz", arr_0=imgs.permute(0, 2, 3, 1).numpy())
    src2, _, _ = image_sources.open_samples(d)
    assert isinstance(src2, image_sources.NpzImages) and torch.equal(src2.batch(list(range(12))), imgs)
    np.testing.assert_array_equal(src2.seeds, np.arange(12))
    assert isinstance(image_sources.open_samples(d, "png")[0], image_sources.PngFolder)
    # a stray image of another size is named, JPEG-only folders are refused as lossy
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(d / "000006" / "000099.png")
    src3, _, _ = image_sources.open_samples(d, "png")
    with pytest.raises(FIDError, match="000099.png is 9x9"):
        src3.batch(list(range(len(src3))))
    # a sampling.json that latentdiff-sample did not write is named, not half-read
    (d / "sampling.json").write_text(json.dumps({"seeds": list(range(12)), "solver": "heun"}))
    with pytest.raises(FIDError, match="sampling.json.*not written by latentdiff-sample"):
        image_sources.open_samples(d)
    j = tmp_path / "jpg"
    j.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(j / "0.jpg")
    with pytest.raises(FIDError, match="lossy"):
        image_sources.open_samples(j)


# ------------------------------------------------------------------------------------------------
# reference files


def test_reference_roundtrip_and_compatibility(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 16))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    prov = {"source": "/data/x", "count": 50, "resolution": [64, 64], "preprocessing": {"mode": "adm"}}
    npz, pjson = reference.save_reference(tmp_path / "ref.npz", mu, sigma, prov)
    assert pjson == tmp_path / "ref.provenance.json" and pjson.is_file()
    ref = reference.load_reference(npz)
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert ref.mu.dtype == np.float64 and ref.sigma.dtype == np.float64
    assert ref.sha256 == checksums.sha256_file(npz)
    for k, v in prov.items():
        assert ref.provenance[k] == v
    assert ref.provenance["stats_sha256"] == ref.sha256 and ref.provenance["feature_dim"] == 16
    # readable the way EDM/ADM read reference files (plain np.load, no pickle)
    with np.load(npz, allow_pickle=False) as f:
        assert set(f.keys()) == {"mu", "sigma"}
        np.testing.assert_array_equal(f["mu"], mu)
    # EDM-style (mu/sigma only, no provenance) and ADM-style (extra arrays) files load
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)
    assert reference.load_reference(tmp_path / "edm.npz").provenance is None
    np.savez(tmp_path / "VIRTUAL_adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu[:4], sigma_s=sigma[:4, :4])
    np.testing.assert_array_equal(reference.load_reference(tmp_path / "VIRTUAL_adm.npz").sigma, sigma)
    # errors name the file and the fix
    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(FIDError, match="lacks 'mu'.*fid_reference.py"):
        reference.load_reference(tmp_path / "images_only.npz")
    with pytest.raises(FIDError, match="not found"):
        reference.load_reference(tmp_path / "nope.npz")
    with pytest.raises(FIDError, match="symmetric"):
        reference.save_reference(tmp_path / "bad.npz", mu, sigma + np.triu(np.ones_like(sigma), 1))
    # a replaced .npz no longer matches its provenance
    np.savez(tmp_path / "ref.npz", mu=mu + 1, sigma=sigma)
    with pytest.raises(FIDError, match="replaced"):
        reference.load_reference(tmp_path / "ref.npz")


def test_evaluate_seed_ranges_min_mean_and_report(tmp_path):
    g = torch.Generator().manual_seed(5)
    samples = torch.randint(0, 256, (30, 3, 8, 8), generator=g, dtype=torch.uint8)
    reals = torch.randint(40, 216, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    # 6 features < 10 samples per run: full-rank covariances, so the Frechet distance is well conditioned and
    # the independent np.cov reference below agrees to ~1e-15 on every BLAS kernel (measured with
    # OPENBLAS_CORETYPE=Haswell/Sandybridge/Prescott and ATEN_CPU_CAPABILITY=avx512/avx2/default).  With 16
    # features the 10-sample covariances are singular; sqrtm then amplifies 1-ulp differences of the two
    # covariance computations to ~1e-9 relative (6e-9 measured), below what rel=1e-9 can promise.
    ext = StandIn(192, dim=6, seed=1)
    mu_r, sigma_r, n_r = frechet.compute_statistics(reals, ext, batch_size=16, allow_small=True, progress=False)
    reference.save_reference(tmp_path / "ref.npz", mu_r, sigma_r, {"resolution": [8, 8], "count": n_r})
    d = tmp_path / "samples"
    _write_pngs(d, samples)
    _write_sampling_json(d, seeds="0-29", solver="nfe-guided", nfe_used=35, nfe_requested=35, cfg=1.5,
                         guidance_interval=[0.3, 2.9], ema_profile="std=0.10", vae_decode_precision="fp32",
                         export_hash="deadbeef")
    report = fid.evaluate([d], tmp_path / "ref.npz", ext, seeds=["0-9", "10-19", "20-29"], allow_small=True, progress=False)
    assert report["num_runs"] == 3 and [r["seeds"] for r in report["runs"]] == ["0-9", "10-19", "20-29"]
    values = []
    for k, r in enumerate(report["runs"]):
        f = ext(samples[10 * k : 10 * k + 10]).double().numpy()
        expect = frechet.frechet_distance(f.mean(0), np.cov(f, rowvar=False), mu_r, sigma_r)
        assert r["fid"] == pytest.approx(expect, rel=1e-9)
        assert r["num_samples"] == 10 and r["resolution"] == [8, 8] and r["source"] == "png"
        assert (r["solver"], r["nfe"], r["cfg"], r["guidance_interval"]) == ("nfe-guided", 35, 1.5, [0.3, 2.9])
        assert (r["ema"], r["vae_decode_precision"], r["export_hash"]) == ("std=0.10", "fp32", "deadbeef")
        assert r["missing_sampling_fields"] == [] and r["sampling"]["seeds"] == "0-29"
        values.append(r["fid"])
    assert report["fid_min"] == min(values) and report["fid"] == min(values)
    assert report["fid_mean"] == pytest.approx(np.mean(values), rel=1e-12)
    assert report["reference"]["sha256"] == checksums.sha256_file(tmp_path / "ref.npz")
    json.dumps(report)  # serializable as fid.json
    with pytest.raises(FIDError, match=r"lacks 15 of the 20 requested seeds \(first missing: 30-44\)"):
        fid.evaluate([d], tmp_path / "ref.npz", ext, seeds=["0-9", "25-44"], allow_small=True, progress=False)
    reference.save_reference(tmp_path / "ref16.npz", mu_r, sigma_r, {"resolution": [16, 16]})
    with pytest.raises(FIDError, match=r"built at 16x16.*--resolution 8"):
        fid.evaluate([d], tmp_path / "ref16.npz", ext, allow_small=True, progress=False)


# ------------------------------------------------------------------------------------------------
# Inception weights: never downloaded


def test_missing_weights_is_a_clear_error_offline(tmp_path, monkeypatch, capsys):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    monkeypatch.setattr(fe, "load_state_dict_from_url", _no_network)
    expected_path = tmp_path / "torch_home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert inception.default_weights_path() == expected_path
    with pytest.raises(FIDError) as ei:
        inception.load_feature_extractor()
    msg = str(ei.value)
    assert "--inception-weights" in msg and fe.URL_INCEPTION_V3 in msg and str(expected_path) in msg
    with pytest.raises(FIDError, match=r"nope\.pth does not exist.*--inception-weights"):
        inception.load_feature_extractor(tmp_path / "nope.pth")
    # the env variable is honoured and checked
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(FIDError, match=inception.WEIGHTS_ENV):
        inception.load_feature_extractor()
    monkeypatch.delenv(inception.WEIGHTS_ENV)
    # CLI: exit code 2 and the same advice
    _write_pngs(tmp_path / "s", torch.zeros((3, 3, 8, 8), dtype=torch.uint8))
    reference.save_reference(tmp_path / "ref.npz", np.zeros(4), np.eye(4))
    rc = fid_cli.main(["--ref", str(tmp_path / "ref.npz"), str(tmp_path / "s"), "--allow-small"])
    err = capsys.readouterr().err
    assert rc == 2 and "--inception-weights" in err and fe.URL_INCEPTION_V3 in err


def test_unusable_weight_files_are_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FIDError, match="weights_only=True"):
        inception.load_feature_extractor(tmp_path / "junk.pth", device="cpu")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(FIDError, match="do not fit torch-fidelity"):
        inception.load_feature_extractor(tmp_path / "other.pth", device="cpu")


# ------------------------------------------------------------------------------------------------
# the real torch-fidelity network (weights built without a download)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    placeholder = {"__no_download__": torch.zeros(1)}
    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: placeholder),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None),
        mock.patch.object(urllib.request, "urlopen", _no_network),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    n_conv = 0
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):  # default init makes every pool feature vanish
            torch.nn.init.kaiming_normal_(m.weight, generator=g)
            n_conv += 1
    assert n_conv == 94
    path = tmp_path_factory.mktemp("inception") / "inception-test-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def extractor(inception_weights):
    with pytest.warns(RuntimeWarning, match="not torch-fidelity's published file"):
        ext = inception.load_feature_extractor(inception_weights)  # device from latentdiff.utils.dist.device()
    return ext


@pytest.fixture(scope="session")
def real_sets():
    from latentdiff.data.photos import random_crops

    ref = _to_uint8(random_crops(N_REAL, 64, seed=1)[0])
    crops = _to_uint8(random_crops(N_REAL, 64, seed=2)[0])
    noise = torch.randint(0, 256, (N_REAL, 3, 64, 64), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    return {"ref": ref, "crops": crops, "noise": noise}


@pytest.fixture(scope="session")
def real_reference(tmp_path_factory, inception_weights, real_sets):
    """Reference statistics of real crops built by tools/fid_reference.py through --inception-weights."""
    base = tmp_path_factory.mktemp("realref")
    _write_pngs(base / "images", real_sets["ref"])
    out = base / "ref.npz"
    with mock.patch.object(urllib.request, "urlopen", _no_network):
        rc = fid_reference.main(
            [str(base / "images"), "--resolution", "64", "--out", str(out), "--inception-weights", str(inception_weights),
             "--allow-small", "--batch-size", "8", "--no-progress"]
        )
    assert rc == 0
    return base


def test_real_network_reference_tool_and_extractor(extractor, inception_weights, real_reference, real_sets):
    assert extractor.weights_path == inception_weights and not extractor.official
    assert extractor.weights_sha256 == checksums.sha256_file(inception_weights)
    ref = reference.load_reference(real_reference / "ref.npz")
    prov = ref.provenance
    assert prov["count"] == N_REAL and prov["resolution"] == [64, 64] and prov["skipped"] == 0
    assert prov["preprocessing"]["mode"] == "adm" and prov["world_size"] == 1
    assert prov["feature_extractor"]["weights_sha256"] == extractor.weights_sha256
    assert prov["source"] == [str((real_reference / "images").resolve())]
    # re-initialized convolutions give non-degenerate pool features (default init: all ~0, FID 0 for anything)
    assert np.all(ref.mu >= 0) and ref.mu.mean() > 1e-3
    assert np.trace(ref.sigma) > 1e-2 and np.allclose(ref.sigma, ref.sigma.T, rtol=0, atol=0)
    # the extractor takes uint8 NCHW of any size, resizes to 299 itself, returns (B, 2048) float32
    with torch.no_grad():
        f = extractor(real_sets["ref"][:2])
    assert f.shape == (2, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    with pytest.raises(FIDError, match="uint8"):
        extractor(real_sets["ref"][:2].float())


def test_real_network_fid_cli_crops_vs_noise(tmp_path, inception_weights, real_reference, real_sets, capsys):
    crops_dir, noise_dir = tmp_path / "crops", tmp_path / "noise"
    _write_pngs(crops_dir, real_sets["crops"])
    _write_sampling_json(crops_dir, seeds=f"0-{N_REAL - 1}", solver="nfe-guided", nfe_used=35, cfg=1.0,
                         guidance_interval=None, ema_profile="0.10", vae_decode_precision="fp32", export_hash="abc123")
    noise_dir.mkdir()
    np.savez(noise_dir / "samples.npz", arr_0=real_sets["noise"].permute(0, 2, 3, 1).numpy())
    out = tmp_path / "fid.json"
    with mock.patch.object(urllib.request, "urlopen", _no_network), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rc = fid_cli.main(["--ref", str(real_reference / "ref.npz"), str(crops_dir), str(noise_dir), "--inception-weights",
                       str(inception_weights), "--allow-small", "--batch-size", "8", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    report = json.loads(out.read_text())
    crops_run, noise_run = report["runs"]
    print(f"FID crops vs crops {crops_run['fid']:.4f}, crops vs noise {noise_run['fid']:.4f}")
    assert crops_run["source"] == "png" and noise_run["source"] == "npz"
    assert crops_run["num_samples"] == N_REAL and noise_run["num_samples"] == N_REAL
    assert 0 <= crops_run["fid"] < 2.0
    assert noise_run["fid"] > 20.0 and noise_run["fid"] > 50 * crops_run["fid"]
    assert report["fid_min"] == crops_run["fid"]
    assert report["fid_mean"] == pytest.approx((crops_run["fid"] + noise_run["fid"]) / 2)
    assert report["reference"]["sha256"] == checksums.sha256_file(real_reference / "ref.npz")
    assert report["reference"]["provenance"]["count"] == N_REAL
    assert report["feature_extractor"]["weights_sha256"] == checksums.sha256_file(inception_weights)
    assert report["metric"].startswith("frechet-distance (non-official")
    assert crops_run["seeds"] == f"0-{N_REAL - 1}" and noise_run["seeds"] is None
    assert (crops_run["solver"], crops_run["nfe"], crops_run["export_hash"]) == ("nfe-guided", 35, "abc123")
    assert crops_run["vae_decode_precision"] == "fp32" and crops_run["ema"] == "0.10"
    assert crops_run["sqrtm"]["residual"] < 1e-5
    assert "FID min" in printed.out


# ------------------------------------------------------------------------------------------------
# several ranks


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from latentdiff.utils import dist as ldist

    assert ldist.init_distributed(timeout_minutes=2)
    try:
        imgs = _multirank_images()
        mu, sigma, n = frechet.compute_statistics(imgs, StandIn(48), batch_size=5, allow_small=True, progress=False)
        batches = [imgs[i : i + 4] for i in range(0, len(imgs), 4)]
        mu_b, sigma_b, n_b = frechet.compute_statistics(batches, StandIn(48), shard=True, allow_small=True, progress=False)

        def fails_on_rank1(x):
            if rank == 1:
                raise ValueError("decoder exploded")
            return StandIn(48)(x)

        fails_on_rank1.feature_dim = 24
        try:
            frechet.compute_statistics(imgs, fails_on_rank1, batch_size=5, allow_small=True, progress=False)
            err = ""
        except FIDError as e:
            err = str(e)
        np.savez(Path(out_dir) / f"rank{rank}.npz", mu=mu, sigma=sigma, n=n, mu_b=mu_b, sigma_b=sigma_b, n_b=n_b, err=np.array(err))
    finally:
        ldist.destroy()


def _multirank_images() -> torch.Tensor:
    return torch.randint(0, 256, (37, 3, 4, 4), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)


@pytest.mark.slow
def test_two_ranks_accumulate_like_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    imgs = _multirank_images()
    mu1, sigma1, n1 = frechet.compute_statistics(imgs, StandIn(48), batch_size=8, allow_small=True, progress=False)
    feats = StandIn(48)(imgs).double().numpy()
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    for r in (r0, r1):
        assert int(r["n"]) == n1 == 37 and int(r["n_b"]) == 37
        np.testing.assert_allclose(r["mu"], mu1, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(r["sigma"], sigma1, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(r["sigma"], np.cov(feats, rowvar=False), rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(r["mu_b"], mu1, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(r["sigma_b"], sigma1, rtol=1e-11, atol=1e-14)
    np.testing.assert_array_equal(r0["sigma"], r1["sigma"])  # all ranks hold the same result
    # a failure on one rank reaches every rank (no rank left hanging in the all-reduce)
    assert "decoder exploded" in str(r1["err"]) and "rank 1" in str(r1["err"])
    assert "other rank" in str(r0["err"])


@pytest.mark.slow
def test_reference_tool_under_torchrun_two_ranks(tmp_path, inception_weights, real_reference):
    out = tmp_path / "ref2.npz"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "empty_torch_home"), OMP_NUM_THREADS="1")
    env.pop(inception.WEIGHTS_ENV, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tools" / "fid_reference.py"), str(real_reference / "images"), "--resolution", "64",
        "--out", str(out), "--inception-weights", str(inception_weights), "--allow-small", "--batch-size", "4",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = reference.load_reference(real_reference / "ref.npz")
    two = reference.load_reference(out)
    assert two.provenance["world_size"] == 2 and two.provenance["count"] == N_REAL
    np.testing.assert_allclose(two.mu, one.mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(two.sigma, one.sigma, rtol=1e-4, atol=1e-7)


def test_reference_tool_applies_the_adm_crop(tmp_path):
    from PIL import Image

    from latentdiff.data.images import adm_center_crop

    rng = np.random.default_rng(8)
    big = rng.integers(0, 256, (150, 260, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "a.png")
    np.savez(tmp_path / "b.npz", arr_0=big[None])
    entries, problems = fid_reference._list_entries([str(tmp_path / "a.png"), str(tmp_path / "b.npz")])
    assert len(entries) == 2 and not problems
    images = fid_reference.ReferenceImages(entries, 64, "adm", 0, "test")
    x = images.batch([0, 1])
    expect = torch.from_numpy(adm_center_crop(Image.fromarray(big), 64)).permute(2, 0, 1)
    assert x.shape == (2, 3, 64, 64) and torch.equal(x[0], expect) and torch.equal(x[1], expect)
    # a folder with images and top-level tar shards (webdataset style), in command-line order
    import tarfile

    shards = tmp_path / "shards"
    (shards / "sub").mkdir(parents=True)
    Image.fromarray(big[:64, :64]).save(shards / "sub" / "x.png")
    with tarfile.open(shards / "shard-000000.tar", "w") as tf:
        tf.add(tmp_path / "a.png", arcname="000.png")
        tf.add(tmp_path / "a.png", arcname="001.png")
    more, _ = fid_reference._list_entries([str(shards), str(tmp_path / "b.npz")])
    assert [e[0] for e in more] == ["item", "item", "item", "npz"]
    y = fid_reference.ReferenceImages(more, 64, "adm", 0, "test").batch([0, 1, 2, 3])
    assert torch.equal(y[0], torch.from_numpy(big[:64, :64]).permute(2, 0, 1)) and torch.equal(y[1], expect)
    assert torch.equal(y[2], expect) and torch.equal(y[3], expect)
    # undecodable files are skipped and counted (like the encoder), not silently replaced
    (shards / "sub" / "y.png").write_bytes(b"not a png")
    listed, _ = fid_reference._list_entries([str(shards)])
    src = fid_reference.ReferenceImages(listed, 64, "adm", 0, "test")
    z = src.batch(list(range(len(listed))))
    assert len(listed) == 4 and z.shape[0] == 3 and src.num_skipped == 1
    assert src.skipped[0]["reason"] == "not_an_image" and src.skipped[0]["input"].endswith("y.png")
    with pytest.raises(FIDError, match="given twice"):
        fid_reference._list_entries([str(shards), str(shards)])
    strict = fid_reference.ReferenceImages(entries, 64, "none", 0, "test")
    with pytest.raises(FIDError, match="not 64x64"):
        strict.batch([0])
