"""Run a function on N real local processes joined by a gloo process group (tests only).

    results = run_ranks(fn, world_size=4, args=(cfg,))      # fn(rank, world_size, *args) -> picklable

Every rank runs in its own process (forkserver with torch preloaded, so a launch costs a fork, not a
fresh ``import torch``), joins ``torch.distributed`` with the gloo backend through a FileStore, and
sends its return value back (serialised with ``torch.save``, so tensors travel as bytes). A rank that
raises makes ``run_ranks`` raise with that rank's traceback; a rank that hangs past ``timeout`` or dies
without a result is named in the error. ``return_exceptions=True`` returns ``RankFailure`` objects in
place of results instead, for tests that expect some ranks to fail (dead-peer tests).

Library code never creates process groups; this helper is where tests do.
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class RankFailure:
    """What a rank left instead of a result: its traceback, or how it ended."""

    rank: int
    message: str

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.message}"


def _ctx():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    return ctx


def _worker(fn, rank, world_size, init_file, args, kwargs, results, pg_timeout_s, env):
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        out = fn(rank, world_size, *args, **kwargs)
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    timeout: float = 180.0,
    pg_timeout: float = 60.0,
    return_exceptions: bool = False,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; results by rank.

    ``fn`` must be a module-level function (it is pickled by reference). ``timeout`` bounds the whole
    run; ``pg_timeout`` is the process group's own timeout for collectives.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    ctx = _ctx()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="frugal_dist_") as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, r, world_size, init_file, args, kwargs or {}, results, pg_timeout, env or {}),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < world_size and time.monotonic() < deadline:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                # A process that died without reporting (killed, os._exit) never sends: stop waiting for it.
                for r, p in enumerate(procs):
                    if r not in got and p.exitcode is not None and p.exitcode != 0:
                        got[r] = RankFailure(r, f"exited with code {p.exitcode} before returning a result")
                continue
            if ok:
                got[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                got[rank] = RankFailure(rank, payload)
        for r in range(world_size):
            if r not in got:
                got[r] = RankFailure(r, f"no result within timeout={timeout}s (hung or too slow)")
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    out = [got[r] for r in range(world_size)]
    failures = [o for o in out if isinstance(o, RankFailure)]
    if failures and not return_exceptions:
        raise RuntimeError("distributed test failed:\n" + "\n".join(str(f) for f in failures))
    return out
