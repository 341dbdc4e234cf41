"""latentdiff.sample: determinism, exact counts, resume, NFE accounting, exact decode, export checks, CFG, VP bridge."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from crash_report import cause

from latentdiff.utils.errors import SampleError

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(cmd, timeout=900):
    p = subprocess.run([sys.executable, *map(str, cmd)], env=_env(), capture_output=True, text=True, timeout=timeout,
                       cwd=REPO)
    assert p.returncode == 0, cause(p)
    return p


# ----------------------------------------------------------------------------------------------
# fixtures: one real trainer export per session, a tiny diffusers UNet


@pytest.fixture(scope="session")
def real_export(tiny_dataset, tmp_path_factory):
    """A real export: 4 DeepSpeed steps of the tiny-cpu preset on the encoded tiny dataset, then latentdiff-export."""
    run = tmp_path_factory.mktemp("sample_export") / "run"
    _run(["-m", "latentdiff.train", "--config", "tiny-cpu", "--dataset", tiny_dataset, "--run-dir", run,
          "--max-steps", 4, "--checkpoint-every", 4, "--heldout-batch", 0,
          "--deepspeed_config", REPO / "ds_configs" / "zero2.json"])
    _run(["-m", "latentdiff.cli.export", run])
    out = run / "export" / "step_00000004"
    assert (out / "model.json").is_file()
    return out


@pytest.fixture(scope="session")
def loaded(real_export):
    """(denoiser, ExportMeta) of the real export."""
    from latentdiff.contracts.export import load_export

    den, export = load_export(real_export)
    return den, export.meta


def make_unet(path, num_class_embeds=None, scheduler=None):
    """A small randomly initialized diffusers UNet2DModel (8x8 RGB) saved with save_pretrained."""
    from diffusers import UNet2DModel

    g = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           norm_num_groups=8, num_class_embeds=num_class_embeds)
        with torch.no_grad():  # make epsilon clearly non-zero and sigma-dependent
            torch.nn.init.normal_(unet.conv_out.weight, std=0.2)
    finally:
        torch.random.set_rng_state(g)
    path = Path(path)
    unet.save_pretrained(str(path))
    if scheduler is not None:
        (path / "scheduler_config.json").write_text(json.dumps(scheduler))
    return path


def sample_cli(src, out, *extra, expect=0, flag="--export"):
    from latentdiff.cli.sample import main

    rc = main([flag, str(src), "--out", str(out), "--no-progress", *map(str, extra)])
    assert rc == expect
    return json.loads((Path(out) / "sampling.json").read_text()) if rc == 0 else None


def png_bytes(out):
    return {p.name: p.read_bytes() for p in sorted((Path(out) / "images").glob("*.png"))}


def png_array(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), json.loads(im.text["latentdiff"])


# ----------------------------------------------------------------------------------------------
# parsing


def test_parse_seeds_and_sigma_max_choices():
    from latentdiff.diffusion.grids import EDM_SIGMA_MAX
    from latentdiff.sampling.options import resolve_sigma_max
    from latentdiff.sampling.run import parse_seeds

    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("7, 3,10-11") == [7, 3, 10, 11]
    assert parse_seeds(5) == [5] and parse_seeds([2, 1]) == [2, 1]
    for bad in ("", "5-3", "1,1", "-2", "3-", "a", "1-2-3", "0-2,2"):
        with pytest.raises(SampleError):
            parse_seeds(bad)
    data = 3.25  # an export's schedule.sigma_max
    assert resolve_sigma_max("data", data) == 3.25
    assert resolve_sigma_max("edm", data) == EDM_SIGMA_MAX == 80.0
    # VP: sigma(t=1) = sqrt(exp(beta_d / 2 + beta_min) - 1) with beta_d = 19.9, beta_min = 0.1 (edm.txt Table 1)
    assert math.isclose(resolve_sigma_max("vp", data), math.sqrt(math.exp(19.9 / 2 + 0.1) - 1), rel_tol=1e-12)
    assert resolve_sigma_max("2.5", None) == 2.5
    for bad in ("0", "-1", "inf", "nan", "big"):
        with pytest.raises(SampleError):
            resolve_sigma_max(bad, data)
    with pytest.raises(SampleError, match="sigma_max"):
        resolve_sigma_max("data", None)  # a model without a data-driven value


# ----------------------------------------------------------------------------------------------
# the CLI on a real trainer export


def test_exact_count_lossless_png_and_npz(real_export, tmp_path):
    """T19: exactly the requested images (7 seeds, batch 3: no rounding), PNG == npz, FID reads the set."""
    from latentdiff.metrics.image_sources import open_samples

    out = tmp_path / "s"
    res = sample_cli(real_export, out, "--seeds", "0-6", "--batch", 3, "--nfe", 7, "--grid", 4)
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{s:06d}.png" for s in range(7)]
    with np.load(out / "samples.npz") as z:
        arr, seeds, labels = z["arr_0"], z["seeds"], z["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (7, 32, 32, 3)
    assert seeds.tolist() == list(range(7))
    for i in range(7):
        a, text = png_array(out / "images" / f"{i:06d}.png")
        assert np.array_equal(a, arr[i]) and text["seed"] == i and text["label"] == labels[i]
    # the labels are the ones each seed's generator draws after its noise
    for s in range(7):
        g = torch.Generator().manual_seed(s)
        torch.randn((4, 16, 16), generator=g)
        assert int(torch.randint(3, (), generator=g)) == labels[s]
    assert (out / "grid.png").is_file() and not list(out.rglob("*.jp*g"))
    assert res["num_images"] == 7 and res["seeds"] == "0-6" and res["network_batch"] == 3
    for key in ("seeds", "solver", "nfe_used", "cfg", "guidance_interval", "ema_profile", "vae_decode_precision",
                "export_hash"):
        assert key in res, key
    assert res["ema_profile"] == "ema-0.999" and res["vae_decode_precision"] == "fp32" and res["vae_tiling"] is False
    from latentdiff.contracts.export import export_hash

    assert res["export_hash"] == export_hash(real_export)
    src, sampling, _ = open_samples(out)  # the FID stage's reader: npz + seeds + sampling.json
    assert len(src) == 7 and src.seeds.tolist() == list(range(7)) and sampling.nfe_used == res["nfe_used"]


def test_identical_across_batch_sizes_and_padding(real_export, loaded, tmp_path):
    """Same seeds, different --batch / --decode-batch -> the same PNG bytes on any CPU (the solver, network
    and VAE always run on micro-batches of --micro-batch rows); padding leaves real rows unchanged."""
    import torch.backends.cpu

    from latentdiff.solvers.generate import generate_latents

    ref = None
    for batch, dec in ((3, 8), (7, 2), (4, 5), (1, 1)):
        out = tmp_path / f"b{batch}"
        res = sample_cli(real_export, out, "--seeds", "0-6", "--batch", batch, "--decode-batch", dec, "--nfe", 7,
                         "--grid", 0, "--micro-batch", 4)
        b = png_bytes(out)
        assert len(b) == 7
        if ref is None:
            ref = b
        assert b == ref, f"--batch {batch} --decode-batch {dec} changed the images"
        # the fixed shape and the kernel settings are recorded
        assert res["micro_batch"] == 4 and res["intra_op_threads"] == torch.get_num_threads()
        assert res["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    den, meta = loaded
    kw = dict(num_classes=3, method="nfe-guided", nfe=5, sigma_max=meta.schedule.sigma_max)
    full, _ = generate_latents(den, [0, 1, 2, 3, 4], (4, 16, 16), **kw)
    part, info = generate_latents(den, [3, 1], (4, 16, 16), pad_to=5, **kw)
    assert info.extra["rows"] == 5 and part.shape[0] == 2
    assert torch.equal(part, full[[3, 1]])


def test_resume_redoes_only_missing_or_corrupt(real_export, tmp_path, capsys):
    out = tmp_path / "s"
    sample_cli(real_export, out, "--seeds", "0-7", "--batch", 3, "--nfe", 7)
    ref = png_bytes(out)
    npz_ref = np.load(out / "samples.npz")["arr_0"]
    imgs = out / "images"
    (imgs / "000002.png").unlink()
    (imgs / "000006.png").unlink()
    data = (imgs / "000004.png").read_bytes()
    (imgs / "000004.png").write_bytes(data[: len(data) // 2])  # a truncated write
    d5 = (imgs / "000005.png").read_bytes()
    mid = len(d5) // 2  # inside the image data: only the chunk CRC can tell
    (imgs / "000005.png").write_bytes(d5[:mid] + bytes([d5[mid] ^ 0x10]) + d5[mid + 1 :])
    keep = {n: (imgs / n).stat().st_mtime_ns for n in ref if n not in ("000002.png", "000004.png", "000005.png", "000006.png")}
    res = sample_cli(real_export, out, "--seeds", "0-7", "--batch", 3, "--nfe", 7)
    assert res["generated_this_run"] == 4
    assert png_bytes(out) == ref
    assert {n: (imgs / n).stat().st_mtime_ns for n in keep} == keep  # untouched files were not rewritten
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], npz_ref)
    # nothing left to do: still a complete record
    res = sample_cli(real_export, out, "--seeds", "0-7", "--batch", 3, "--nfe", 7)
    assert res["generated_this_run"] == 0 and res["nfe_used"] == 7 and png_bytes(out) == ref
    # another --batch / --decode-batch resumes silently (they only group the fixed-shape micro-batches) ...
    capsys.readouterr()
    (imgs / "000001.png").unlink()
    sample_cli(real_export, out, "--seeds", "0-7", "--batch", 5, "--decode-batch", 3, "--nfe", 7)
    assert "warning" not in capsys.readouterr().err and png_bytes(out) == ref
    # ... another micro-batch (another kernel shape) would mix two sample sets: refused
    sample_cli(real_export, out, "--seeds", "0-7", "--nfe", 7, "--micro-batch", 2, expect=2)
    assert "micro_batch: 8 -> 2" in capsys.readouterr().err
    # another solver / NFE / guidance would mix two sample sets: refused, nothing touched
    for extra in (["--nfe", 9], ["--solver", "heun"], ["--sigma-max", "edm"], ["--cfg", 2]):
        sample_cli(real_export, out, "--seeds", "0-7", *extra, expect=2)
        assert "different configuration" in capsys.readouterr().err
    assert png_bytes(out) == ref
    # a folder of foreign PNGs is not adopted
    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    shutil.copy(imgs / "000000.png", foreign / "images" / "000000.png")
    sample_cli(real_export, foreign, "--seeds", "0-1", expect=2)
    assert "config.json is missing" in capsys.readouterr().err


def _counting_load_export(monkeypatch, counter):
    import latentdiff.sampling.source as ex

    real = ex.load_export

    def wrapped(*a, **k):
        den, meta = real(*a, **k)

        def hook(module, args):
            counter.append(int(args[0].shape[0]))

        den.model.register_forward_pre_hook(hook)
        return den, meta

    monkeypatch.setattr(ex, "load_export", wrapped)


def test_nfe_reported_equals_counted_calls_and_sigma_grid(real_export, tmp_path, monkeypatch):
    """T16: nfe_used == real network forwards; grid strictly decreasing, one final 0, sigma_max/min hit exactly."""
    from latentdiff.solvers import SAMPLERS

    calls: list[int] = []
    _counting_load_export(monkeypatch, calls)
    cases = [("euler", ["--nfe", 6]), ("heun", ["--nfe", 7]), ("midpoint", ["--nfe", 8]), ("ode3", ["--nfe", 10]),
             ("nfe-guided", ["--nfe", 7]), ("nfe-guided", ["--nfe", 12]), ("edm-stochastic", ["--nfe", 7, "--s-churn", 10]),
             ("hybrid", ["--steps", 4, "--num-ode3", 2]), ("heun", ["--steps", 3])]
    if "auto" in SAMPLERS:
        cases.append(("auto", ["--nfe", 9]))
    cases += [("dpm-2m", ["--nfe", 7]), ("dpm-3m", ["--steps", 6])]
    for i, (solver, extra) in enumerate(cases):
        calls.clear()
        res = sample_cli(real_export, tmp_path / f"s{i}", "--seeds", "0-1", "--micro-batch", 2, "--solver", solver,
                         *extra, "--grid", 0, "--no-npz")
        assert len(calls) == res["nfe_used"] == len(res["eval_sigmas"]), (solver, extra, calls, res["nfe_used"])
        assert set(calls) == {2}  # one forward of the fixed-size micro-batch per denoiser call
        if "--nfe" in extra:
            assert res["nfe_used"] <= extra[extra.index("--nfe") + 1]
        g = res["sigma_grid"]
        if solver.startswith("dpm-"):  # diffusers builds its grid in float32: recorded as the scheduler used it
            assert g[0] == pytest.approx(res["sigma_max"], rel=1e-6) and g[-2] == pytest.approx(0.002, rel=1e-6)
            assert g[-1] == 0.0 and res["sigma_min"] == 0.002
        else:
            assert g[0] == res["sigma_max"] and g[-1] == 0.0 and g[-2] == res["sigma_min"] == 0.002
        assert all(a > b for a, b in zip(g, g[1:])), g  # strictly decreasing: no duplicated terminal sigma
        assert g.count(0.0) == 1 and all(s > 0 for s in res["eval_sigmas"])
    res = sample_cli(real_export, tmp_path / "plan", "--seeds", "0", "--solver", "nfe-guided", "--nfe", 7, "--grid", 0,
                     "--no-npz")
    assert res["plan"]["steps"] + 1 == len(res["sigma_grid"])
    # a second micro-batch repeats the same plan: forwards = micro-batches x NFE
    calls.clear()
    res = sample_cli(real_export, tmp_path / "two", "--seeds", "0-2", "--micro-batch", 2, "--nfe", 5, "--grid", 0)
    assert calls == [2] * (2 * res["nfe_used"])
    # impossible settings are refused before any work
    for extra, msg in ((["--solver", "hybrid"], "steps"), (["--solver", "nfe-guided", "--steps", 4], "nfe"),
                       (["--solver", "euler", "--num-ode3", 1], "hybrid"), (["--solver", "heun", "--s-churn", 1], "edm-stochastic"),
                       (["--nfe", 0], "nfe"), (["--batch", 0], "batch")):
        sample_cli(real_export, tmp_path / "bad", "--seeds", "0", *extra, expect=2)


def test_sigma_max_choice_reaches_the_grid(real_export, tmp_path, loaded):
    from latentdiff.diffusion.grids import VP_SIGMA_MAX

    _, meta = loaded
    for choice, want in (("data", meta.schedule.sigma_max), ("edm", 80.0), ("vp", VP_SIGMA_MAX), ("2.5", 2.5)):
        res = sample_cli(real_export, tmp_path / choice, "--seeds", "0", "--nfe", 3, "--sigma-max", choice, "--grid", 0)
        assert res["sigma_grid"][0] == want and res["sigma_max"] == want and res["sigma_max_choice"] == choice
    for bad in ("0.001", "abc", "-3"):  # below sigma_min / not a choice / not positive
        sample_cli(real_export, tmp_path / "bad", "--seeds", "0", "--sigma-max", bad, expect=2)


def test_cfg_scale_one_is_the_conditional_model(real_export, loaded, tmp_path, monkeypatch):
    """T15: w = 1 is exactly the conditional model; w != 1 is recorded, runs 2x rows inside the interval only."""
    from latentdiff.diffusion.guidance import guided_denoiser
    from latentdiff.vae.decode import decode_to_uint8, load_vae_for
    from latentdiff.solvers import sample

    den, meta = loaded
    nfe_guided = ("--solver", "nfe-guided", "--micro-batch", 3)  # the 3 seeds are one solver run
    base = sample_cli(real_export, tmp_path / "w1", "--seeds", "0-2", "--nfe", 5, "--grid", 0, *nfe_guided)
    with np.load(tmp_path / "w1" / "samples.npz") as z:
        img1, labels = z["arr_0"], torch.from_numpy(z["arr_1"])
    # by hand: the same noise, the conditional model alone, then the same decode
    noise = torch.stack([torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)])
    sm = meta.schedule.sigma_max
    for denoise in (lambda x, s: den(x, s, labels), guided_denoiser(den, labels, scale=1.0)):
        z0 = sample(denoise, noise, method="nfe-guided", nfe=5, sigma_min=0.002, sigma_max=sm)
        img = decode_to_uint8(z0, meta.normalization, autoencoder=load_vae_for(meta.vae), batch_size=3)
        assert np.array_equal(img.permute(0, 2, 3, 1).numpy(), img1)
    # guidance outside every sigma of the grid: identical to w = 1
    sample_cli(real_export, tmp_path / "wout", "--seeds", "0-2", "--nfe", 5, "--cfg", 3, "--guidance-interval", "100,200",
               "--grid", 0, *nfe_guided)
    assert png_bytes(tmp_path / "wout") == png_bytes(tmp_path / "w1")
    calls: list[int] = []
    _counting_load_export(monkeypatch, calls)
    res = sample_cli(real_export, tmp_path / "w3", "--seeds", "0-2", "--nfe", 5, "--cfg", 3, "--guidance-interval",
                     "0.1,1.0", "--grid", 0, *nfe_guided)
    assert res["cfg"] == 3.0 and res["guidance_interval"] == [0.1, 1.0] and res["nfe_used"] == base["nfe_used"]
    inside = [0.1 <= s <= 1.0 for s in res["eval_sigmas"]]
    assert any(inside) and not all(inside)
    assert calls == [6 if k else 3 for k in inside]  # cond + uncond rows only where guided
    assert res["network_evals_per_image"] == len(inside) + sum(inside)
    assert png_bytes(tmp_path / "w3") != png_bytes(tmp_path / "w1")
    with np.load(tmp_path / "w3" / "samples.npz") as z:
        assert np.array_equal(z["arr_1"], labels.numpy())  # the same classes, guided
    # a per-image sigma grid (auto) with an interval: both halves always run, so the forward shape is fixed
    from latentdiff.solvers.registry import FIXED_GRID_SAMPLERS as FIXED_GRID_SOLVERS
    from latentdiff.solvers import SAMPLERS

    adaptive = [m for m in SAMPLERS if m not in FIXED_GRID_SOLVERS]
    for m in adaptive:
        ref = None
        for batch in (3, 2):
            calls.clear()
            out = tmp_path / f"{m}{batch}"
            res = sample_cli(real_export, out, "--seeds", "0-2", "--nfe", 7, "--cfg", 2, "--guidance-interval", "0.1,1.0",
                             "--solver", m, "--batch", batch, "--micro-batch", 3, "--grid", 0)
            assert set(calls) == {2 * 3} and res["network_evals_per_image"] == 2 * res["nfe_used"]
            assert res["sigma_grid_per_image"] and res["sigma_grid_seed"] == 0
            ref = ref or png_bytes(out)
            assert png_bytes(out) == ref
    res = sample_cli(real_export, tmp_path / "cl", "--seeds", "0-1", "--nfe", 3, "--class-label", 2, "--grid", 0)
    with np.load(tmp_path / "cl" / "samples.npz") as z:
        assert z["arr_1"].tolist() == [2, 2]
    sample_cli(real_export, tmp_path / "bad", "--seeds", "0", "--class-label", 3, expect=2)
    sample_cli(real_export, tmp_path / "bad", "--seeds", "0", "--cfg", 2, "--guidance-interval", "2,1", expect=2)


# ----------------------------------------------------------------------------------------------
# decode


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def test_decode_applies_the_exact_inverse_normalization(tiny_dataset, loaded):
    """T1: image -> VAE mean -> export normalization -> decode_to_uint8 == the VAE's own reconstruction."""
    from latentdiff.vae.autoencoder import Autoencoder
    from latentdiff.vae.normalization import Normalization
    from latentdiff.data.photos import random_crops
    from latentdiff.vae.decode import decode_to_uint8, load_vae_for, to_uint8

    _, meta = loaded
    ae = load_vae_for(meta.vae)
    assert isinstance(ae, Autoencoder) and ae.weights_sha256 == meta.vae["weights_sha256"]
    images = random_crops(5, 32, seed=3)[0].float()
    mean, _ = ae.encode(images)
    norm = meta.normalization
    assert norm.kind == "channel" and len(set(norm.scale)) == 4  # a per-channel map: a swap is visible
    z = norm.to_model(mean)
    recon = to_uint8(ae.decode(mean))
    out = decode_to_uint8(z, meta.normalization, meta.vae)  # loads the VAE named in the export
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 32, 32)
    assert (out.int() - recon.int()).abs().max() <= 1 and (out == recon).float().mean() > 0.999
    assert _psnr(out, recon) > 60
    assert torch.equal(decode_to_uint8(z, norm, autoencoder=ae, batch_size=2), decode_to_uint8(z, norm, autoencoder=ae, batch_size=2))
    # swapped / wrong metadata: far from the reconstruction
    perm = Normalization(norm.kind, norm.shift[::-1], norm.scale[::-1], norm.target_std)
    sd = Normalization.sd(meta.vae)
    shift_only = Normalization(norm.kind, [0.0] * 4, norm.scale, norm.target_std)
    for wrong in (perm, sd, shift_only):
        bad = decode_to_uint8(z, wrong, autoencoder=ae)
        assert _psnr(bad, recon) < _psnr(out, recon) - 25, wrong
    with pytest.raises(SampleError, match="channels"):
        decode_to_uint8(z[:, :3], norm, autoencoder=ae)


