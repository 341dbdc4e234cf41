"""FWD, SWD, KID and precision/recall measure what they claim, on real photo crops (skimage, offline).

The reference is 256 random 32x32 crops of the bundled photos, the samples 256 other crops of the
same photos (the two halves of one distribution) or those crops corrupted (``quality_cases``).
Which features see which corruption (asserted below, and stated in the README):

* FWD and SWD: every corruption here (blur, noise, JPEG-like quantization, hue shift, collapse);
* KID / precision-recall on ``wavelet`` features (packet log energies): blur, noise, JPEG, collapse
  - not a hue shift, which leaves every packet's energy nearly unchanged;
* KID on ``pixels``: hue shift and collapse - a cubic-kernel MMD on raw pixels barely sees blur,
  noise or JPEG (pixel means and low-order moments hardly change).
"""
from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import quality_cases as qc
from latentdiff.data.photos import random_crops
from latentdiff.metrics import evaluation as ev
from latentdiff.metrics import frechet, fwd, kid, precision_recall, swd, wavelets
from latentdiff.metrics.eval_stats import collect_statistics, load_statistics, save_statistics
from latentdiff.metrics.features import PixelFeatures, WaveletFeatures
from latentdiff.metrics.image_sources import ArrayImages
from latentdiff.utils.errors import FIDError

SMALL_SWD = swd.SWDSettings(patches_per_image=16, dir_repeats=2, dirs_per_repeat=64)
SETTINGS = ev.EvalSettings(kid_subset_size=100, kid_subsets=20, swd=SMALL_SWD)


@pytest.fixture(scope="module")
def crops():
    x, _ = random_crops(512, 32, seed=0)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def extractors():
    return ev.make_extractors(SETTINGS)


def _stats(images, extractors):
    return collect_statistics(ArrayImages(images), extractors, fwd_level=SETTINGS.fwd_level, swd=SETTINGS.swd,
                              progress=False)


@pytest.fixture(scope="module")
def reference(crops, extractors):
    return _stats(crops[256:], extractors)


def _metrics(images, reference, extractors) -> dict:
    return ev.compare(_stats(images, extractors), reference, SETTINGS)


# ------------------------------------------------------------------------------------------------
# the building blocks against their definitions


def test_haar_packets_equal_ptwt_and_keep_the_energy():
    import ptwt
    import pywt

    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mine = wavelets.haar_packets(x, 3)
    wp = ptwt.WaveletPacket2D(x, pywt.Wavelet("haar"), maxlevel=3)
    nodes = wp.get_natural_order(3)
    assert nodes == wavelets.packet_names(3) and mine.shape == (2, 64, 3, 2, 2)
    for i, node in enumerate(nodes):  # equal up to the sign convention of the detail filters
        torch.testing.assert_close(mine[:, i].abs(), wp[node].abs(), rtol=0, atol=1e-12)
    torch.testing.assert_close(mine.square().sum(), x.square().sum(), rtol=1e-13, atol=0)  # orthonormal


