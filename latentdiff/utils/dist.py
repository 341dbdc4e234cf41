"""Process-group helpers shared by every stage (encode, train, sample, FID).

Works under ``torchrun``, the ``deepspeed`` launcher and plain ``srun`` (SLURM variables are
mapped to RANK/WORLD_SIZE/LOCAL_RANK; MASTER_ADDR/MASTER_PORT must come from the job script,
there is no localhost fallback on multi-node jobs).  Device-agnostic through
``deepspeed.get_accelerator()``: CUDA/NCCL on GPUs, CPU/gloo here.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import sys
import traceback

import torch
import torch.distributed as dist

__all__ = [
    "env_rank",
    "env_world_size",
    "env_local_rank",
    "env_local_world_size",
    "get_rank",
    "get_world_size",
    "is_main",
    "init_distributed",
    "destroy",
    "barrier",
    "device",
    "accelerator",
    "hard_exit",
    "peer_failure",
    "run_entry_point",
    "is_distributed",
    "broadcast_object",
    "all_gather_object",
]


def _slurm_to_env() -> None:
    """Under ``srun`` without torchrun, take ranks from SLURM variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if ntasks <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(ntasks)
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def env_rank() -> int:
    _slurm_to_env()
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    _slurm_to_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    _slurm_to_env()
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_local_world_size() -> int:
    """Ranks on this node: ``LOCAL_WORLD_SIZE`` (torchrun), ``LOCAL_SIZE`` (deepspeed), SLURM's tasks per
    node (``srun``), else 1."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    return int(per_node) if per_node.isdigit() and "RANK" in os.environ else 1


def is_distributed() -> bool:
    """Is a default process group initialized (of any size)?"""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else env_rank()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else env_world_size()


def is_main() -> bool:
    return get_rank() == 0


def accelerator():
    # deepspeed is imported here, not at module level: it takes seconds to import and only the device
    # and backend choice need it (the sampler's and FID's helpers import this module too)
    import deepspeed

    return deepspeed.get_accelerator()


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on GPUs, ``cpu`` here."""
    acc = accelerator()
    name = acc.device_name(env_local_rank()) if acc.device_name() != "cpu" else "cpu"
    return torch.device(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 30.0, *, single_process_group: bool = False) -> bool:
    """Initialize the default process group if the launcher asked for more than one rank.

    Returns True when a multi-rank group is active.  The backend comes from the accelerator
    (nccl on CUDA, gloo on CPU).  ``single_process_group=True`` also creates a 1-rank group when the
    job was started without a launcher (DeepSpeed needs one; it would otherwise try MPI discovery).
    """
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if env_world_size() <= 1:
        if not single_process_group:
            return False
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(
                f"{var} is not set but WORLD_SIZE={env_world_size()}: launch with torchrun/deepspeed, "
                "or export MASTER_ADDR/MASTER_PORT in the SLURM script (see slurm/*.sbatch)"
            )
    acc = accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(env_local_rank())
    dist.init_process_group(
        backend=acc.communication_backend_name(),
        rank=env_rank(),
        world_size=env_world_size(),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled; the argument of the other ranks is ignored).

    Without a process group (or with one rank) ``obj`` itself is returned.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    """Barrier, then tear down the process group (a rank exiting with a live group can abort at exit)."""
    if is_distributed():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def hard_exit(rc: int) -> None:
    """End a launched process after its process group is destroyed: flush and ``os._exit``.

    Interpreter teardown can abort a rank ("terminate called without an active exception", SIGABRT)
    after all work is done, when a communication thread is still alive at exit.  Command-line entry
    points call this instead of ``sys.exit``.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not change the exit code
            pass
    os._exit(int(rc or 0))


# what a collective raises when the rank on the other end has gone (gloo: "Connection reset by peer",
# "Connection closed by peer"; NCCL: "remote process exited", a watchdog timeout)
_PEER_GONE = re.compile(r"gloo|nccl|connection (reset|closed|refused)|closed by peer|broken pipe|remote process", re.IGNORECASE)


def peer_failure(exc: BaseException) -> bool:
    """Did ``exc`` come from a collective whose peer rank has ended (that rank shows its own error)?"""
    if not is_distributed() or dist.get_world_size() == 1:
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and bool(_PEER_GONE.search(str(exc)))


def run_entry_point(main, prog: str) -> None:
    """Run ``main()`` and end the process with its return code through :func:`hard_exit`, whatever happens.

    No barrier and no teardown of the process group after an error: another rank may be inside a
    collective that will never complete, so a barrier would wait for ``comm_timeout_minutes``.  The
    process exits at once (non-zero); the launcher (torchrun, deepspeed, srun) sees it and ends the
    other ranks, whose collectives fail when this rank's connections close.  A launched rank also ends
    when its launcher dies (:func:`latentdiff.utils.orphans.exit_with_launcher`).  A rank whose collective
    failed that way prints one line pointing at the failed rank's error instead of a traceback, so the
    error is shown once; any other exception keeps its traceback.
    """
    from latentdiff.utils.orphans import exit_with_launcher

    exit_with_launcher(prog)  # a rank whose launcher was killed ends too
    try:
        rc = main()
    except SystemExit as exn:  # argparse --help / usage errors
        rc = exn.code if isinstance(exn.code, int) else (0 if exn.code is None else 2)
        if isinstance(exn.code, str):
            print(exn.code, file=sys.stderr)
    except KeyboardInterrupt:
        rc = 130
    except BaseException as exn:  # noqa: BLE001 - every exit of a launched rank goes through hard_exit
        if peer_failure(exn):
            first = str(exn).strip().splitlines()[0][:200] if str(exn).strip() else type(exn).__name__
            print(f"{prog} (rank {get_rank()}): stopped because another rank ended (its error is above); "
                  f"here the collective failed with: {first}", file=sys.stderr)
        else:
            traceback.print_exc()
        rc = 1
    hard_exit(rc)
