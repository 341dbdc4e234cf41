"""SLURM scripts: slurm/{encode,train,sample}.sbatch.

Two layers:

* fast tests run the scripts under bash with fake ``scontrol`` / ``srun`` / ``scancel`` on PATH: header
  layout, variable checks, the MASTER_ADDR failure path (no localhost fallback), the srun/torchrun
  command line and the SIGUSR1 -> forward -> requeue decisions;
* ``slow`` tests run them for real on a throw-away Slurm 22.05 cluster with 2 emulated nodes on this
  machine (Debian's packages, installed with apt if missing). Each ``slurmd -N nodeX`` runs in its own
  UTS + mount namespace (``hostname`` = nodeX, a private /etc/hosts that resolves node1/node2), with a
  private munged socket/key and free ports, all under one temporary directory. Every daemon is stopped
  by pid in the fixture's finalizer, also when a test fails; leftover job processes are found by a
  marker in their environment, never by name.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
SCRIPTS = ("train.sbatch", "encode.sbatch", "sample.sbatch")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/bin/scontrol", "/usr/bin/squeue",
            "/usr/bin/scancel", "/usr/sbin/munged")
MARKER = "LATENTDIFF_SLURM_TEST"  # in the environment of every daemon and job process we start
JOB_TIMEOUT = 600.0  # one job (the first may JIT-build DeepSpeed's comm op; a busy CI machine is slow)


def _venv_env(env: dict) -> dict:
    """Point the scripts at the Python running the tests."""
    if sys.prefix != sys.base_prefix:
        env["VENV"] = sys.prefix
    else:
        env.pop("VENV", None)
        env.pop("VIRTUAL_ENV", None)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


# ============================================================================================
# fast: the scripts' logic with fake Slurm commands
# ============================================================================================
FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_DIR/calls"
case "$1 $2" in
  "show hostnames") [ -n "$FAKE_HOSTS" ] && printf '%s\n' $FAKE_HOSTS; exit 0 ;;
  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=${FAKE_NODEADDR:-$3} NodeHostName=$3 State=ALLOCATED"; exit 0 ;;
  "requeue "*) exit 0 ;;
esac
exit 0
"""
FAKE_SCANCEL = r"""#!/bin/bash
echo "scancel $*" >> "$FAKE_DIR/calls"
[ "$(grep -c '^scancel' "$FAKE_DIR/calls")" -ge "${FAKE_STOP_AFTER:-1}" ] && touch "$FAKE_DIR/stop"
exit 0
"""
# records its arguments (NUL-separated) and environment, then runs until scancel "signals" it
FAKE_SRUN = r"""#!/bin/bash
printf '%s\0' "$@" > "$FAKE_DIR/srun.args"
env > "$FAKE_DIR/srun.env"
touch "$FAKE_DIR/started"
for i in $(seq 600); do [ -e "$FAKE_DIR/stop" ] && break; sleep 0.05; done
[ -z "${FAKE_NEW_LATEST:-}" ] || echo "$FAKE_NEW_LATEST" > "$RUN_DIR/checkpoints/latest"  # "the ranks saved"
exit "${FAKE_SRUN_RC:-0}"
"""