# ----------------------------------------------------------------------------------------------
# refusing broken exports and a different VAE


def test_decode_is_untiled_fp32_outside_autocast_even_if_the_caller_enabled_tiling(tiny_dataset, loaded):
    """T20: the VAE object itself decodes whole images in fp32 with autocast off -- checked inside its
    forward, with tiling and slicing switched on by the caller and a bf16 autocast around the call."""
    from latentdiff.vae.decode import decode_to_uint8, load_vae_for

    _, meta = loaded
    ae = load_vae_for(meta.vae)
    norm = meta.normalization
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    reference = decode_to_uint8(z, norm, autoencoder=ae)

    vae = ae.vae
    vae.enable_tiling()
    vae.enable_slicing()
    vae.tile_latent_min_size = 4  # 16x16 latents would be cut into tiles
    vae.tile_sample_min_size = 8
    seen = []
    vae.tiled_decode = lambda *a, **k: seen.append("tiled_decode") or pytest.fail("tiled decode was used")

    def inside(module, args):
        seen.append((args[0].dtype, args[0].shape[0], torch.is_autocast_enabled("cpu"),
                     {p.dtype for p in module.parameters()}))

    hook = vae.decoder.register_forward_pre_hook(inside)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = decode_to_uint8(z, norm, autoencoder=ae)
    finally:
        hook.remove()
    assert seen == [(torch.float32, 3, False, {torch.float32})]  # one whole-batch, whole-image fp32 forward
    assert vae.use_tiling is False and vae.use_slicing is False
    assert torch.equal(out, reference)


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of export ``src`` at ``dst`` whose model.json went through ``edit(dict)``."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "model.json").read_text())
    edit(meta)
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


