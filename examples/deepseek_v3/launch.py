"""Start the processes of a run, whoever launched it.

    kind = launcher_kind()                   # "torchrun" | "mpi" | "local"
    spawn_local(fn, nprocs, args, ...)       # no launcher: N local processes, FileStore rendezvous
    rank, world, local_rank = init_from_launcher(kind, backend="auto", timeout_s=300)

- No launcher: the script starts ``nprocs`` processes itself (spawn), joined through a FileStore in a
  temporary directory (no port to pick, nothing to race for).
- ``torchrun`` (RANK / WORLD_SIZE / MASTER_ADDR in the environment): ``env://``.
- ``mpirun`` / ``srun --mpi`` (OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK): rank and size from mpi4py's
  COMM_WORLD, the local rank from its shared-memory split, and a TCP rendezvous address picked by rank 0
  (MASTER_ADDR or its host name, a free port) and broadcast to all.
Backend ``auto``: NCCL when CUDA GPUs are present (each process takes GPU ``local_rank``), else gloo.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def launcher_kind(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        return "torchrun"
    if any(k in env for k in MPI_ENV):
        return "mpi"
    return "local"


def launcher_world_size(kind: str, env: dict[str, str] | None = None) -> int | None:
    """The world size a launcher announces in the environment (known before any process group exists)."""
    env = dict(os.environ) if env is None else env
    if kind == "torchrun":
        return int(env["WORLD_SIZE"])
    if kind == "mpi":
        for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE"):
            if k in env:
                return int(env[k])
    return None


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"launch.backend={backend!r} must be auto, gloo or nccl")
    return backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _set_device(backend: str, local_rank: int) -> None:
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def init_from_launcher(kind: str, backend: str = "auto", timeout_s: float = 300) -> tuple[int, int, int]:
    """Join the process group a launcher set up; returns (rank, world_size, local_rank)."""
    backend = resolve_backend(backend)
    timeout = timedelta(seconds=timeout_s)
    if kind == "torchrun":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        _set_device(backend, local_rank)
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
        return dist.get_rank(), dist.get_world_size(), local_rank
    if kind == "mpi":
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise ImportError("running under mpirun needs mpi4py: pip install mpi4py (or -e '.[mpi]')") from e
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        addr = None
        if rank == 0:
            addr = (os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname()), _free_port())
        host, port = comm.bcast(addr, root=0)
        _set_device(backend, local_rank)
        dist.init_process_group(
            backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world, timeout=timeout
        )
        return rank, world, local_rank
    raise ValueError(f"launcher kind {kind!r} has no process group to join; use spawn_local")


def _local_entry(local_rank, nprocs, store, fn, args, backend, timeout_s, threads):
    if backend == "gloo":
        torch.set_num_threads(threads)
    _set_device(backend, local_rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{store}",
        rank=local_rank,
        world_size=nprocs,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def spawn_local(
    fn: Callable[..., None],
    nprocs: int,
    args: tuple = (),
    backend: str = "auto",
    timeout_s: float = 300,
    threads_per_rank: int | None = None,
) -> None:
    """Run ``fn(*args)`` in ``nprocs`` new local processes joined in one process group.

    ``fn`` must be module-level (it is pickled). A failing process makes this raise with its traceback.
    """
    backend = resolve_backend(backend)
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nprocs)
    with tempfile.TemporaryDirectory(prefix="frugal_launch_") as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(
            _local_entry,
            args=(nprocs, store, fn, args, backend, timeout_s, threads),
            nprocs=nprocs,
            join=True,
            start_method="spawn",
        )