@pytest.fixture
def fake(tmp_path):
    """A fake-Slurm bin dir, a dataset dir with dataset.json and an export dir with model.json."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL), ("srun", FAKE_SRUN)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text("{}")
    # a stand-in virtualenv whose python passes the scripts' import check at once (torch takes seconds)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").write_text("#!/bin/sh\nexit ${FAKE_PYTHON_RC:-0}\n")
    (tmp_path / "venv" / "bin" / "python").chmod(0o755)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}", FAKE_DIR=str(tmp_path), FAKE_HOSTS="localhost",
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="fake[1-2]", SLURM_NNODES="2", SLURM_SUBMIT_DIR=str(REPO),
        SLURM_JOB_NAME="fake", DATASET=str(tmp_path / "data"), RUN_DIR=str(tmp_path / "run"),
        INPUT=str(tmp_path / "imgs"), OUTPUT=str(tmp_path / "out"), RESOLUTION="32",
        EXPORT=str(tmp_path / "export"), OUT=str(tmp_path / "samples"),
        # inherited from the submitting shell: must be ignored
        MASTER_ADDR="inherited.invalid", MASTER_PORT="1", RANK="7", WORLD_SIZE="9",
    )
    env["VENV"] = str(tmp_path / "venv")
    return tmp_path, env


def _calls(d: Path) -> str:
    return (d / "calls").read_text() if (d / "calls").exists() else ""


def _run(script: str, env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM_DIR / script), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax_and_sbatch_header(script):
    path = SLURM_DIR / script
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = path.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    # sbatch stops reading #SBATCH lines at the first command: every directive must come before it
    first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#"))
    directives = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    text = "\n".join(directives)
    for needed in ("--ntasks-per-node=1", "--requeue", "--open-mode=append", "--signal=B:USR1@", "--time="):
        assert needed in text, f"{script}: no #SBATCH {needed}"
    # shell variables are not expanded in #SBATCH lines (Slurm rejects them)
    assert "$" not in text.replace("%", "")


@pytest.mark.parametrize("script", SCRIPTS)
def test_unresolvable_head_node_fails_without_localhost_fallback(fake, script):
    d, env = fake
    env.update(FAKE_HOSTS="ld-ghost-node1.invalid ld-ghost-node2.invalid")
    res = _run(script, env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "MASTER_ADDR" in res.stderr and "ld-ghost-node1.invalid" in res.stderr and "does not resolve" in res.stderr
    assert not (d / "srun.args").exists(), "srun must not start without a master address"
    assert "show hostnames fake[1-2]" in _calls(d)


@pytest.mark.parametrize("script", SCRIPTS)
def test_empty_nodelist_fails(fake, script):
    d, env = fake
    env.update(FAKE_HOSTS="")
    res = _run(script, env)
    assert res.returncode == 2 and "MASTER_ADDR" in res.stderr and "gave no host" in res.stderr, res.stderr
    assert not (d / "srun.args").exists()


def test_nodeaddr_used_when_node_name_does_not_resolve(fake):
    d, env = fake
    env.update(FAKE_HOSTS="ld-ghost-node1.invalid", FAKE_NODEADDR="127.0.0.11")  # an IP literal with no name
    (d / "stop").touch()  # the fake step ends at once
    res = _run("train.sbatch", env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "using Slurm's NodeAddr 127.0.0.11" in res.stdout
    assert "MASTER_ADDR=127.0.0.11\n" in (d / "srun.env").read_text()


@pytest.mark.parametrize(
    "script, unset, message",
    [
        ("train.sbatch", "DATASET", "DATASET is not set"),
        ("encode.sbatch", "INPUT", "INPUT is not set"),
        ("encode.sbatch", "RESOLUTION", "RESOLUTION=''"),
        ("sample.sbatch", "EXPORT", "EXPORT is not set"),
        ("sample.sbatch", "OUT", "OUT is not set"),
    ],
)
def test_required_variables_are_named(fake, script, unset, message):
    d, env = fake
    env.pop(unset)
    res = _run(script, env)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (d / "srun.args").exists()


def test_bad_values_are_named(fake):
    d, env = fake
    for var, value, message in (("GPUS_PER_NODE", "two", "GPUS_PER_NODE=two"),
                                ("DS_CONFIG", str(d / "nope.json"), "DS_CONFIG="),
                                ("VENV", str(d / "novenv"), "VENV="),
                                ("DATASET", str(d), "has no dataset.json")):
        res = _run("train.sbatch", {**env, var: value})
        assert res.returncode == 2 and message in res.stderr, (var, res.stderr)
    res = _run("train.sbatch", {k: v for k, v in env.items() if k != "SLURM_JOB_ID"})
    assert res.returncode == 2 and "submit this script with sbatch" in res.stderr


def _start_train(d: Path, env: dict, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(["bash", str(SLURM_DIR / "train.sbatch"), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (d / "started").exists():
        if proc.poll() is not None or time.time() - t0 > 60:
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"the fake training step never started (rc {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.05)
    return proc


def test_train_command_line_and_preemption_requeue(fake):
    d, env = fake
    env["EXTRA_ARGS"] = "--max-steps 5  --log-every 1"
    env["SLURM_CPUS_PER_TASK"] = "4"  # sbatch --cpus-per-task=4: srun (22.05+) must be told again
    proc = _start_train(d, env, "--ema-rates", "[0.99, 0.999]")
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    calls = _calls(d)
    assert "scancel --signal=USR1 4242" in calls, calls  # forwarded to every process of the step
    assert "scontrol requeue 4242" in calls, calls
    assert "requeueing job 4242" in out

    argv = (d / "srun.args").read_text().split("\0")[:-1]
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=4"} <= set(argv)
    prog = argv[argv.index("-c") + 1]
    # expanded by each node's task, not by the batch shell
    assert '--node_rank "$SLURM_NODEID"' in prog and '--nnodes "$NNODES"' in prog
    assert '--nproc_per_node "$GPUS_PER_NODE"' in prog and "-m latentdiff.train" in prog
    assert 'trap "" USR1 TERM' in prog.split("exec")[0]
    train_args = argv[argv.index("-c") + 3:]
    assert train_args == ["--config", "tiny-cpu", "--dataset", env["DATASET"], "--run-dir", env["RUN_DIR"],
                          "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json"), "--max-steps", "5",
                          "--log-every", "1", "--ema-rates", "[0.99, 0.999]"]
    step_env = dict(ln.split("=", 1) for ln in (d / "srun.env").read_text().splitlines() if "=" in ln)
    assert step_env["MASTER_ADDR"] == "localhost"  # what the fake scontrol calls the first node
    assert step_env["MASTER_PORT"] == str(15000 + 4242 % 15000)
    assert step_env["NNODES"] == "2" and step_env["GPUS_PER_NODE"] == "1"
    assert "RANK" not in step_env and "WORLD_SIZE" not in step_env
    assert "SIGTERM" not in step_env["PET_SIGNALS_TO_HANDLE"] and "SIGUSR1" not in step_env["PET_SIGNALS_TO_HANDLE"]


def test_signal_is_repeated_until_the_step_exits(fake):
    """A rank that was still starting up ignored the first SIGUSR1: the script repeats it."""
    d, env = fake
    env.update(FAKE_STOP_AFTER="3", RESEND_SECONDS="0.2")
    proc = _start_train(d, env)
    t0 = time.time()
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert time.time() - t0 < 40, "the resend loop outlived the step (or held the log open)"
    assert _calls(d).count("scancel --signal=USR1 4242") == 3, _calls(d)
    assert "scontrol requeue 4242" in _calls(d)


def test_no_requeue_when_training_finished(fake):
    d, env = fake
    ckpts = d / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "latest").write_text("step_00000010\n")
    (d / "run" / "export" / "step_00000010").mkdir(parents=True)
    proc = _start_train(d, env)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "training finished" in out and "requeue" not in _calls(d)


def test_no_requeue_after_max_requeues(fake):
    d, env = fake
    env.update(SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    proc = _start_train(d, env)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "MAX_REQUEUES=3" in out and "requeue" not in _calls(d)


def test_no_requeue_when_the_step_fails_after_the_signal(fake):
    d, env = fake
    ckpts = d / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "latest").write_text("step_00000004\n")  # written before the signal
    env["FAKE_SRUN_RC"] = "3"
    proc = _start_train(d, env)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, out + err
    assert "scancel --signal=USR1" in _calls(d) and "requeue" not in _calls(d)
    assert "without a new checkpoint" in out


def test_requeue_when_a_rank_crashes_after_the_checkpoint(fake):
    """A rank that aborts while exiting (after the collective save) must not cost the requeue."""
    d, env = fake
    ckpts = d / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "latest").write_text("step_00000004\n")
    env.update(FAKE_SRUN_RC="1", FAKE_NEW_LATEST="step_00000005")
    proc = _start_train(d, env)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "checkpoint step_00000005 was written after the signal" in out
    assert "scontrol requeue 4242" in _calls(d)


def test_no_signal_no_requeue_and_exit_code_passed_through(fake):
    d, env = fake
    (d / "stop").touch()
    env["FAKE_SRUN_RC"] = "5"
    _venv_env(env)  # the real interpreter: the import check passes
    res = _run("train.sbatch", env)
    assert res.returncode == 5, res.stdout + res.stderr
    assert "scancel" not in _calls(d) and "requeue" not in _calls(d)
    assert "training step exited with 5" in res.stdout
    argv = (d / "srun.args").read_text().split("\0")
    assert not any(a.startswith("--cpus-per-task") for a in argv), argv  # not given to sbatch: srun's default


@pytest.mark.parametrize("script", SCRIPTS)
def test_python_without_latentdiff_is_refused(fake, script):
    d, env = fake
    env["FAKE_PYTHON_RC"] = "1"
    res = _run(script, env)
    assert res.returncode == 2 and "cannot import latentdiff" in res.stderr and "VENV" in res.stderr, res.stderr
    assert not (d / "srun.args").exists()


# ============================================================================================
# slow: a real 2-node Slurm cluster on this machine
# ============================================================================================
def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
            if s.getsockname()[1] not in ports:
                ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _ensure_slurm_installed() -> None:
    """Install Debian's Slurm + munge if missing; a failure fails the test with apt's output."""
    if all(Path(b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0:
        pytest.fail(f"Slurm is not installed and installing it needs root: apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=180", "install", "-y", "--no-install-recommends", *PACKAGES]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:  # stale or empty package lists on a fresh machine
        upd = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=180", "update"], env=env, capture_output=True, text=True, timeout=600)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            pytest.fail(f"could not install {' '.join(PACKAGES)} (needed to test slurm/*.sbatch):\n"
                        f"apt-get update -> {upd.returncode}: {upd.stderr[-1500:]}\n"
                        f"apt-get install -> {res.returncode}: {res.stdout[-1500:]}\n{res.stderr[-2000:]}")
    missing = [b for b in BINARIES if not Path(b).exists()]
    if missing:
        pytest.fail(f"apt-get installed {' '.join(PACKAGES)} but {missing} are still missing")


def _namespace_mode(hosts_file: Path) -> str:
    """'mount+uts' (own hostname + private /etc/hosts per node), 'uts' or 'none', whatever this kernel allows."""
    probes = (("mount+uts", ["unshare", "--mount", "--uts", "sh", "-c",
                             f"mount --bind '{hosts_file}' /etc/hosts && hostname node1 && getent hosts node1"]),
              ("uts", ["unshare", "--uts", "sh", "-c", "hostname node1"]))
    for mode, cmd in probes:
        try:
            if subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0:
                return mode
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "none"


class Cluster:
    """Slurm 22.05 with nodes node1..nodeN (NodeAddr 127.0.0.1x) on this machine, under one temp dir."""

    def __init__(self, nnodes: int = 2):
        self.nnodes = nnodes
        # short path (unix sockets) under /tmp, readable by the munge user
        self.dir = Path(tempfile.mkdtemp(prefix="ldslurm-", dir="/tmp"))
        self.dir.chmod(0o755)
        self.conf = self.dir / "etc" / "slurm.conf"
        self.out = self.dir / "out"
        self.procs: dict[str, subprocess.Popen] = {}
        self.mode = "none"
        self.marker = f"{MARKER}={self.dir}"

    # -- lifecycle ------------------------------------------------------------------------------
    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(SLURM_CONF=str(self.conf), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env[MARKER] = str(self.dir)
        _venv_env(env)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            cwd=self.dir, **kw)
        log.close()

    def start(self) -> None:
        d = self.dir
        for sub in ("etc", "state", "log", "run", "out", "munge", *(f"spool/node{i}" for i in range(1, self.nnodes + 1))):
            (d / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        mem = max(256, (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2**20 // (2 * self.nnodes))
        ctld_port, *node_ports = _free_ports(1 + self.nnodes)
        munge_dir = d / "munge"
        shutil.chown(munge_dir, "munge", "munge")  # munged: socket dir 0755, owned by munge
        munge_dir.chmod(0o755)
        socket_path = munge_dir / "munge.socket"
        lines = [
            "ClusterName=ldtest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={socket_path}", f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/run/slurmctld.pid", f"SlurmdPidFile={d}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill",
            "MpiDefault=none", "ReturnToService=2", "SlurmdParameters=config_overrides", "KillWait=10",
        ]
        for i, port in enumerate(node_ports, 1):
            lines.append(f"NodeName=node{i} NodeHostname={host} NodeAddr=127.0.0.{10 + i} Port={port} "
                         f"CPUs={cpus} RealMemory={mem} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1 localhost\n"
        (d / "etc" / "hosts").write_text(hosts.rstrip("\n") + "\n" + "".join(
            f"127.0.0.{10 + i} node{i}\n" for i in range(1, self.nnodes + 1)))

        key = munge_dir / "munge.key"  # a private key: this cluster never talks to a system munged
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        shutil.chown(key, "munge", "munge")
        self._spawn("munged", ["/usr/sbin/munged", "--foreground", f"--socket={socket_path}", f"--key-file={key}",
                               f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                               f"--seed-file={munge_dir}/munged.seed"], user="munge", group="munge", extra_groups=[])
        self._wait_for(lambda: socket_path.exists(), 20, "munged did not create its socket")
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", str(self.conf)])
        # LATENTDIFF_SLURM_TEST_NS=uts|none forces a weaker isolation (to exercise the NodeAddr fallback)
        self.mode = os.environ.get("LATENTDIFF_SLURM_TEST_NS") or _namespace_mode(d / "etc" / "hosts")
        for i in range(1, self.nnodes + 1):
            slurmd = f"exec /usr/sbin/slurmd -D -f '{self.conf}' -N node{i}"
            if self.mode == "mount+uts":
                cmd = ["unshare", "--mount", "--uts", "sh", "-c",
                       f"mount --bind '{d}/etc/hosts' /etc/hosts && hostname node{i} && {slurmd}"]
            elif self.mode == "uts":
                cmd = ["unshare", "--uts", "sh", "-c", f"hostname node{i} && {slurmd}"]
            else:
                cmd = ["sh", "-c", slurmd]
            self._spawn(f"slurmd-node{i}", cmd)  # unshare and sh exec: the pid is slurmd's
        self._wait_for(lambda: len(self.run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", check=False).split())
                       >= self.nnodes, 60, "the nodes did not become idle")

    def _wait_for(self, cond, timeout: float, what: str) -> None:
        t0 = time.time()
        while not cond():
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead or time.time() - t0 > timeout:
                pytest.fail(f"Slurm test cluster: {what} (exited daemons: {dead})\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job, stop every daemon we started by pid, kill leftovers carrying our marker."""
        if self.conf.exists() and self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                t0 = time.time()
                while self.run("squeue", "-h", "-o", "%A", check=False).split() and time.time() - t0 < 30:
                    time.sleep(0.5)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pid in self._marked_pids():  # slurmstepd / job processes that outlived their daemons
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not os.environ.get("LATENTDIFF_KEEP_SLURM_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def _marked_pids(self) -> list[int]:
        needle = self.marker.encode() + b"\0"
        out = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if needle in (p / "environ").read_bytes():
                    out.append(int(p.name))
            except OSError:
                continue
        return out

    # -- jobs -------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        res = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if check and res.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} -> {res.returncode}: {res.stdout}\n{res.stderr}\n{self.logs()}")
        return res.stdout

    def submit(self, script: str, *args: str, nodes: int = 2, sbatch_opts: tuple = (), **variables) -> str:
        cmd = ["sbatch", "--parsable", f"--nodes={nodes}", f"--output={self.out}/%x-%j.out", *sbatch_opts,
               str(SLURM_DIR / script), *args]
        res = subprocess.run(cmd, env=self.env(**variables), capture_output=True, text=True, timeout=60, cwd=REPO)
        assert res.returncode == 0, f"sbatch failed: {res.stdout}\n{res.stderr}\n{self.logs()}"
        return res.stdout.strip().split(";")[0]

    def job(self, jid: str) -> dict:
        text = self.run("scontrol", "show", "job", jid, "-o", check=False)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def job_log(self, jid: str) -> str:
        logs = sorted(self.out.glob(f"*-{jid}.out"))
        return "".join(p.read_text(errors="replace") for p in logs)

    def wait_gone(self, jid: str, timeout: float = JOB_TIMEOUT) -> dict:
        """Poll until the job left the queue (sbatch --wait polls with back-off); its final record."""
        t0 = time.time()
        while self.run("squeue", "-h", "-j", jid, check=False).strip():
            if time.time() - t0 > timeout:
                pytest.fail(f"job {jid} still queued/running after {timeout:.0f} s: {self.job(jid).get('JobState')}\n"
                            f"{self.job_log(jid)[-6000:]}\n{self.logs()}")
            time.sleep(0.5)
        return self.job(jid)

    def wait_until(self, cond, timeout: float, what: str, jid: str) -> None:
        t0 = time.time()
        while not cond():
            if time.time() - t0 > timeout:
                pytest.fail(f"{what} within {timeout:.0f} s (job {jid}: {self.job(jid).get('JobState')})\n"
                            f"{self.job_log(jid)[-6000:]}\n{self.logs()}")
            time.sleep(0.3)

    def assert_completed(self, jid: str, info: dict) -> str:
        log = self.job_log(jid)
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
            f"job {jid}: JobState={info.get('JobState')} ExitCode={info.get('ExitCode')}\n{log[-8000:]}\n{self.logs()}")
        return log

    def logs(self, n: int = 25) -> str:
        parts = []
        for p in sorted((self.dir / "log").glob("*")) + sorted((self.dir / "munge").glob("*.log")):
            try:
                tail = p.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                continue
            parts.append(f"--- {p.name}\n" + "\n".join(tail))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster(request):
    _ensure_slurm_installed()
    c = Cluster(nnodes=2)
    request.addfinalizer(c.stop)  # registered before anything starts: runs even if start() fails
    c.start()
    return c