def _drop(path):
    def f(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return f


def _set(path, value):
    def f(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value(d.get(path[-1])) if callable(value) else value
    return f


def _both(*fs):
    def f(m):
        for g in fs:
            g(m)
    return f


def _refused(d, out, needle, capsys):
    sample_cli(d, out, "--seeds", "0", "--nfe", 3, expect=2)
    err = capsys.readouterr().err
    assert "latentdiff-sample:" in err and needle in err, (needle, err)
    assert not (out / "images").exists() or not list((out / "images").iterdir())
    return err


def test_refuses_inconsistent_export_metadata_and_other_vae(real_export, tmp_path, capsys):
    """T14: the sampler refuses an export whose schedule / normalization / VAE / classes do not fit together."""
    from latentdiff.data.synthetic import make_tiny_vae

    norm = ["schedule", "normalization"]
    cases = {
        "no_sigma_max": (_drop(["schedule", "sigma_max"]), "sigma_max"),
        "no_normalization": (_drop(norm), "normalization"),
        "norm_3_channels": (_both(_set([*norm, "scale"], lambda v: v[:3]), _set([*norm, "shift"], lambda v: v[:3])),
                            "channels"),
        "model_3_channels": (_set(["model", "in_channels"], 3), "channels"),
        "vae_8_channels": (_set(["vae", "latent_channels"], 8), "latent channels"),
        "sigma_data": (_set(["precond", "sigma_data"], 0.7), "sigma_data"),  # stored once, in the schedule
        "bad_sigma_data": (_set(["schedule", "sigma_data"], -1.0), "sigma_data"),
        "sigma_max_vs_rule": (_set(["schedule", "sigma_max"], lambda v: v * 1.5), "sigma_max_rule"),
        "norm_twice": (lambda m: m.update(normalization=m["schedule"]["normalization"]), "stored once"),
        "sample_shape": (_set(["dataset", "sample_shape"], [4, 8, 8]), "sample_shape"),
        "null_label": (_set(["model", "null_label"], 7), "null"),
        "vae_hash": (_set(["vae", "weights_sha256"], "0" * 64), "sha256"),
        "sd_scale": (_set([*norm, "kind"], "sd"), "scaling_factor"),
    }
    for name, (edit, needle) in cases.items():
        _refused(_edited_copy(real_export, tmp_path / name, edit), tmp_path / f"out_{name}", needle, capsys)
    # the same VAE architecture with other weights, passed with --vae: refused by its sha256
    other = make_tiny_vae(tmp_path / "other_vae", seed=1)
    sample_cli(real_export, tmp_path / "o", "--seeds", "0", "--nfe", 3, "--vae", other, expect=2)
    err = capsys.readouterr().err
    assert "sha256" in err and "vae.weights_sha256" in err
    # a copy of the right weights elsewhere is accepted
    meta = json.loads((real_export / "model.json").read_text())
    shutil.copytree(meta["vae"]["id"], tmp_path / "vae_copy")
    sample_cli(real_export, tmp_path / "ok", "--seeds", "0", "--nfe", 3, "--vae", tmp_path / "vae_copy", "--grid", 0)


# the top-level fields of model.json as latentdiff-export wrote them before format_version 2
V1_FIELDS = ["checkpoint", "dataset", "format", "format_version", "images_seen", "label_dropout", "model",
             "normalization", "null_label", "num_classes", "precond", "schedule", "step", "train_config", "vae",
             "weights"]


def _as_v1(m: dict) -> None:
    """model.json as the format_version 1 exporter wrote it: normalization, sigma_data, the classes and the
    VAE stored twice, the label dropout beside the training config, and EDM's sigma_max constant."""
    m["format_version"] = 1
    m["normalization"] = m["schedule"]["normalization"]
    m["precond"]["sigma_data"] = m["schedule"]["sigma_data"]
    m["num_classes"] = m["model"]["num_classes"]
    m["null_label"] = m["model"]["null_label"]
    m["dataset"]["vae"] = m["vae"]
    m["label_dropout"] = m["train_config"]["label_dropout"]
    m["schedule"]["sigma_max_edm"] = 80.0
    assert sorted(m) == V1_FIELDS


def test_format_version_1_exports_load_or_are_refused_with_the_fix(real_export, tmp_path, capsys):
    """An export written before model.json stored each value once still samples the same images; one
    whose two copies of a value disagree is refused with the command that re-exports it."""
    from latentdiff.contracts.export import ExportMeta

    v1 = _edited_copy(real_export, tmp_path / "v1", _as_v1)
    assert ExportMeta.read(v1).to_dict() == ExportMeta.read(real_export).to_dict()
    sample_cli(real_export, tmp_path / "s2", "--seeds", "0-2", "--nfe", 5, "--grid", 0)
    res = sample_cli(v1, tmp_path / "s1", "--seeds", "0-2", "--nfe", 5, "--grid", 0)
    assert png_bytes(tmp_path / "s1") == png_bytes(tmp_path / "s2") and res["ema_profile"] == "ema-0.999"
    cases = {
        "norm_disagrees": (_set(["normalization", "scale"], lambda v: [s * 2 for s in v]), "disagrees"),
        "sigma_data": (_set(["precond", "sigma_data"], 0.7), "sigma_data"),
        "null_label": (_set(["null_label"], 0), "null"),
        "num_classes": (_set(["num_classes"], 2), "num_classes"),
        "other_vae": (_set(["dataset", "vae"], "none"), "VAE"),
        "no_normalization": (_drop(["normalization"]), "normalization"),
    }
    for name, (edit, needle) in cases.items():
        err = _refused(_edited_copy(v1, tmp_path / name, edit), tmp_path / f"out_{name}", needle, capsys)
        assert "format_version 1" in err and "latentdiff-export RUN" in err, err


# ----------------------------------------------------------------------------------------------
# pretrained VP bridge


def test_vp_bridge_closed_form(tmp_path):
    """DiffusersEpsNet + VPPrecond: D(x; s) = x - s eps(x / sqrt(1 + s^2), 999 t(s)), t = sigma^-1 (edm.txt Table 1)."""
    from diffusers import UNet2DModel

    from latentdiff.models.diffusers_vp import load_diffusers_unet

    path = make_unet(tmp_path / "unet")
    den, meta = load_diffusers_unet(path)
    assert meta["shape"] == [3, 8, 8] and meta["vae"] == "none" and meta["scheduler"]["assumed"]["beta_end"] == 0.02
    ref = UNet2DModel.from_pretrained(str(path)).eval()
    seen = []
    den.model.unet.register_forward_pre_hook(lambda m, a: seen.append((a[0].clone(), a[1].clone())))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2
    sig = [0.01, 0.5, 3.0, 80.0]
    with torch.no_grad():
        d = den(x, torch.tensor(sig))
        for i, s in enumerate(sig):
            t = (math.sqrt(0.1**2 + 2 * 19.9 * math.log1p(s * s)) - 0.1) / 19.9  # sigma^-1 of the VP schedule
            x_in = x[i : i + 1] / math.sqrt(1 + s * s)
            eps = ref(x_in, torch.tensor([999 * t], dtype=torch.float32)).sample
            assert eps.abs().mean() > 0.05
            want = x[i : i + 1] - s * eps
            torch.testing.assert_close(d[i : i + 1], want, rtol=1e-5, atol=1e-5 * max(1.0, s))
            torch.testing.assert_close(seen[0][1][i].double(), torch.tensor(999 * t, dtype=torch.float64), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(seen[0][0][i : i + 1], x_in, rtol=1e-6, atol=1e-7)


def test_vp_bridge_cli_and_schedule_checks(tmp_path, capsys):
    from latentdiff.diffusion.grids import VP_SIGMA_MAX
    from latentdiff.solvers import plan_nfe

    path = make_unet(tmp_path / "unet")
    out = tmp_path / "s"
    res = sample_cli(path, out, "--seeds", "0-4", "--batch", 2, "--solver", "nfe-guided", "--nfe", 9, flag="--diffusers-unet")
    assert res["source_kind"] == "diffusers-unet" and res["sigma_max"] == VP_SIGMA_MAX
    assert res["nfe_used"] == plan_nfe(9, 0.002, VP_SIGMA_MAX).evaluations <= 9
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (5, 8, 8, 3) and "arr_1" not in z
        assert z["arr_0"].std() > 1  # not a constant image
    again = tmp_path / "again"
    sample_cli(path, again, "--seeds", "3,4", "--batch", 2, "--solver", "nfe-guided", "--nfe", 9, flag="--diffusers-unet")
    assert png_bytes(again) == {k: v for k, v in png_bytes(out).items() if k in ("000003.png", "000004.png")}
    # a class-conditional UNet samples at w = 1 (its labels drawn per seed); guidance is refused (no null class)
    cond = make_unet(tmp_path / "cond", num_class_embeds=5)
    res = sample_cli(cond, tmp_path / "c", "--seeds", "0-1", "--nfe", 5, "--batch", 2, flag="--diffusers-unet")
    with np.load(tmp_path / "c" / "samples.npz") as z:
        assert all(0 <= v < 5 for v in z["arr_1"].tolist())
    sample_cli(cond, tmp_path / "g", "--seeds", "0", "--cfg", 2, expect=2, flag="--diffusers-unet")
    # a pipeline folder with a DDPM linear scheduler is fine; other schedules / predictions are refused
    pipe = tmp_path / "pipe"
    shutil.copytree(path, pipe / "unet")
    (pipe / "scheduler").mkdir()
    ok = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
          "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(ok))
    sample_cli(pipe, tmp_path / "p", "--seeds", "0", "--nfe", 5, "--grid", 0, flag="--diffusers-unet")
    capsys.readouterr()
    for bad in ({"beta_schedule": "squaredcos_cap_v2"}, {"prediction_type": "v_prediction"}, {"beta_end": 0.012}):
        (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({**ok, **bad}))
        sample_cli(pipe, tmp_path / "p2", "--seeds", "0", "--nfe", 5, expect=2, flag="--diffusers-unet")
        assert list(bad)[0] in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# multi-process


@pytest.mark.slow
def test_one_vs_two_ranks_identical(real_export, tmp_path):
    """torchrun with 2 gloo ranks (uneven split: 7 seeds) writes the same PNG bytes and npz as 1 rank.

    Both runs go through torchrun, which sets OMP_NUM_THREADS=1 per rank: on the CPU the intra-op
    thread count can change a kernel's summation order (a one-rank in-process run with 2 threads
    differed from the 2-rank run in the last bit of one pixel on a CI machine)."""
    runs = {}
    for n in (1, 2):
        runs[n] = tmp_path / f"world{n}"
        p = _run(["-m", "torch.distributed.run", "--nproc_per_node", n, "--master_port", _free_port(), "-m",
                  "latentdiff.sample", "--export", real_export, "--out", runs[n], "--seeds", "0-6", "--batch", 3,
                  "--nfe", 7, "--solver", "edm-stochastic", "--s-churn", 5, "--no-progress"])
        assert "wrote 7 images" in p.stdout
    one, two = runs[1], runs[2]
    assert png_bytes(two) == png_bytes(one) and len(png_bytes(one)) == 7
    a, b = np.load(one / "samples.npz"), np.load(two / "samples.npz")
    assert all(np.array_equal(a[k], b[k]) for k in ("arr_0", "arr_1", "seeds"))
    s1, s2 = (json.loads((d / "sampling.json").read_text()) for d in (one, two))
    assert s2["world_size"] == 2 and s1["nfe_used"] == s2["nfe_used"] and s1["sigma_grid"] == s2["sigma_grid"]
    assert s1["intra_op_threads"] == s2["intra_op_threads"] == 1


# ----------------------------------------------------------------------------------------------
# the benchmark tools run end to end on small settings


def test_sampler_study_and_overhead_tools(real_export, tmp_path):
    study = tmp_path / "study"
    p = _run(["tools/bench/sampler_study.py", "--export", real_export, "--num", 12, "--nfe", 3, 5, "--sigma-max", "data",
              "edm", "--solvers", "Euler", "NFE-guided", "DPM-Solver++ 2M", "--ref-steps", 8, "--proj-dim", 8,
              "--fid", "off", "--out", study])
    res = json.loads((study / "study.json").read_text())
    rows = [r for r in res["rows"] if "fd_lat" in r]
    assert len(rows) == 2 * 3 * 2 and {r["solver"] for r in rows} == {"Euler", "NFE-guided", "DPM-Solver++ 2M"}
    assert all(r["nfe_used"] <= r["nfe"] and r["fd_lat"] >= 0 and math.isfinite(r["rms_to_ode"]) for r in rows)
    assert res["sigma_max"]["edm"]["value"] == 80.0 and res["sigma_max"]["data"]["value"] < 80.0
    md = (study / "study.md").read_text()
    assert "NOT FID" in md and "| NFE-guided |" in md and "NOT FID" in p.stdout
    assert (study / "study.png").stat().st_size > 10_000
    out = tmp_path / "overhead"
    p = _run(["tools/bench/sampler_overhead.py", "--repeats", 1, "--nfe", 5, "--batch", 4, "--pipeline-images", 6,
              "--solvers", "euler", "nfe-guided", "--out", out])
    res = json.loads((out / "results.json").read_text())
    assert [r["nfe_used"] for r in res["overhead"]] == [5, 5]
    assert all(0.5 < r["ratio_cpu"]["median"] < 2.0 for r in res["overhead"])
    assert res["pipeline"]["images"] == 6 and res["pipeline"]["images_per_second_loop"] > 0
    assert "goal <= 1.03" in p.stdout
    # issues 5 and 18: every solver x schedule against a converged float64 reference on the trained model
    out = tmp_path / "trained"
    cmd = ["tools/bench/sampler_trained.py", "--export", real_export, "--name", "net", "--samples", 3, "--noise-seeds", 0, 1,
           "--ref-steps", 48, "--nfe", 5, 13, "--solvers", "heun", "ipndm", "--schedules", "karras", "gits",
           "--gits-warmup", 4, "--gits-fine", 14, "--out", out]
    _run(cmd)
    res = json.loads((out / "net" / "results.json").read_text())
    ipndm = res["summary"]["ipndm / gits"]["rms"]
    assert set(res["summary"]) == {"heun / karras", "heun / gits", "ipndm / karras", "ipndm / gits"}
    assert ipndm["13"][0] < ipndm["5"][0] and ipndm["13"][2] == 2  # converges towards the reference; two seeds
    assert all(r["rms_vs_half_steps"] < 0.5 * ipndm["5"][0] for r in res["references"].values())
    assert "| ipndm / gits |" in (out / "net" / "table.md").read_text() and (out / "net" / "error_vs_nfe.png").exists()
    lines = (out / "net" / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 16
    p = _run(cmd)  # resumable: finished cells are skipped
    assert (out / "net" / "cells.jsonl").read_text().splitlines() == lines and "rms" not in p.stdout


def test_record_reads_the_decode_settings_from_the_autoencoder(real_export, tmp_path, monkeypatch):
    """sampling.json's vae_decode_precision / vae_tiling are what the autoencoder reports, not literals."""
    from latentdiff.vae.autoencoder import Autoencoder

    res = sample_cli(real_export, tmp_path / "real", "--seeds", "0", "--nfe", 3, "--grid", 0)
    assert (res["vae_decode_precision"], res["vae_tiling"]) == ("fp32", False)
    monkeypatch.setattr(Autoencoder, "decode_precision", property(lambda self: "bf16"))
    monkeypatch.setattr(Autoencoder, "tiling", property(lambda self: True))
    res = sample_cli(real_export, tmp_path / "patched", "--seeds", "0", "--nfe", 3, "--grid", 0)
    assert (res["vae_decode_precision"], res["vae_tiling"]) == ("bf16", True)


def test_sample_config_from_yaml_and_flags_with_help(tmp_path):
    """SampleConfig: YAML, then flags; every field's flag has its help text; options only when given."""
    from latentdiff.cli.sample import build_parser
    from latentdiff.sampling.config import SampleConfig
    from latentdiff.utils.config import config_from_args
    from latentdiff.utils.errors import ConfigError

    y = tmp_path / "sample.yaml"
    y.write_text("solver: edm-stochastic\nnfe: 9\nno_npz: true\nseeds: 0-3\ns_churn: 5\n")
    cfg = config_from_args(SampleConfig, build_parser().parse_args(["--config", str(y), "--nfe", "11", "--no-progress"]))
    assert (cfg.solver, cfg.nfe, cfg.no_npz, cfg.no_progress, cfg.seeds) == ("edm-stochastic", 11, True, True, "0-3")
    assert cfg.steps is None and cfg.solver_options() == {"s_churn": 5.0}
    text = build_parser().format_help()
    for flag, words in (("--decode-batch", "latents handed to the VAE"), ("--micro-batch", "fixed kernel shapes"), ("--h-tau", "Algorithm 1"), ("--no-npz", "samples.npz")):
        assert flag in text and words in text
    y.write_text("solvr: heun\n")
    with pytest.raises(ConfigError, match="solver"):
        config_from_args(SampleConfig, build_parser().parse_args(["--config", str(y)]))
    with pytest.raises(SampleError, match="s_churn"):  # an option the solver does not use is refused
        SampleConfig(export="e", out="o", solver="heun", s_churn=1.0).validate()


def test_resume_with_other_kernel_settings_warns_and_another_shape_is_refused(tmp_path):
    """The output directory's fingerprint: the thread count / SIMD level only warn (same shapes, possibly
    other rounding), the micro-batch shape is part of what determines the pixels."""
    from latentdiff.sampling.outdir import _compare

    old = {"solver": "auto", "micro_batch": 8, "intra_op_threads": 2, "cpu_capability": "AVX512"}
    error, notes = _compare(tmp_path, old, {**old, "intra_op_threads": 1, "cpu_capability": "AVX2"})
    assert error is None and len(notes) == 2 and all("round differently" in n for n in notes)
    error, _ = _compare(tmp_path, old, {**old, "micro_batch": 4})
    assert error and "micro_batch: 8 -> 4" in error
    assert _compare(tmp_path, old, dict(old)) == (None, [])


def test_schedule_flag_gits_cached_beside_the_export(real_export, tmp_path):
    """--schedule gits: the table is computed once into EXPORT/gits/, reused by the next run, recorded;
    --schedule log-uniform lands in solver_kwargs; auto refuses a schedule."""
    import shutil

    export = tmp_path / "export"
    shutil.copytree(real_export, export)
    flags = ["--solver", "ipndm", "--schedule", "gits", "--gits-warmup", 4, "--gits-fine", 9, "--nfe", 5, "--seeds", "0-1"]
    r1 = sample_cli(export, tmp_path / "a", *flags)
    r2 = sample_cli(export, tmp_path / "b", *flags)
    assert r1["solver_kwargs"] == {"schedule": "gits"} and not r1["gits"]["cached"] and r2["gits"]["cached"]
    assert r1["gits"]["file"] == r2["gits"]["file"] and r1["gits"]["file"].startswith(str(export / "gits"))
    assert r1["sigma_grid"] == r2["sigma_grid"] and len(r1["sigma_grid"]) == 6 and r1["nfe_used"] == 5
    assert r1["gits"]["key"]["gits"]["warmup"] == 4
    r3 = sample_cli(export, tmp_path / "c", "--solver", "unipc", "--schedule", "log-uniform", "--nfe", 5, "--seeds", "0")
    assert r3["solver_kwargs"] == {"schedule": "log-uniform"} and r3["gits"] is None
    sample_cli(export, tmp_path / "d", "--solver", "auto", "--schedule", "karras", "--seeds", "0", expect=2)