def test_fwd_frechet_form_equals_scipy_sqrtm_and_survives_singular_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((200, 6)), rng.standard_normal((150, 6)) @ rng.standard_normal((6, 6))
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fwd.frechet_distance_psd(*args) == pytest.approx(frechet.frechet_distance(*args), rel=1e-10)
    # rank-1 covariances (a packet with one direction of variation): tr (S1 S2)^(1/2) = |u . v|; the zero
    # eigenvalues carry round-off of order sqrt(machine eps) through the square root
    u, v = rng.standard_normal(4), rng.standard_normal(4)
    s1, s2 = np.outer(u, u), np.outer(v, v)
    exact = np.trace(s1) + np.trace(s2) - 2 * abs(u @ v)
    assert fwd.frechet_distance_psd(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(exact, rel=1e-6)


def test_wasserstein1_is_exact_for_equal_and_unequal_counts():
    rng = np.random.default_rng(1)
    a, b, c = rng.standard_normal(300), rng.standard_normal(300) + 0.3, 2 * rng.standard_normal(117)
    ta, tb, tc = (torch.from_numpy(v)[None] for v in (a, b, c))
    assert float(swd.wasserstein1(ta, tb)) == pytest.approx(np.mean(np.abs(np.sort(a) - np.sort(b))), rel=1e-12)
    assert float(swd.wasserstein1(ta, tc)) == pytest.approx(scipy.stats.wasserstein_distance(a, c), rel=1e-10)


def test_laplacian_pyramid_levels_and_exact_reconstruction(crops):
    assert swd.pyramid_resolutions((64, 64)) == [(64, 64), (32, 32), (16, 16)]
    x = crops[:4].double()
    levels = swd.laplacian_pyramid(x, 2)
    assert [tuple(v.shape[2:]) for v in levels] == [(32, 32), (16, 16)]
    torch.testing.assert_close(levels[0] + swd._up(levels[1]), x, rtol=0, atol=1e-10)
    with pytest.raises(FIDError, match="at least 16x16"):
        swd.pyramid_resolutions((8, 8))


def test_kid_and_precision_recall_agree_with_torch_fidelity(crops):
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    for ex in (PixelFeatures(), WaveletFeatures(4)):
        g, r = ex(qc.blur(crops[:200], 1.0)), ex(crops[256:476])
        mine = kid.kid(g, r, subsets=10, subset_size=150, seed=5)
        theirs = kid_features_to_metric(g, r, kid_subsets=10, kid_subset_size=150, rng_seed=5, verbose=False,
                                        kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                        kid_kernel_poly_coef0=1)
        assert mine["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], abs=1e-6, rel=1e-9)
        assert mine["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], abs=1e-6, rel=1e-9)
        pr = precision_recall.precision_recall(g, r, 3)
        theirs = prc_features_to_metric(g, r, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
        assert pr["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
        assert pr["recall"] == pytest.approx(theirs["recall"], abs=1e-6)
        assert 0 < pr["precision"] < 1 and 0 < pr["recall"] < 1  # not a trivial agreement


# ------------------------------------------------------------------------------------------------
# the metrics measure what they claim


def test_two_halves_of_one_distribution_score_near_zero(crops, reference, extractors):
    m = _metrics(crops[:256], reference, extractors)
    for name in ("pixels", "wavelet"):
        k = m[f"kid_{name}"]
        assert abs(k["kid"]) <= k["kid_std"], (name, k)  # the unbiased estimate within its standard error of 0
        assert m[f"pr_{name}"]["precision"] > 0.5 and m[f"pr_{name}"]["recall"] > 0.5
    worst = _metrics(qc.blur(crops[:256], 1.0), reference, extractors)  # the mildest blur of the ladder
    assert m["fwd"]["value"] < 0.5 * worst["fwd"]["value"] and m["swd"]["value"] < 0.7 * worst["swd"]["value"]


# corruption -> the KID feature sets that see it (module docstring)
KID_SEES = {"blur": ("wavelet",), "noise": ("wavelet",), "jpeg": ("wavelet",), "hue": ("pixels",),
            "collapse": ("pixels",)}


@pytest.mark.parametrize("corruption", sorted(qc.LADDERS))
def test_corruptions_make_the_metrics_worse_monotonically(corruption, crops, reference, extractors):
    fn, strengths = qc.LADDERS[corruption]
    runs = [_metrics(fn(crops[:256], s), reference, extractors) for s in strengths]
    for key in ("fwd", "swd"):
        values = [r[key]["value"] for r in runs]
        assert all(b > a for a, b in itertools.pairwise(values)), (corruption, key, values)
    for feats in KID_SEES[corruption]:
        values = [r[f"kid_{feats}"]["kid"] for r in runs]
        assert all(b > a for a, b in itertools.pairwise(values)), (corruption, feats, values)
        assert values[-1] > 3 * runs[-1][f"kid_{feats}"]["kid_std"]  # clearly above 0 at the strongest


def test_precision_drops_off_distribution_and_recall_drops_for_mode_collapse(crops, reference, extractors):
    clean = _metrics(crops[:256], reference, extractors)
    noisy = _metrics(qc.noise(crops[:256], 64.0), reference, extractors)
    collapsed = _metrics(qc.collapse(crops[:256], 1.0), reference, extractors)
    for name in ("pixels", "wavelet"):
        assert noisy[f"pr_{name}"]["precision"] < 0.1 and clean[f"pr_{name}"]["precision"] > 0.5
        assert collapsed[f"pr_{name}"]["recall"] < 0.05 and clean[f"pr_{name}"]["recall"] > 0.5


# ------------------------------------------------------------------------------------------------
# refusals, saved statistics


def test_too_few_samples_and_mismatched_resolutions_are_refused(crops, reference, extractors):
    s = ev.EvalSettings()  # defaults: KID subsets of 1000
    with pytest.raises(FIDError, match=r"KID needs >= 1000 .*--kid-subset-size"):
        ev.check_counts(256, (32, 32), s, "samples")
    with pytest.raises(FIDError, match=r"FWD needs >= 1536 \(2 x the 768 coefficients"):
        ev.check_counts(1000, (256, 256), s, "samples")
    with pytest.raises(FIDError, match=r"SWD needs >= 128"):
        ev.check_counts(100, (32, 32), ev.EvalSettings(metrics=("swd",)), "samples")
    with pytest.raises(FIDError, match=r"PR needs >= 4"):
        ev.check_counts(3, (32, 32), ev.EvalSettings(metrics=("pr",)), "samples")
    ev.check_counts(256, (32, 32), SETTINGS, "samples")  # enough for the test settings
    small = _stats(crops[:256, :, :16, :16], extractors)
    with pytest.raises(FIDError, match="samples are 16x16 but the reference is 32x32"):
        ev.compare(small, reference, SETTINGS)
    with pytest.raises(FIDError, match="divisible by 16"):
        ev.check_geometry((40, 40), s, "samples")


def test_saved_statistics_give_the_same_numbers(tmp_path, crops, reference, extractors):
    reference.provenance = {"source": "crops[256:]"}
    path = save_statistics(tmp_path / "ref.npz", reference)
    loaded = load_statistics(path)
    direct = _metrics(crops[:256], reference, extractors)
    again = ev.compare(_stats(crops[:256], extractors), loaded, SETTINGS)
    assert again == direct
    assert loaded.provenance["source"] == "crops[256:]" and loaded.provenance["statistics_file"] == str(path)
    with pytest.raises(FIDError, match="SWD descriptors made with"):
        ev._check_saved(loaded, ev.EvalSettings(kid_subset_size=100), extractors)


# ------------------------------------------------------------------------------------------------
# several ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from latentdiff.utils import dist as ldist

    assert ldist.init_distributed(timeout_minutes=2)
    try:
        x, _ = random_crops(300, 32, seed=3)
        u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        report = ev.evaluate(ArrayImages(qc.blur(u8[:150], 1.0)), ArrayImages(u8[150:]), _RANK_SETTINGS,
                             batch_size=16, progress=False)
        torch.save(report["metrics"], Path(out_dir) / f"rank{rank}.pt")
    finally:
        ldist.destroy()


_RANK_SETTINGS = ev.EvalSettings(kid_subset_size=100, kid_subsets=5, swd=SMALL_SWD)


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


@pytest.mark.slow
def test_results_do_not_depend_on_the_number_of_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    x, _ = random_crops(300, 32, seed=3)
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    one = ev.evaluate(ArrayImages(qc.blur(u8[:150], 1.0)), ArrayImages(u8[150:]), _RANK_SETTINGS, batch_size=7,
                      progress=False)["metrics"]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0 == r1  # every rank holds the same report
    _close(r0, one)
    for key in ("swd", "kid_pixels", "pr_pixels", "kid_wavelet", "pr_wavelet"):  # gathered in image order: exact
        assert r0[key] == one[key], key
