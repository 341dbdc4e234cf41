"""The trainer's noise config (``noise`` = shift rule x ``noise_base``) resolves to the documented
distributions, is recorded in the schedule and survives the checkpoint/export round trip."""
import math

import pytest

from latentdiff.contracts.schedule import TrainingSchedule
from latentdiff.data.stats import DatasetStats
from latentdiff.diffusion.noise import CosineSigma, sigma_distribution_from_dict
from latentdiff.training.config import TrainConfig
from latentdiff.training.schedule import resolve_schedule
from latentdiff.utils.errors import ConfigError, ExportError


def _resolve(ds, **kw):
    s = resolve_schedule(TrainConfig(dataset=str(ds), **kw))
    back = TrainingSchedule.from_dict(s.to_dict())  # what a checkpoint / export stores and reads back
    assert back.to_dict() == s.to_dict()
    return s


@pytest.mark.parametrize("base", ["lognormal", "logit_normal", "cosine"])
def test_every_base_under_every_shift_rule(tiny_dataset, base):
    side = DatasetStats.load(tiny_dataset).sample_shape[-1]
    none = _resolve(tiny_dataset, noise="edm", noise_base=base)
    m0 = none.distribution().median_log_sigma
    assert none.shift["rule"] == "none" and none.shift["log_factor"] == 0.0
    # the unshifted medians: EDM P_mean; SD3 m + ln sigma_data (unit-variance data scale); cosine ln tan(pi/4) = 0
    expect = {"lognormal": -1.2, "logit_normal": math.log(none.sigma_data), "cosine": 0.0}[base]
    assert math.isclose(m0, expect, abs_tol=1e-9)
    res = _resolve(tiny_dataset, noise="resolution", noise_base=base, resolution_ref=64)
    assert res.shift["side"] == side and math.isclose(res.shift["log_factor"], math.log(side / 64), rel_tol=1e-12)
    assert math.isclose(res.distribution().median_log_sigma, m0 + math.log(side / 64), abs_tol=1e-9)
    for dc in (True, False):
        w = _resolve(tiny_dataset, noise="wsnr", noise_base=base, wsnr_include_dc=dc)
        assert w.shift["include_dc"] is dc
        assert math.isclose(w.shift["log_factor"], w.wsnr.p_mean_shift, rel_tol=1e-12)
        assert math.isclose(w.distribution().median_log_sigma, m0 + w.wsnr.p_mean_shift, abs_tol=1e-9)
    assert sigma_distribution_from_dict(none.shift["base"]).median_log_sigma == pytest.approx(m0)
    if base == "cosine":
        assert isinstance(none.distribution(), CosineSigma)


def test_logit_normal_parameters_and_bad_values(tiny_dataset):
    s = _resolve(tiny_dataset, noise="edm", noise_base="logit_normal", logit_m=0.5, logit_s=0.7)
    d = s.distribution()
    assert d.to_dict() == {"kind": "logit_normal", "m": 0.5 + math.log(s.sigma_data), "s": 0.7}
    with pytest.raises(ConfigError) as e:
        TrainConfig(dataset=str(tiny_dataset), noise_base="gamma", logit_s=0.0, resolution_ref=0).validate()
    for field in ("noise_base", "logit_s", "resolution_ref"):
        assert f"- {field}:" in str(e.value)
    bad = s.to_dict()
    bad["shift"] = {"rule": "none"}
    with pytest.raises(ExportError, match="shift"):
        TrainingSchedule.from_dict(bad)
    old = s.to_dict()
    del old["shift"]  # files written before the shift record existed still load
    assert TrainingSchedule.from_dict(old).shift is None