# A rank process of this stack occasionally dies with SIGABRT *while exiting*, after its work and the
# process-group teardown are done (seen 1 time in ~200 rank exits under Slurm, 0 in 60 under plain
# torchrun; DeepSpeed's notes report the same, see the report to the lead). The job then ends FAILED
# although every output is complete. That is not what these tests are about, so exactly this case is
# resubmitted once (the stages resume, so the retry must be a no-op) with a visible warning;
# anything else fails.
EXIT_ABORT = "terminate called without an active exception"


def _completed(cluster: Cluster, jid: str, info: dict, done: str, resubmit) -> tuple[str, str]:
    """Require COMPLETED; returns (the job's log, the log of the resubmission or "")."""
    log = cluster.job_log(jid)
    if info.get("JobState") == "FAILED" and EXIT_ABORT in log and done in log:
        warnings.warn(f"job {jid}: a rank aborted at exit ({EXIT_ABORT!r}) after {done!r}; resubmitting once")
        jid2 = resubmit()
        return log, cluster.assert_completed(jid2, cluster.wait_gone(jid2))
    cluster.assert_completed(jid, info)
    return log, ""


def _run_job(cluster: Cluster, script: str, *args: str, done: str, sbatch_opts: tuple = (), **variables) -> str:
    """Submit, wait, require COMPLETED with ``done`` in the log; returns the first attempt's log."""
    submit = lambda: cluster.submit(script, *args, sbatch_opts=sbatch_opts, **variables)  # noqa: E731
    jid = submit()
    log, _ = _completed(cluster, jid, cluster.wait_gone(jid), done, submit)
    assert done in log, log[-6000:]
    return log


