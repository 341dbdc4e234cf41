"""sampling/gits_cache.py: GITS' cost matrix computed once per model and settings, reused, invalidated by a change."""
import json

import numpy as np
import pytest

from latentdiff.sampling.config import SampleConfig
from latentdiff.sampling.gits_cache import (
    build_gits_table,
    gits_key,
    load_or_build_gits,
)
from latentdiff.solvers.schedules import GITSParams, GITSTable
from latentdiff.utils.errors import SampleError


def net(x, sigma, labels=None):
    """A class-conditional Gaussian denoiser: mean = label / 10."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    mu = 0.0 if labels is None else labels.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / 10
    return mu + 0.25 / (0.25 + s**2) * (x - mu)


class Builds:
    def __init__(self):
        self.n = 0

    def __call__(self, m=5):
        self.n += 1
        return GITSTable(sigmas=list(np.geomspace(80, 0.002, m)), cost=np.ones((m, m)).tolist())


def test_cache_reused_and_invalidated(tmp_path):
    build = Builds()
    key = gits_key("a" * 64, GITSParams(warmup=8), sigma_min=0.002, sigma_max=80.0)
    t1 = load_or_build_gits([tmp_path], key, build)
    t2 = load_or_build_gits([tmp_path], key, build)
    assert build.n == 1 and not t1.meta["cached"] and t2.meta["cached"] and t1.meta["file"] == t2.meta["file"]
    assert t2.cost == t1.cost and t2.sigmas == t1.sigmas
    # other weights, other GITS parameters, another sigma range: another table
    for other in (gits_key("b" * 64, GITSParams(warmup=8), sigma_min=0.002, sigma_max=80.0),
                  gits_key("a" * 64, GITSParams(warmup=9), sigma_min=0.002, sigma_max=80.0),
                  gits_key("a" * 64, GITSParams(warmup=8, coeff=1.0), sigma_min=0.002, sigma_max=80.0),
                  gits_key("a" * 64, GITSParams(warmup=8), sigma_min=0.002, sigma_max=20.0)):
        t = load_or_build_gits([tmp_path], other, build)
        assert not t.meta["cached"] and t.meta["file"] != t1.meta["file"]
    assert build.n == 5
    # a file whose stored key is not its name's is not trusted
    path = tmp_path / "gits" / t1.meta["file"].rsplit("/", 1)[1]
    d = json.loads(path.read_text())
    d["key"]["weights_sha256"] = "c" * 64
    path.write_text(json.dumps(d))
    assert not load_or_build_gits([tmp_path], key, build).meta["cached"] and build.n == 6


def test_cache_falls_back_to_the_next_directory(tmp_path):
    ro = tmp_path / "export"
    ro.mkdir()
    (ro / "gits").write_text("a file where the cache directory would go")  # mkdir fails: not writable there
    t = load_or_build_gits([ro, tmp_path / "out"], gits_key("a" * 64, GITSParams()), Builds())
    assert t.meta["file"].startswith(str(tmp_path / "out"))
    with pytest.raises(SampleError, match="could not write the GITS cache"):
        load_or_build_gits([ro], gits_key("d" * 64, GITSParams()), Builds())


def test_build_table_from_warmup_trajectories():
    params = GITSParams(fine_levels=9, warmup=6)
    t = build_gits_table(net, (2, 2, 2), params, sigma_min=0.002, sigma_max=80.0, num_classes=3, batch=4)
    t_again = build_gits_table(net, (2, 2, 2), params, sigma_min=0.002, sigma_max=80.0, num_classes=3, batch=2)
    cost = np.asarray(t.cost)
    assert cost.shape == (9, 9) and np.allclose(cost, np.asarray(t_again.cost), rtol=1e-5)  # batching-independent
    assert t.sigmas[0] == 80.0 and t.sigmas[-1] == 0.002 and np.all(cost[np.triu_indices(9, 1)] > 0)
    assert len(t.grid(5)) == 6
    with pytest.raises(SampleError, match="teacher"):
        build_gits_table(net, (2, 2, 2), GITSParams(teacher="heun"), sigma_min=0.002, sigma_max=80.0)


def test_config_refuses_gits_flags_without_gits():
    base = dict(export="E", out="O")
    with pytest.raises(SampleError, match="need --schedule gits"):
        SampleConfig(**base, solver="ipndm", gits_warmup=10).validate()
    with pytest.raises(SampleError, match="does not use schedule"):
        SampleConfig(**base, solver="auto", schedule="karras").validate()
    assert SampleConfig(**base, solver="ipndm", schedule="gits", gits_fine=41).gits_params().fine_levels == 41
    assert SampleConfig(**base, solver="unipc", schedule="log-uniform").validate().solver_options() == {
        "schedule": "log-uniform"}


def test_cli_default_is_the_benchmark_pair_and_sample_keeps_auto():
    """latentdiff-sample's default pair comes from the trained-network benchmark; sample()'s stays auto
    (its ideal-denoiser results are what tests/test_auto_sampler.py checks)."""
    from latentdiff.sampling.config import CLI_DEFAULT_SCHEDULE, CLI_DEFAULT_SOLVER
    from latentdiff.solvers.registry import DEFAULT_SAMPLER, SOLVERS

    cfg = SampleConfig(export="E", out="O").validate()
    assert cfg.solver == CLI_DEFAULT_SOLVER != DEFAULT_SAMPLER == "auto"
    assert "schedule" in SOLVERS[CLI_DEFAULT_SOLVER].options
    want = {} if CLI_DEFAULT_SCHEDULE == "karras" else {"schedule": CLI_DEFAULT_SCHEDULE}
    assert cfg.solver_options() == want
    assert SampleConfig(export="E", out="O", solver="heun").solver_options() == {}  # other solvers: Karras
    assert SampleConfig(export="E", out="O", schedule="log-uniform").solver_options() == {"schedule": "log-uniform"}
