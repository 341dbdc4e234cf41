"""The DeepSpeed trainer on CPU (gloo): ZeRO-1/2/3, bitwise resume, faults, EMA, export, tensorboard."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from crash_report import cause
from v1_formats import rewrite_state_as_v1

REPO = Path(__file__).resolve().parents[1]
DS = REPO / "ds_configs"
PROBE = REPO / "tests" / "train_probe.py"
FP16_ANY_CPU = REPO / "tests" / "train_fp16_any_cpu.py"
_port = [29700 + (os.getpid() % 200) * 5]


def _next_port():
    _port[0] += 1
    return str(_port[0])


def _env(extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("LATENTDIFF_FAULT", None)
    env.update(extra or {})
    return env


def train_args(dataset, run_dir, *extra, ds="zero2.json"):
    return ["--config", "tiny-cpu", "--dataset", str(dataset), "--run-dir", str(run_dir), "--heldout-batch", "0",
            "--deepspeed_config", str(DS / ds), *map(str, extra)]


# Subprocess timeouts in the tests catch hangs; they are not speed requirements.  A 2-rank DeepSpeed run of
# a few steps takes ~20 s on an idle 2-core machine but minutes on a busy one (seen: > 240 s at load 14),
# so every whole-run timeout is 900 s, far inside CI's 90 min and far below a collective's 30 min hang.
def torchrun(args, nproc=2, env=None, timeout=900, module=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", _next_port()]
    cmd += ["-m", "latentdiff.train"] if module else []
    return subprocess.run(cmd + list(args), env=_env(env), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def probe(out_json, args, nproc=2, env=None, timeout=900):
    p = torchrun([str(PROBE), str(out_json), "--", *args], nproc=nproc, env=env, timeout=timeout, module=False)
    assert p.returncode == 0, cause(p)
    return json.loads(Path(out_json).read_text())


def fp32_weights(run_dir, step):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(Path(run_dir) / "checkpoints"), tag=f"step_{step:08d}")


def ema_weights(run_dir, step):
    from latentdiff.training.ema import consolidate

    return consolidate(Path(run_dir) / "checkpoints" / f"step_{step:08d}")


def assert_same(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[0]}: max {(a[bad[0]] - b[bad[0]]).abs().max()}"


# ----------------------------------------------------------------------------------------------
# fast, in-process


def test_bad_config_fails_before_any_process_group(tiny_dataset, tmp_path, capsys):
    import torch.distributed as dist

    from latentdiff.cli.train import main

    cases = [
        (["--lr", "-1"], "lr"),
        (["--noise", "cosine"], "noise"),
        (["--global-batch", "100"], "global_batch"),
        (["--ema-rates", "[1.5]"], "ema_rates"),
        (["--model", "uvit-xxl"], "model"),
        (["--micro-batch", "0"], "micro_batch"),
        (["--label-dropout", "1.5"], "label_dropout"),
        (["--normalization", "minmax"], "normalization"),
    ]
    for extra, field in cases:
        assert main([*train_args(tiny_dataset, tmp_path / "r"), *extra]) == 2
        err = capsys.readouterr().err
        assert f"- {field}" in err and "invalid training config" in err, err
        assert not dist.is_initialized() and not (tmp_path / "r").exists()
    # the same through a real launch: exit code 2 before DeepSpeed or a process group is touched
    p = subprocess.run([sys.executable, "-m", "latentdiff.train", *train_args(tiny_dataset, tmp_path / "r"), "--lr", "-1"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "lr: -1.0 must be a positive number" in p.stderr, p.stderr[-2000:]
    assert "ZeRO" not in p.stdout and not (tmp_path / "r").exists()
    # unknown fields get a suggestion; a missing dataset names the tool
    from latentdiff.utils.errors import ConfigError
    from latentdiff.training.config import TrainConfig
    from latentdiff.utils.config import load_config

    with pytest.raises(ConfigError, match="did you mean lr"):
        load_config(TrainConfig, "tiny-cpu", {"lrr": 1})
    with pytest.raises(ConfigError, match="encode_latents"):
        load_config(TrainConfig, "tiny-cpu", {"dataset": str(tmp_path / "nope")}).validate()


def test_batch_arithmetic_message():
    from latentdiff.utils.errors import ConfigError
    from latentdiff.training.config import TrainConfig

    cfg = TrainConfig(dataset="", micro_batch=8, grad_accum=2, global_batch=64)
    with pytest.raises(ConfigError) as e:
        cfg.validate(world_size=2)
    assert "64 != micro_batch 8 x grad_accum 2 x world size 2 = 32" in str(e.value)
    assert "grad_accum = 4" in str(e.value)
    # a global batch no integer grad_accum reaches: say so and list the valid ones around it
    cfg = TrainConfig(dataset="", micro_batch=4, grad_accum=1, global_batch=17)
    with pytest.raises(ConfigError) as e:
        cfg.validate(world_size=2)
    msg = str(e.value)
    assert "2.125" not in msg and "no integer grad_accum fits" in msg
    assert "multiple of micro_batch 4 x world size 2 = 8" in msg and "16 (grad_accum 2), 24 (grad_accum 3)" in msg


def test_a_conflicting_deepspeed_batch_size_is_refused_with_both_values(tiny_dataset, tmp_path, capsys):
    import torch.distributed as dist

    from latentdiff.cli.train import main
    from latentdiff.training.config import TrainConfig
    from latentdiff.training.engine import build_ds_config
    from latentdiff.utils.errors import ConfigError

    cfg = TrainConfig(micro_batch=8, grad_accum=2, grad_clip=1.0)
    base = {"zero_optimization": {"stage": 2}}
    for agreeing in ({"train_batch_size": 32}, {"train_batch_size": "auto"}, {"gradient_clipping": 1.0}):
        assert build_ds_config(cfg, {**base, **agreeing}, 2)["train_batch_size"] == 32
    with pytest.raises(ConfigError, match=r"train_batch_size = 64 but the TrainConfig gives 32 \(micro_batch 8 x grad_accum 2"):
        build_ds_config(cfg, {**base, "train_batch_size": 64}, 2)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 4 but the TrainConfig gives 2"):
        build_ds_config(cfg, {**base, "gradient_accumulation_steps": 4}, 2)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**base, "train_batch_size": 64}))
    args = train_args(tiny_dataset, tmp_path / "r")
    args[args.index("--deepspeed_config") + 1] = str(ds)
    assert main(args) == 2
    assert "train_batch_size = 64 but the TrainConfig gives 8" in capsys.readouterr().err
    assert not dist.is_initialized() and not (tmp_path / "r").exists()


def test_fp16_on_a_device_without_fp16_is_refused_before_any_process_group(tiny_dataset, tmp_path, capsys,
                                                                          monkeypatch):
    """On a CPU without oneDNN fp16 kernels DeepSpeed raised a bare ValueError inside initialize on every
    rank; the CLI refuses it up front with the cause and the fix."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from latentdiff.cli.train import main

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    rc = main(["--config", "tiny-cpu", "--dataset", str(tiny_dataset), "--run-dir", str(tmp_path / "r"),
               "--deepspeed_config", str(DS / "zero2_fp16.json"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and not dist.is_initialized(), err
    assert "does not support fp16 training" in err and "--precision bf16" in err, err
    assert not (tmp_path / "r").exists()


def test_yaml_typo_suggests_the_field_it_stands_for(tiny_dataset, tmp_path, capsys):
    """A common name from another trainer (learning_rate) in a YAML file: the error names the field (lr)."""
    from latentdiff.cli.train import main

    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"dataset: {tiny_dataset}\nlearning_rate: 0.001\nmicro_batchsize: 4\n")
    assert main(["--config", str(cfg), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "learning_rate (did you mean lr?)" in err and "micro_batchsize (did you mean micro_batch?)" in err
    assert not (tmp_path / "r").exists()


def test_help_describes_every_field(capsys):
    """``latentdiff-train --help``: every TrainConfig field has a description of its own, not only a default."""
    import dataclasses

    from latentdiff.cli.train import parse_args
    from latentdiff.training.config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        assert len(f.metadata.get("help", "")) > 10, f"{f.name} has no help text"
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
        assert " ".join(f.metadata["help"].split())[:30] in out, f.name
    assert "AdamW learning rate" in out and "no export is written when it stops early" in out


def test_wsnr_aligned_schedule_equals_analytic_shift(tiny_dataset):
    from latentdiff.vae.normalization import Normalization
    from latentdiff.data.stats import DatasetStats
    from latentdiff.training.config import TrainConfig
    from latentdiff.training.schedule import resolve_schedule

    st = DatasetStats.load(tiny_dataset)
    for norm, dc in (("channel", True), ("sd", True), ("channel", False)):
        cfg = TrainConfig(dataset=str(tiny_dataset), normalization=norm, wsnr_include_dc=dc)
        s = resolve_schedule(cfg).to_dict()
        n = Normalization.from_dict(s["normalization"])
        # model-space sampled latents, brute force: spectrum of (m + s*eps - shift) * scale, Monte Carlo-free:
        # E|F((z - a) k)|^2 = k^2 (|F(m - a)|^2 + mean s^2) per image, exact via the stored sums
        shift = torch.tensor(n.shift, dtype=torch.float64).view(-1, 1, 1)
        scale = torch.tensor(n.scale, dtype=torch.float64).view(-1, 1, 1)
        means, var = _load_all(tiny_dataset)
        f = torch.fft.fft2((means - shift) * scale, norm="ortho")
        p = (f.real**2 + f.imag**2).mean(0) + (scale.square() * var.view(-1, 1, 1))
        q = st.rgb64_power.clone()
        if not dc:
            p[:, 0, 0] = 0
            q[:, 0, 0] = 0
        k_t = sum(float((p[c] ** 2).sum() / p[c].sum()) for c in range(p.shape[0]))
        k_r = sum(float((q[c] ** 2).sum() / q[c].sum()) for c in range(3))
        assert s["sigma_dist"]["kind"] == "lognormal" and s["sigma_dist"]["p_std"] == 1.2
        assert math.isclose(s["sigma_dist"]["p_mean"], -1.2 + 0.5 * math.log(k_t / k_r), rel_tol=1e-9, abs_tol=1e-9)
        # sigma_data = RMS of the model-space latents; sigma_max = sqrt(mu_d + 2 sigma_d) of model-space means
        flat = ((means - shift) * scale).reshape(means.shape[0], -1)
        d2 = torch.cdist(flat, flat).square().sum(1) / (flat.shape[0] - 1)
        assert math.isclose(s["sigma_max"], math.sqrt(d2.mean() + 2 * d2.std(unbiased=False)), rel_tol=1e-6)


def _load_all(root):
    """Every posterior mean in the dataset (float64) and the per-channel E[std^2], straight from the tars."""
    from latentdiff.data.reader import LatentShardDataset

    ds = LatentShardDataset(root, 1, rank=0, world_size=1, num_workers=0, shuffle=False, verify="none")
    ms, vs = [], []
    for mean, std, _, _ in _all_batches(ds):
        ms.append(mean.double())
        vs.append(std.double().square())
    m, v = torch.cat(ms), torch.cat(vs)
    return m, v.mean(dim=(0, 2, 3))


def _all_batches(ds):
    ds.set_epoch(0)
    yield from ds


def test_step_seeds_differ_per_rank_and_repeat():
    from latentdiff.utils.seeds import step_seed

    seeds = {step_seed(0, s, m, r) for s in range(50) for m in range(2) for r in range(4)}
    assert len(seeds) == 400
    assert step_seed(3, 7, 1, 2) == step_seed(3, 7, 1, 2) != step_seed(4, 7, 1, 2)


def test_sample_preview_loads_the_vae_once_and_uses_the_default_sampler(tiny_dataset, tmp_path, monkeypatch):
    """Two tensorboard sample grids: one VAE load (and weights hash) per run, the default sampler."""
    from latentdiff.contracts.manifest import load_manifest
    from latentdiff.diffusion.precond import EDMPrecond
    from latentdiff.models import build
    from latentdiff.solvers.registry import DEFAULT_SAMPLER
    from latentdiff.training import preview as pv
    from latentdiff.training.config import TrainConfig
    from latentdiff.training.schedule import resolve_schedule
    from latentdiff.training.tb import TBWriter

    loads, methods = [], []
    real_load, real_generate = pv.load_vae_for, pv.generate_latents
    monkeypatch.setattr(pv, "load_vae_for", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(pv, "generate_latents", lambda *a, **k: methods.append(k["method"]) or real_generate(*a, **k))
    cfg = TrainConfig(dataset=str(tiny_dataset))
    assert cfg.sample_solver == DEFAULT_SAMPLER
    m, sched = load_manifest(tiny_dataset), resolve_schedule(cfg)
    c, h, _ = m.sample_shape
    torch.manual_seed(0)
    d = EDMPrecond(build("uvit-tiny", in_channels=c, resolution=h, num_classes=m.num_classes), sched.sigma_data).eval()
    preview = pv.SamplePreview(tmp_path, m.vae, sched.normalization, m.sample_shape,
                               m.num_classes, solver=cfg.sample_solver, nfe=7, count=4, sigma_min=sched.sigma_min,
                               sigma_max=sched.sigma_max, device=torch.device("cpu"))
    tb = TBWriter(tmp_path / "tb", enabled=False)
    g1, g2 = preview.log(tb, d, 10), preview.log(tb, d, 20)
    assert len(loads) == 1 and methods == [DEFAULT_SAMPLER, DEFAULT_SAMPLER]
    assert g1.dtype == torch.uint8 and g1.shape == (3, 2 * 32, 2 * 32) and torch.equal(g1, g2)  # same seeds
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_00000010.png", "step_00000020.png"]


def test_log_lines_do_not_land_on_the_progress_bar(monkeypatch):
    """A line logged while the bar is shown ("saved checkpoint ...") starts on a cleared line."""
    import io

    from tqdm import tqdm

    from latentdiff.training.trainer import log_above_bar

    term = io.StringIO()  # one terminal: stdout and stderr end up in the same place
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    import re

    bar = tqdm(total=10, file=sys.stderr, desc="train", ascii=True, mininterval=0, miniters=1)
    bar.update(3)
    log_above_bar(print, "saved checkpoint X")
    bar.update(1)
    bar.close()
    text = term.getvalue()
    before = text[: text.index("saved checkpoint X")]
    # the bar (at 3/10) was drawn, then erased ("\r", blanks, "\r"), then the line was printed
    assert re.search(r"3/10[^\n]*\r *\r$", before), repr(before[-120:])
    assert "saved checkpoint X\n" in text and "4/10" in text[text.index("saved checkpoint X"):]


def test_run_description_keeps_the_wsnr_note_short(tiny_dataset):
    """tiny-cpu on latents: the DC-dominated WSNR shift is a one-line note; no note without the DC bin."""
    from types import SimpleNamespace

    from latentdiff.contracts.manifest import load_manifest
    from latentdiff.training.config import TrainConfig
    from latentdiff.training.schedule import resolve_schedule
    from latentdiff.training.trainer import Trainer
    from latentdiff.utils.config import load_config

    for include_dc in (True, False):
        cfg = load_config(TrainConfig, "tiny-cpu", {"dataset": str(tiny_dataset), "wsnr_include_dc": include_dc})
        m, sched = load_manifest(tiny_dataset), resolve_schedule(cfg)
        run = SimpleNamespace(cfg=cfg, schedule=sched, manifest=m, run_dir="RUN", sample_shape=m.sample_shape,
                              num_classes=m.num_classes, world=1, zero_stage=2, precision="fp32", global_batch=8,
                              total_steps=512, fused_adamw=False)
        text = Trainer.describe(run)
        notes = [line for line in text.splitlines() if line.startswith(("note", "warning"))]
        if include_dc:
            assert abs(sched.wsnr.p_mean_shift) > 1.5  # the case the note is for
            assert len(notes) == 1 and len(notes[0]) < 140 and "--wsnr-include-dc false" in notes[0]
        else:
            assert notes == []


# ----------------------------------------------------------------------------------------------
# multi-process (torchrun, gloo)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero1.json", "zero2.json", "zero3.json"])
def test_zero_stage_trains_saves_resumes_and_exports(tiny_dataset, tmp_path, stage):
    run = tmp_path / "run"
    emas = "[0.0, 0.9]"
    r1 = probe(tmp_path / "a.json", train_args(tiny_dataset, run, "--max-steps", 4, "--checkpoint-every", 2,
                                                 "--ema-rates", emas, "--label-dropout", 0.5, ds=stage))
    assert r1["step"] == 4 and r1["zero_stage"] == int(stage[4])
    # export equals the live engine; the EMA with rate 0 equals the model (gathered under ZeRO-3)
    assert r1["export_vs_engine"] <= 1e-5 * max(1.0, r1["live_scale"]), r1
    assert r1["ema0_vs_engine"] is not None and r1["ema0_vs_engine"] <= 1e-5 * max(1.0, r1["live_scale"]), r1
    # per-rank draws differ (sigma, noise, data, label dropout) ...
    d0, d1 = r1["draws"]
    assert len(d0) == len(d1) == 4
    for a, b in zip(d0, d1):
        assert a["sigma"] != b["sigma"] and a["noise0"] != b["noise0"] and a["y0"] != b["y0"]
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000004"]
    # ... and resuming to step 6 works (continues from the latest checkpoint)
    r2 = probe(tmp_path / "b.json", train_args(tiny_dataset, run, "--max-steps", 6, "--checkpoint-every", 2,
                                                 "--ema-rates", emas, "--label-dropout", 0.5, ds=stage))
    assert r2["step"] == 6 and len(r2["draws"][0]) == 2  # only steps 4 and 5 were trained
    # a repeated run from scratch draws exactly the same numbers
    r3 = probe(tmp_path / "c.json", train_args(tiny_dataset, tmp_path / "run3", "--max-steps", 4, "--checkpoint-every", 2,
                                                 "--ema-rates", emas, "--label-dropout", 0.5, ds=stage))
    assert r3["draws"] == r1["draws"]


@pytest.mark.slow
def test_bitwise_resume_after_kill9(tiny_dataset, tmp_path):
    """2N steps uninterrupted == N steps + kill -9 (after the checkpoint at N) + resume + N steps; the
    power-function EMAs and their snapshots too (every 64 images = every second step)."""
    n = 5
    common = ["--max-steps", 2 * n, "--checkpoint-every", n, "--ema-rates", "[0.9, 0.999]", "--grad-accum", 2,
              "--warmup-images", 64, "--num-workers", 2, "--log-every", 1, "--snapshot-every-images", 64]
    a, b = tmp_path / "a", tmp_path / "b"
    p = torchrun(train_args(tiny_dataset, a, *common))
    assert p.returncode == 0, cause(p)
    p = torchrun(train_args(tiny_dataset, b, *common), env={"LATENTDIFF_FAULT": f"kill-after-save:{n}"})
    assert p.returncode != 0 and (b / "checkpoints" / f"step_{n:08d}").is_dir()
    assert not (b / "checkpoints" / f"step_{2 * n:08d}").exists()
    p = torchrun(train_args(tiny_dataset, b, *common))
    assert p.returncode == 0, cause(p)
    assert f"resumed from {b / 'checkpoints' / f'step_{n:08d}'}" in p.stdout
    assert_same(fp32_weights(a, 2 * n), fp32_weights(b, 2 * n))
    ea, eb = ema_weights(a, 2 * n), ema_weights(b, 2 * n)
    for rate in ea:
        assert_same(ea[rate], eb[rate])
    from latentdiff.training.ema import PowerEMA, consolidate

    pa, pb = (consolidate(r / "checkpoints" / f"step_{2 * n:08d}", stem=PowerEMA.STEM) for r in (a, b))
    assert sorted(pa) == [0.05, 0.1]
    for s in pa:
        assert_same(pa[s], pb[s])
    snaps = {r: {p.name: p.read_bytes() for p in (r / "ema_snapshots").glob("snap_*.safetensors")} for r in (a, b)}
    assert sorted(snaps[a]) == [f"snap_{i:012d}.safetensors" for i in (64, 128, 192, 256, 320)]
    assert snaps[a] == snaps[b]
    # optimizer moments too (the next step would differ otherwise): compare the raw optimizer files
    from latentdiff.utils.safe_load import deepspeed_globals, torch_load

    for f in sorted((a / "checkpoints" / f"step_{2 * n:08d}").glob("*optim_states.pt")):
        sa = torch_load(f, allow=deepspeed_globals())["optimizer_state_dict"]
        sb = torch_load(b / "checkpoints" / f"step_{2 * n:08d}" / f.name, allow=deepspeed_globals())["optimizer_state_dict"]
        for key in ("state", "base_optimizer_state"):
            if key in sa:
                _deep_equal(sa[key], sb[key])
    # tensorboard: the resumed run continues the curve without duplicates (purge_step)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = {}
    for run in (a, b):
        ea_ = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "histograms": 0})
        ea_.Reload()
        steps[run] = [(e.step, e.value) for e in ea_.Scalars("loss/train")]
        assert "lr" in ea_.Tags()["scalars"] and "sigma" in ea_.Tags()["histograms"]
        assert any(t.startswith("loss_per_sigma/") for t in ea_.Tags()["scalars"])
    assert [s for s, _ in steps[b]] == list(range(1, 2 * n + 1))
    assert steps[a] == steps[b]


def _deep_equal(a, b):
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _deep_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _deep_equal(x, y)
    else:
        assert a == b


@pytest.mark.slow
def test_kill9_of_one_rank_ends_the_job_and_the_next_run_resumes(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    args = train_args(tiny_dataset, run, "--max-steps", 8, "--checkpoint-every", 2, "--comm-timeout-minutes", 5)
    p = torchrun(args, env={"LATENTDIFF_FAULT": "kill-rank:1:5"}, timeout=900)
    ended = time.time()
    assert p.returncode != 0
    # measured from the last checkpoint (step 4; rank 1 dies in step 5), not from the launch, whose start-up
    # time depends on the machine's load: the launcher ends the job, long before the 5 min collective timeout
    since = ended - (run / "checkpoints" / "latest").stat().st_mtime
    assert since < 150, f"the job ended {since:.0f} s after the last checkpoint: it waited for a collective timeout"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    p = torchrun(args)
    assert p.returncode == 0, cause(p)
    assert "resumed from" in p.stdout and "step 4" in p.stdout
    assert (run / "checkpoints" / "step_00000008" / "COMPLETE").is_file()


@pytest.mark.slow
def test_crash_in_the_middle_of_a_save_leaves_a_loadable_latest(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    args = train_args(tiny_dataset, run, "--max-steps", 6, "--checkpoint-every", 2)
    p = torchrun(args, env={"LATENTDIFF_FAULT": "kill-mid-save:4"})
    assert p.returncode != 0
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert list(ck.glob(".tmp-step_00000004")) and not (ck / "step_00000004").exists()
    p = torchrun(args)
    assert p.returncode == 0, cause(p)
    assert "resumed from" in p.stdout and "step 2 " in p.stdout
    assert not list(ck.glob(".tmp-*"))
    # retention: keep_last 2 of the tiny-cpu preset
    assert sorted(x.name for x in ck.glob("step_*")) == ["step_00000004", "step_00000006"]


@pytest.mark.slow
def test_sigterm_makes_every_rank_save_and_exit_zero(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _next_port(),
           "-m", "latentdiff.train", *train_args(tiny_dataset, run, "--max-steps", 100000, "--checkpoint-every", 100000)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)
    deadline = time.time() + 180
    # wait until training runs (a tensorboard event file exists and some steps passed)
    while time.time() < deadline and not list((run / "tb").glob("events*")):
        time.sleep(0.5)
    time.sleep(3)
    # SLURM sends the signal to the job's processes: here every rank of the job (not the launcher)
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True)
    ranks = [c for c in children if "latentdiff.train" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    ranks[0].send_signal(signal.SIGUSR1)  # one rank is enough: the flag is all-reduced
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested" in out
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] > 0 and state["world_size"] == 2


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_within_stop_check_every_steps(tiny_dataset, tmp_path):
    """The bound of training/signals.py: SIGUSR1 reaches rank 1 after step 5, the ranks agree every 4
    steps, so both save step ceil(5 / 4) * 4 = 8 and exit 0 (no agreement, no collective, at 5-7)."""
    run = tmp_path / "run"
    p = torchrun(train_args(tiny_dataset, run, "--max-steps", 40, "--checkpoint-every", 1000, "--stop-check-every", 4),
                 env={"LATENTDIFF_FAULT": "signal-rank:1:5"})
    assert p.returncode == 0, cause(p)
    assert "stop requested (SIGTERM/SIGUSR1): saved step 8, exiting" in p.stdout, p.stdout[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    state = json.loads((run / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["world_size"] == 2
    assert "stopped by a stop signal at step 8" in p.stdout


@pytest.mark.slow
@pytest.mark.skipif(not any(__import__("shutil").which(c) for c in ("c++", "g++", "clang++")),
                    reason="torch.compile on CPU (inductor) needs a C++ compiler")
def test_compiled_denoiser_with_fused_adamw_trains_like_eager(tiny_dataset, tmp_path):
    """--compile true --adamw-impl fused (both exist for GPUs; CPU runs them too): the logged losses of the
    first steps equal the eager run's up to rounding, and either run's checkpoint resumes with the other's flags."""
    common = ["--max-steps", 3, "--checkpoint-every", 3, "--log-every", 1, "--model-overrides", "{depth: 3}"]
    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    p = torchrun(train_args(tiny_dataset, eager, *common), nproc=1)
    assert p.returncode == 0, cause(p)
    assert "AdamW torch default kernels" in p.stdout
    p = torchrun(train_args(tiny_dataset, comp, *common, "--compile", "true", "--adamw-impl", "fused"), nproc=1,
                 timeout=900)
    assert p.returncode == 0, cause(p)
    assert "AdamW fused kernels, torch.compile" in p.stdout
    a, b = (dict(_tb_scalars(r)["loss/train"]) for r in (eager, comp))
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)
    # the options are resume-safe (same arithmetic): a checkpoint of either run resumes with the other's flags
    from latentdiff.training.config import config_diff

    saved = [json.loads((r / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())["config"]
             for r in (eager, comp)]
    assert saved[0]["compile"] is False and saved[1]["compile"] is True and saved[1]["adamw_impl"] == "fused"
    assert config_diff(saved[0], {**saved[1], "run_dir": saved[0]["run_dir"]}) == []


@pytest.mark.slow
def test_resume_refuses_a_changed_config(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    p = torchrun(train_args(tiny_dataset, run, "--max-steps", 2, "--checkpoint-every", 2), nproc=1)
    assert p.returncode == 0, cause(p)
    # stopped by --max-steps: no export, and the message says so and how to make one
    assert not (run / "export").exists()
    assert "stopped by --max-steps at step 2 of 512: no export was written" in p.stdout, p.stdout[-2000:]
    assert f"latentdiff-export {run}" in p.stdout
    # the tiny-cpu preset's WSNR note is one short line
    assert "Eq. 2 includes the zero frequency" not in p.stdout
    assert all(len(line) < 200 for line in p.stdout.splitlines() if line.startswith(("note", "warning")))
    # a checkpoint written in the previous trainer_state.json format resumes (and is refused) the same way
    rewrite_state_as_v1(run / "checkpoints" / "step_00000002")
    p = torchrun(train_args(tiny_dataset, run, "--max-steps", 4, "--lr", 0.5), nproc=1)
    assert p.returncode != 0  # the rank exits 2; torchrun reports a failure
    assert "refusing to resume" in p.stderr and "lr: 0.001 (checkpoint) -> 0.5 (now)" in p.stderr
    # safe fields may change; --force-resume accepts the rest
    p = torchrun(train_args(tiny_dataset, run, "--max-steps", 4, "--lr", 0.5, "--force-resume", "true"), nproc=1)
    assert p.returncode == 0, cause(p)


@pytest.mark.slow
def test_bf16_ema_moves_and_fp16_stops_on_collapsed_scale(tiny_dataset, tmp_path):
    run = tmp_path / "bf16"
    args = train_args(tiny_dataset, run, "--max-steps", 2, "--checkpoint-every", 1, "--keep-last", 5,
                      "--precision", "bf16", "--ema-rates", "[0.5]")
    args[args.index("--heldout-batch") + 1] = "1000"  # more than the 72 samples: all of them, with a warning
    r = probe(tmp_path / "bf16.json", args, nproc=1)
    (rank,) = r["per_rank"]
    assert rank["dtypes"] == {"module": ["torch.bfloat16"], "master": ["torch.float32"],
                              "optimizer_state": ["torch.float32"]}, rank["dtypes"]  # T12 under ZeRO-2
    assert rank["heldout"][0]["n"] == 72 and any("heldout_batch 1000 is larger" in w for w in rank["warnings"])
    e1, e2 = ema_weights(run, 1)[0.5], ema_weights(run, 2)[0.5]
    assert all(v.dtype == torch.float32 for v in e2.values())
    assert any(not torch.equal(e1[k], e2[k]) for k in e1), "the EMA did not move in bf16 training"
    # fp16 with a minimum loss scale that always overflows: every step is skipped at the minimum
    ds = json.loads((DS / "zero2_fp16.json").read_text())
    ds["fp16"].update({"initial_scale_power": 40, "min_loss_scale": 2.0**40})
    cfg = tmp_path / "fp16.json"
    cfg.write_text(json.dumps(ds))
    args = train_args(tiny_dataset, tmp_path / "fp16", "--max-steps", 50, "--fp16-max-min-scale-steps", 3)
    args[args.index("--deepspeed_config") + 1] = str(cfg)
    # DeepSpeed trains fp16 on CPU only where oneDNN has fp16 kernels (AVX512-FP16/AMX-FP16); elsewhere
    # the run ended in "Type fp16 is not supported on your device." before any step. This entry point
    # passes that capability check so the loss-scale watch is tested on every CPU.
    p = torchrun([str(FP16_ANY_CPU), *args], nproc=1, module=False)
    assert p.returncode != 0, cause(p)
    assert "fp16 loss scale stuck at its minimum" in p.stderr, cause(p)


@pytest.mark.slow
def test_zero0_checkpoint_exports_through_weights_only_load(tiny_dataset, tmp_path):
    """A ZeRO-0 checkpoint has no optimizer shards: the export reads the module states with
    torch.load(weights_only=True) and writes exactly those weights."""
    from safetensors.torch import load_file

    ds = tmp_path / "zero0.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}, "fp16": {"enabled": False}}))
    run = tmp_path / "z0"
    args = ["--config", "tiny-cpu", "--dataset", str(tiny_dataset), "--run-dir", str(run), "--heldout-batch", "0",
            "--deepspeed_config", str(ds), "--max-steps", "2", "--checkpoint-every", "2"]
    p = torchrun(args, nproc=1)
    assert p.returncode == 0, cause(p)
    ckpt = run / "checkpoints" / "step_00000002"
    assert not list(ckpt.glob("*optim_states.pt")) and list(ckpt.glob("mp_rank_*_model_states.pt"))
    rewrite_state_as_v1(ckpt)  # a checkpoint of the previous trainer_state.json format exports too
    out = tmp_path / "export"
    e = subprocess.run([sys.executable, "-m", "latentdiff.cli.export", str(run), "--out", str(out)], env=_env(),
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert e.returncode == 0, cause(e)
    module = torch.load(next(ckpt.glob("mp_rank_*_model_states.pt")), map_location="cpu", weights_only=True)["module"]
    raw = load_file(str(out / json.loads((out / "model.json").read_text())["weights"]["raw"]))
    assert raw and set(raw) == {k[len("model."):] for k in module if k.startswith("model.")}
    assert all(torch.equal(raw[k], module["model." + k].float()) for k in raw)


def _tb_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_two_ranks_log_the_reduced_loss_share_the_fixed_batch_and_keep_fp32_masters(tiny_dataset, tmp_path):
    """T24: the logged loss is the mean over both ranks' samples (not rank 0's), and only rank 0 opens a
    tensorboard writer.  T11: a fixed batch of 13 samples (two uneven shards, odd for 2 ranks) is the
    same on both ranks and its raw and EMA losses are logged at every step under ZeRO-3, whose gathers
    would hang on an uneven split.  T12: bf16 keeps fp32 master weights and fp32 Adam moments."""
    run = tmp_path / "run"
    args = train_args(tiny_dataset, run, "--max-steps", 3, "--checkpoint-every", 3, "--log-every", 1,
                      "--precision", "bf16", "--ema-rates", "[0.9]", ds="zero3.json")
    args[args.index("--heldout-batch") + 1] = "13"
    r = probe(tmp_path / "p.json", args)
    assert r["step"] == 3 and r["zero_stage"] == 3
    r0, r1 = r["per_rank"]
    # T24 -------------------------------------------------------------------------------------
    assert r0["tb_writer"] == [True] and r1["tb_writer"] == [False]
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    logged = dict(_tb_scalars(run)["loss/train"])
    assert sorted(logged) == [1, 2, 3]
    spread = 0.0
    for w0, w1 in zip(r0["windows"], r1["windows"]):
        assert w0["step"] == w1["step"] and w0["count"] == w1["count"] == 8  # micro-batch 8, no accumulation
        mean = (w0["loss_sum"] + w1["loss_sum"]) / (w0["count"] + w1["count"])
        assert logged[w0["step"]] == pytest.approx(mean, rel=1e-6)
        local0, local1 = w0["loss_sum"] / w0["count"], w1["loss_sum"] / w1["count"]
        spread = max(spread, abs(local0 - local1) / mean)
    assert spread > 1e-3, "the ranks' own losses coincide: this run could not tell a reduced loss from rank 0's"
    # T11 -------------------------------------------------------------------------------------
    assert r0["heldout"] == r1["heldout"] and r0["heldout"][0]["n"] == 13
    scalars = _tb_scalars(run)
    for tag in ("loss_fixed_batch/raw", "loss_fixed_batch/ema_0.9"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3], tag
    # T12 -------------------------------------------------------------------------------------
    for rank in (r0, r1):
        assert rank["dtypes"] == {"module": ["torch.bfloat16"], "master": ["torch.float32"],
                                  "optimizer_state": ["torch.float32"]}, rank["dtypes"]