@pytest.fixture(scope="module")
def encoded(cluster):
    """The tiny dataset, encoded by slurm/encode.sbatch on 2 nodes (2 ranks)."""
    from latentdiff.data.synthetic import make_tiny_vae, write_image_folder

    root = cluster.dir / "work"
    vae = make_tiny_vae(root / "vae")
    write_image_folder(root / "images", classes=3, per_class=24, size_range=(40, 80), seed=0)
    log = _run_job(cluster, "encode.sbatch", INPUT=root / "images", OUTPUT=root / "data", RESOLUTION=32, VAE=vae,
                   SHARD_SIZE=8, WORKERS=0, done="encoded 72 images")
    _assert_two_nodes(log, cluster.mode)
    assert (root / "data" / "dataset.json").is_file()
    return root / "data"


def _assert_two_nodes(log: str, mode: str) -> None:
    """One task per node, node ranks from SLURM_NODEID, MASTER_ADDR = the first node (never localhost)."""
    tasks = sorted(set(re.findall(r"^(\d+): task (\d+) on (\S+) node_rank (\d+)$", log, re.M)))
    assert [(t[0], t[1], t[3]) for t in tasks] == [("0", "0", "0"), ("1", "1", "1")], log[-4000:]
    if mode != "none":  # each slurmd in its own UTS namespace
        assert [t[2] for t in tasks] == ["node1", "node2"], tasks
    master = re.search(r"nnodes=2 procs/node=1 .*master=(\S+):(\d+)", log)
    assert master, log[-4000:]
    # the name resolves through the nodes' private /etc/hosts; otherwise Slurm's NodeAddr of node1
    assert master.group(1) == ("node1" if mode == "mount+uts" else "127.0.0.11"), master.group(1)


