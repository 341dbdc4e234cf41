"""Multi-process encoding: 2 ranks under torchrun == 1 rank; kill -9 + resume is exactly-once.

Batches are aligned with chunks (--batch-size = images per chunk) and every process uses one thread
(torchrun's default), so the VAE sees identical batches whatever the world size and the shards must
come out bit-identical -- a much stronger check than "same keys".
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.data.encode import EncodeConfig, encode_dataset
from latentdiff.contracts.manifest import load_manifest
from latentdiff.data.shards import iter_tar
from latentdiff.data.synthetic import make_tiny_vae, write_image_folder

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "encode_latents.py"
RES, CHUNK = 32, 4


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _args(src: Path, vae: Path, out: Path) -> list[str]:
    return ["--input", str(src), "--output", str(out), "--resolution", str(RES), "--vae", str(vae),
            "--shard-size", str(CHUNK), "--batch-size", str(CHUNK), "--workers", "1", "--no-progress"]


def _torchrun(nproc: int, script: Path, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    vae = make_tiny_vae(root / "vae")
    src = root / "imgs"
    write_image_folder(src, classes=3, per_class=14, size_range=(40, 80), seed=5)
    (src / "chelsea" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (src / "coffee" / "empty.jpg").write_bytes(b"")
    ref = root / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode_dataset(EncodeConfig(inputs=[str(src)], output=str(ref), resolution=RES, vae=str(vae), shard_size=CHUNK,
                                    batch_size=CHUNK, workers=1, progress=False, command=["ref"]))
    finally:
        torch.set_num_threads(threads)
    return root, src, vae, ref


def _keys(out: Path) -> list[str]:
    keys = []
    for s in load_manifest(out).shards:
        keys += [smp["__key__"] for smp in iter_tar(io.BytesIO((out / s.name).read_bytes()), s.name)]
    return keys


def _assert_same_dataset(out: Path, ref: Path):
    m, r = load_manifest(out), load_manifest(ref)
    assert _keys(out) == _keys(ref) and len(set(_keys(out))) == len(_keys(out))  # same keys, each once
    assert [(s.name, s.count, s.sha256) for s in m.shards] == [(s.name, s.count, s.sha256) for s in r.shards]
    for k in ("num_samples", "num_images", "class_names", "sample_shape", "shards_hash", "skipped_by_reason",
              "inputs", "listing_sha256", "num_listed"):
        assert getattr(m, k) == getattr(r, k), k
    # the run fingerprint (encode.json) is the same whatever the world size
    assert json.loads((out / "encode.json").read_text()) == json.loads((ref / "encode.json").read_text())
    with np.load(out / "stats.npz") as a, np.load(ref / "stats.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for f in a.files:
            np.testing.assert_array_equal(a[f], b[f], err_msg=f)  # exact: merged in shard order
    assert (out / "skipped.jsonl").read_text() == (ref / "skipped.jsonl").read_text()
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_two_ranks_under_torchrun_equal_one_rank(setup):
    root, src, vae, ref = setup
    out = root / "two"
    res = _torchrun(2, TOOL, _args(src, vae, out))
    assert "encoded 42 images -> 42 samples in 11 shards; skipped 2" in res.stdout
    _assert_same_dataset(out, ref)


def test_kill_dash_nine_then_resume_with_another_world_size_is_exactly_once(setup):
    root, src, vae, ref = setup
    out = root / "killed"
    proc = subprocess.Popen([sys.executable, str(TOOL), *_args(src, vae, out), "--batch-size", str(CHUNK)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list(out.glob("shard-*.stats.npz"))) >= 2:
                break
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    done_before = sorted(p.name for p in out.glob("shard-*.stats.npz"))
    assert 2 <= len(done_before) < 11, done_before  # killed mid-way
    assert not (out / "dataset.json").exists()
    survivors = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.tar")
                 if (out / p.name.replace(".tar", ".stats.npz")).exists()}
    # a stale partial file as a killed writer could leave behind
    (out / ".shard-000010.tar.tmp").write_bytes(b"partial")
    res = _torchrun(2, TOOL, _args(src, vae, out))
    assert f"({len(done_before)} of 11 chunks done by an earlier run)" in res.stdout
    _assert_same_dataset(out, ref)
    for name, ident in survivors.items():  # completed shards were not redone
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == ident


READER_SCRIPT = r'''
import json, sys, torch
from latentdiff.utils.dist import init_distributed, get_rank, get_world_size, destroy
import torch.distributed as dist
from latentdiff.data import make_loader
init_distributed()
loader, ds = make_loader(sys.argv[1], 2, num_workers=2, seed=3, epoch=1)
keys, n = [], 0
for mean, std, label, k in loader:
    keys += k
    n += 1
    t = torch.tensor([n], dtype=torch.float64)
gathered = [None] * get_world_size()
dist.all_gather_object(gathered, {"rank": get_rank(), "world": ds.world_size, "batches": n, "keys": keys,
                                  "expected": ds.batches_per_epoch()})
if get_rank() == 0:
    json.dump(gathered, open(sys.argv[2], "w"))
destroy()
'''


def test_reader_under_torchrun_two_ranks_two_workers(setup, tmp_path):
    root, src, vae, ref = setup
    script = tmp_path / "read.py"
    script.write_text(READER_SCRIPT)
    result = tmp_path / "keys.json"
    _torchrun(2, script, [str(ref), str(result)])
    got = json.loads(result.read_text())
    assert [g["rank"] for g in got] == [0, 1] and all(g["world"] == 2 for g in got)
    assert got[0]["batches"] == got[1]["batches"] == got[0]["expected"] > 0
    k0, k1 = set(got[0]["keys"]), set(got[1]["keys"])
    assert not k0 & k1 and len(k0) == len(got[0]["keys"]) and (k0 | k1) <= set(_keys(ref))
