"""The held-out validation loss: fixed (image, sigma, noise) triples, the EDM-weighted loss overall and per
log-sigma bin, reported by the trainer."""
from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from latentdiff.contracts.manifest import load_manifest
from latentdiff.diffusion.precond import EDMPrecond
from latentdiff.models import build
from latentdiff.training import validation
from latentdiff.training.tb import sigma_bin
from latentdiff.utils.errors import TrainError
from latentdiff.vae.normalization import Normalization


def test_evaluation_sigmas_are_the_fixed_lognormal_quantiles():
    s = validation.evaluation_sigmas(7)
    want = [math.exp(-1.2 + 1.2 * scipy.stats.norm.ppf((i + 0.5) / 7)) for i in range(7)]
    assert s.tolist() == pytest.approx(want, rel=1e-12)


def test_triples_are_fixed_whatever_the_run_and_the_loss_matches_the_definition(tiny_dataset):
    norm = Normalization.identity(4)
    a = validation.fixed_triples(tiny_dataset, 20, norm, "cpu", None)
    torch.manual_seed(123)  # the global RNG and the run's seed play no part
    b = validation.fixed_triples(tiny_dataset, 20, norm, "cpu", None)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)
    y, _, sigma, noise = a
    assert sorted(sigma.double().tolist()) == pytest.approx(validation.evaluation_sigmas(20).tolist(), rel=1e-6)
    m = load_manifest(tiny_dataset)
    c, h, _ = m.sample_shape
    net = EDMPrecond(build("uvit-tiny", in_channels=c, resolution=h), 0.5).eval()
    r = validation.validation_loss(net, a, chunk=6)
    with torch.no_grad():  # lambda(sigma) * mean (D - y)^2 by hand, one sample at a time
        per = []
        for i in range(20):
            s = sigma[i : i + 1].reshape(1, 1, 1, 1)
            d = net(y[i : i + 1] + s * noise[i : i + 1], sigma[i : i + 1], None)
            lam = (s**2 + 0.25) / (s * 0.5) ** 2
            per.append(float((lam * (d - y[i : i + 1]) ** 2).mean()))
    assert r["n"] == 20 and r["loss"] == pytest.approx(sum(per) / 20, rel=1e-5)
    bins = sigma_bin(sigma)
    for k, v in enumerate(r["bins"]):
        mine = [p for p, bb in zip(per, bins.tolist()) if bb == k]
        assert (v is None) == (not mine) and (v is None or v == pytest.approx(sum(mine) / len(mine), rel=1e-5))


def test_resolve_validation_dataset(tiny_dataset, tmp_path):
    assert validation.resolve_validation_dataset("none", tiny_dataset) is None
    assert validation.resolve_validation_dataset("auto", tiny_dataset) is None  # no split: off
    assert validation.resolve_validation_dataset(str(tiny_dataset), tmp_path) == tiny_dataset
    with pytest.raises(TrainError, match="holds no dataset.json"):
        validation.resolve_validation_dataset(str(tmp_path), tiny_dataset)


@pytest.mark.slow
def test_trainer_reports_the_validation_loss_overall_and_per_sigma_bin(tiny_dataset, tmp_path):
    from test_train import _tb_scalars, torchrun, train_args

    run = tmp_path / "run"
    args = train_args(tiny_dataset, run, "--max-steps", 2, "--checkpoint-every", 2, "--ema-rates", "[0.5]",
                      "--val-dataset", tiny_dataset, "--val-samples", 24, "--val-every", 1)
    p = torchrun(args, nproc=1)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "validation: 24 fixed triples" in log and "step 2 validation loss raw" in log
    tb = _tb_scalars(run)
    for name in ("raw", "ema_0.5"):
        assert [s for s, _ in tb[f"val/{name}"]] == [1, 2]
        bins = [t for t in tb if t.startswith(f"val_per_sigma/{name}_bin")]
        assert len(bins) >= 4  # 24 sigmas over the log-normal fill most of the 8 bins
        assert all(math.isfinite(v) and v > 0 for _, v in tb[f"val/{name}"])


@pytest.mark.slow
def test_trainer_evaluates_sample_quality_and_writes_eval_jsonl(tiny_dataset, tmp_path):
    import json

    from test_train import _tb_scalars, torchrun, train_args

    run = tmp_path / "run"
    args = train_args(tiny_dataset, run, "--max-steps", 2, "--checkpoint-every", 2, "--ema-rates", "[0.5]",
                      "--val-dataset", tiny_dataset, "--val-samples", 16, "--val-every", 2, "--eval-every", 2,
                      "--eval-samples", 64, "--sample-nfe", 4)
    p = torchrun(args, nproc=1)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "too few for swd (needs 128); left out" in log and "s generating" in log
    (line,) = (run / "eval.jsonl").read_text().splitlines()
    rec = json.loads(line)
    assert rec["step"] == 2 and rec["samples"] == 64 and rec["nfe"] == 4
    assert set(rec["metrics"]) == {"fwd", "kid_pixels", "pr_pixels", "kid_wavelet", "pr_wavelet"}
    assert rec["metrics"]["kid_pixels"]["subset_size"] == 32 and rec["reference"]["type"] == "encoded dataset"
    assert rec["validation"]["raw"]["n"] == 16 and set(rec["seconds"]) == {"generate", "decode", "metrics"}
    tb = _tb_scalars(run)
    assert tb["eval/fwd"][0][0] == 2 and tb["eval/fwd"][0][1] == pytest.approx(rec["metrics"]["fwd"]["value"], rel=1e-6)
    assert "eval/pr_wavelet_recall" in tb and "eval/seconds" in tb