def _state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


TRAIN_ARGS = ("--duration-images", "160", "--checkpoint-every", "3", "--log-every", "1")  # 10 steps at 2 x 8


@pytest.mark.slow
def test_train_on_two_nodes_resume_and_sample(cluster, encoded):
    run = cluster.dir / "work" / "run"
    ckpts = run / "checkpoints"
    # 1) 2 nodes x 1 rank, stop after 6 of the 10 steps
    log = _run_job(cluster, "train.sbatch", *TRAIN_ARGS, "--max-steps", "6", DATASET=encoded, RUN_DIR=run,
                   done=f"saved checkpoint {ckpts}/step_00000006")
    _assert_two_nodes(log, cluster.mode)
    assert "world=2" in log and "ranks 2, ZeRO-2" in log, log[-4000:]
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    for step in (3, 6):
        st = _state(ckpts / f"step_{step:08d}")
        assert st["step"] == step and st["world_size"] == 2, st
        assert f"saved checkpoint {ckpts}/step_{step:08d}" in log
    # both ranks trained: ZeRO-2 writes one optimizer partition per rank
    parts = sorted(p.name for p in (ckpts / "step_00000006").glob("*optim_states.pt"))
    assert len(parts) == 2 and any("rank_0" in p for p in parts) and any("rank_1" in p for p in parts), parts
    assert "resumed from" not in log

    # 2) the same submission again resumes from step 6 and finishes (10 steps) with an export; this one
    #    asks for 2 CPUs per task, which the script must hand on to srun
    export = run / "export" / "step_00000010"
    log2 = _run_job(cluster, "train.sbatch", *TRAIN_ARGS, sbatch_opts=("--cpus-per-task=2",), DATASET=encoded,
                    RUN_DIR=run, done=f"exported {export}")
    assert f"resumed from {ckpts}/step_00000006 at step 6" in log2, log2[-6000:]
    st = _state(ckpts / "step_00000010")
    assert st["step"] == 10 and st["world_size"] == 2
    assert (export / "model.json").is_file(), log2[-4000:]

    # 3) sample 8 seeds from the export on 2 nodes (4 seeds per rank)
    out = cluster.dir / "work" / "samples"
    log3 = _run_job(cluster, "sample.sbatch", EXPORT=export, OUT=out, SEEDS="0-7", NFE=5, BATCH=4,
                    done="wrote 8 images")
    _assert_two_nodes(log3, cluster.mode)
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{s:06d}.png" for s in range(8)], log3[-4000:]
    assert (out / "samples.npz").is_file()


