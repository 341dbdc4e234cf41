"""Faults under a real launcher (torchrun, 2 ranks, gloo): an error on one rank ends the whole job at once;
ranks do not outlive their launcher."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
_port = [31700 + (os.getpid() % 200) * 5]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("LATENTDIFF_FAULT", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _train_cmd(dataset, run_dir, *extra):
    _port[0] += 1
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port[0]),
            "-m", "latentdiff.train", "--config", "tiny-cpu", "--dataset", str(dataset), "--run-dir", str(run_dir),
            "--heldout-batch", "0", "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json"), *map(str, extra)]


def _run_until_error(cmd, needle, tmp_path, *, after_s=120, start_s=900):
    """Run ``cmd`` in its own session; once ``needle`` (the error) is printed, the job must end within
    ``after_s`` -- a generous bound, far below the 30 min collective timeout a hang waits for.  (The time
    to reach the error is bounded separately: the first launch may compile a DeepSpeed op for minutes.)"""
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    t0, seen = time.monotonic(), None
    try:
        while p.poll() is None:
            now = time.monotonic()
            if seen is None and needle in log.read_text(errors="replace"):
                seen = now
            if now - (seen if seen is not None else t0) > (after_s if seen is not None else start_s):
                what = f"within {after_s} s of the error (hang)" if seen is not None else f"the error within {start_s} s"
                pytest.fail(f"the job did not end {what}:\n" + log.read_text(errors="replace")[-5000:])
            time.sleep(0.5)
    finally:
        _kill_tree(p.pid)
    return p.returncode, log.read_text(errors="replace")


def _kill_tree(pid):
    """SIGKILL ``pid`` and every descendant (ranks live in sessions of their own: killpg misses them)."""
    try:
        procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    for q in procs:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass


def _bad_count(src, dst):
    """Shard 1 counted 10 samples too many in dataset.json (stats.json rebound, so only the reader sees it)."""
    from latentdiff.contracts.manifest import load_manifest

    p = dst / "dataset.json"
    d = json.loads(p.read_text())
    d["shards"][1]["count"] += 10
    p.write_text(json.dumps(d))
    st = json.loads((dst / "stats.json").read_text())
    st["shards_hash"] = load_manifest(dst).shards_hash
    (dst / "stats.json").write_text(json.dumps(st))
    return f"{d['shards'][1]['name']} has 8 samples but dataset.json says 18"


def _bad_npy_header(src, dst):
    """A flipped byte in the .npy header of one sample of shard 3 (same size: the default check passes)."""
    p = dst / "shard-000003.tar"
    b = bytearray(p.read_bytes())
    j = b.index(b"descr", b.index(b"\x93NUMPY"))
    b[j + 1] ^= 0x20
    p.write_bytes(bytes(b))
    return "shard-000003.tar: sample"


def _truncated_shard(src, dst):
    """A shard cut short: every rank's start-up check (gathered) raises the same error, shown once."""
    p = dst / "shard-000004.tar"
    p.write_bytes(p.read_bytes()[:4096])
    return "disagree with"


@pytest.mark.slow
@pytest.mark.parametrize("fault", [_bad_count, _bad_npy_header, _truncated_shard],
                         ids=["shard-count", "npy-header", "truncated-every-rank"])
def test_an_error_on_one_rank_ends_the_job_within_seconds(tiny_dataset, tmp_path, fault):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    needle = fault(tiny_dataset, data)
    rc, text = _run_until_error(_train_cmd(data, tmp_path / "run"), needle, tmp_path)
    assert rc != 0, text[-3000:]
    lines = [line for line in text.splitlines() if needle in line]
    assert len(lines) == 1, f"the error should be shown once, got {len(lines)}:\n" + text[-4000:]
    assert "re-encode" in lines[0], lines[0]
    assert not re.search(r"\[rank\d\]: Traceback", text), text[-4000:]  # the other rank: one line, no traceback


@pytest.mark.slow
def test_ranks_exit_when_their_launcher_is_killed(tiny_dataset, tmp_path):
    """SIGKILL to the launcher's process group (the ranks live in sessions of their own): the ranks end."""
    log = tmp_path / "job.log"
    cmd = _train_cmd(tiny_dataset, tmp_path / "run", "--duration-images", 10**7, "--checkpoint-every", 10**6)
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    ranks = []
    try:
        t0 = time.monotonic()
        while "train:" not in log.read_text(errors="replace"):  # both ranks are past setup, training
            assert p.poll() is None and time.monotonic() - t0 < 600, log.read_text(errors="replace")[-4000:]
            time.sleep(0.5)
        ranks = [q for q in psutil.Process(p.pid).children(recursive=True) if "latentdiff.train" in " ".join(q.cmdline())]
        assert len(ranks) == 2 and all(os.getsid(q.pid) != os.getsid(p.pid) for q in ranks)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, f"ranks {[q.pid for q in alive]} outlived their launcher:\n" + log.read_text()[-3000:]
        assert "the launcher (pid" in log.read_text()  # (the other rank may end first through a failed collective)
    finally:
        for q in ranks:
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
        _kill_tree(p.pid)