@pytest.mark.slow
def test_preemption_signal_checkpoints_requeues_and_resumes(cluster, encoded):
    run = cluster.dir / "work" / "run-preempt"
    ckpts = run / "checkpoints"
    args = ("--duration-images", "768", "--checkpoint-every", "4", "--log-every", "1")  # 48 steps
    submit = lambda: cluster.submit("train.sbatch", *args, DATASET=encoded, RUN_DIR=run)  # noqa: E731
    jid = submit()
    # the first periodic checkpoint proves every rank is in the training loop (signal handlers installed)
    cluster.wait_until(lambda: (ckpts / "latest").exists(), JOB_TIMEOUT, "no first checkpoint", jid)
    # what `#SBATCH --signal=B:USR1@300` does near the time limit: SIGUSR1 to the batch shell only
    cluster.run("scancel", "--signal=USR1", "--batch", jid)
    cluster.wait_until(lambda: cluster.job(jid).get("Restarts") == "1", 120, "the job was not requeued", jid)
    log = cluster.job_log(jid)
    stop = re.search(r"^0: stop requested.*saved step (\d+)", log, re.M)
    assert stop, log[-6000:]
    n = int(stop.group(1))
    assert 4 <= n < 48, n
    rc = re.search(r"training step exited with (\d+)", log)
    assert rc and (rc.group(1) == "0" or EXIT_ABORT in log), log[-6000:]  # see EXIT_ABORT
    assert f"requeueing job {jid}" in log, log[-4000:]
    st = _state(ckpts / f"step_{n:08d}")
    assert st["step"] == n and st["world_size"] == 2
    # Slurm holds a requeued job for ~2 min (Reason=BeginTime) so that the old instance is cleaned up
    # and its job credential (revoked with 1 s resolution) cannot be confused with the new one. Release
    # it early, but only once both nodes are idle again and a few seconds after the revocation;
    # starting it at once ends in "Killing non-startable batch job: Job credential revoked".
    cluster.wait_until(lambda: cluster.job(jid).get("JobState") == "PENDING", 60,
                       "the requeued job did not return to the queue", jid)
    cluster.wait_until(lambda: len(cluster.run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", check=False).split()) == 2,
                       60, "the nodes did not become idle after the requeue", jid)
    time.sleep(3)
    cluster.run("scontrol", "update", f"JobId={jid}", "StartTime=now", check=False)
    info = cluster.wait_gone(jid)
    assert info.get("Restarts") == "1", info
    log, _ = _completed(cluster, jid, info, f"exported {run}/export/step_00000048", submit)
    assert "restart=1" in log
    assert f"resumed from {ckpts}/step_{n:08d} at step {n}" in log, log[-6000:]
    assert _state(ckpts / "step_00000048")["world_size"] == 2
