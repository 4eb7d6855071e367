"""Bounded collectives for expert parallelism: all-to-all with a timeout that names the failing peer.

Every collective the dispatcher issues goes through :class:`Comm`: it is launched asynchronously and
waited with a deadline. When the wait fails (a peer died: gloo reports a closed connection; a peer hangs:
the deadline passes) the surviving ranks probe each other with one small point-to-point message each; the
peers that do not answer are named in the :class:`PeerError`. Survivors all fail the same collective, so
they all take part in the probe; a dead or stuck peer never answers it. The probe is gloo-only (NCCL
communicators are aborted by their watchdog after a failure); elsewhere the error says the peer is unknown.

A ``Comm`` over no process group (or a group of one rank) is the local mode: "all-to-all" is the identity
and nothing is communicated.

Issue order. Collectives are matched across ranks by the order in which each rank issues them, so every
multi-hop exchange (a Chain) runs on one FIFO thread per process group (gloo; the CPU analogue of a
communication stream): chains start in the order they are submitted -- program order, the same on every
rank -- and each runs to completion (count exchange, payload, next hop) before the next one starts, while
the caller's thread goes on computing. Without the thread (``thread=False``, and on NCCL, where the
collectives are already asynchronous on the NCCL stream), a chain runs inline up to its first payload
transfer (count exchanges waited at once) and launches later hops inside ``wait()``. Either way no launch
depends on timing. The group must not carry other collectives while a chain is in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Chain", "Comm", "PeerError", "Pending", "ThreadRun"]

_PROBE_TAG = 0x6D6F65  # "moe"


class PeerError(RuntimeError):
    """A collective failed or timed out; ``peers``: the group ranks that did not answer (may be empty)."""

    def __init__(self, message: str, peers: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.peers = list(peers)


class Pending:
    """An asynchronous step: ``wait()`` blocks (bounded) and returns the result; ``is_done()`` never blocks.

    ``then(value)`` / ``map(fn)`` replace / transform the result once the communication completed.
    ``meta``: a small metadata exchange (counts), which a Chain waits for eagerly (see Chain).
    """

    def __init__(self, comm: Comm, work, result, what: str, meta: bool = False) -> None:
        self.comm, self.work, self.result, self.what, self.meta = comm, work, result, what, meta
        self.start = time.monotonic()
        self._post: list[Callable] = []

    def then(self, value) -> Pending:
        self._post.append(lambda _: value)
        return self

    def map(self, fn: Callable) -> Pending:
        self._post.append(fn)
        return self

    def is_done(self) -> bool:
        return self.work is None or self.work.is_completed()

    def wait(self):
        if self.work is not None:
            self.comm.wait(self.work, self.what, self.start)
            self.work = None
        while self._post:
            self.result = self._post.pop(0)(self.result)
        return self.result


class Chain:
    """Drives a generator of :class:`Pending` steps (a multi-hop exchange) to its return value.

    The generator yields a Pending whenever it must wait for communication and receives the Pending's
    result back. Construction runs it up to its first payload transfer: metadata steps (per-peer counts)
    are waited at once, so the payload is in flight when the caller gets the chain back. Later hops are
    launched inside ``wait()``. Collectives are matched by issue order across ranks, so the points where a
    chain launches must not depend on timing: only these two rules decide them, never a completion test.
    """

    def __init__(self, steps: Generator) -> None:
        self._steps, self._current, self._done, self._value = steps, None, False, None
        self._advance(None)
        while not self._done and self._current.meta:
            self._advance(self._current.wait())

    def _advance(self, value) -> None:
        try:
            self._current = self._steps.send(value)
        except StopIteration as stop:
            self._done, self._value, self._current = True, stop.value, None

    def is_done(self) -> bool:
        """Whether the transfer in flight has landed (informational; never launches anything)."""
        return self._done or self._current.is_done()

    def wait(self):
        while not self._done:
            self._advance(self._current.wait())
        return self._value


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}
_EXECUTORS_LOCK = threading.Lock()


def _executor(group: dist.ProcessGroup) -> ThreadPoolExecutor:
    with _EXECUTORS_LOCK:
        ex = _EXECUTORS.get(id(group))
        if ex is None:
            ex = _EXECUTORS[id(group)] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe_comm")
        return ex


def _drive(steps: Generator):
    with torch.no_grad():
        return Chain(steps).wait()


class ThreadRun:
    """A Chain submitted to the group's communication thread: ``wait()`` / ``is_done()`` like a Chain."""

    def __init__(self, future: Future, comm: Comm, what: str) -> None:
        self.future, self.comm, self.what = future, comm, what

    def is_done(self) -> bool:
        return self.future.done()

    def wait(self):
        # Each step inside is bounded by the timeout; this outer bound covers a queue of such chains.
        bound = 8 * self.comm.timeout + 60
        try:
            return self.future.result(timeout=bound)
        except FutureTimeout as e:
            raise PeerError(
                f"moe_comm {self.what}: the communication thread of {self.comm.describe(self.comm.rank)} did "
                f"not finish within {bound:.0f}s"
            ) from e


class Comm:
    """All-to-all over ``group`` with bounded waits. ``group=None`` means local (no communication).

    ``thread``: run chains on the group's FIFO communication thread (default: on for gloo).
    """

    def __init__(self, group: dist.ProcessGroup | None, timeout: float, thread: bool | None = None) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout={timeout} must be > 0 seconds")
        self.group = group
        self.timeout = float(timeout)
        if group is None:
            self.rank, self.world_size, self.backend = 0, 1, "local"
        else:
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
            self.backend = str(dist.get_backend(group))
        self.thread = (self.backend == "gloo" if thread is None else bool(thread)) and not self.is_local

    def start(self, steps: Generator, what: str) -> Chain | ThreadRun:
        """Start a chain of hops: on the communication thread, or inline (see the module docstring)."""
        if self.thread:
            return ThreadRun(_executor(self.group).submit(_drive, steps), self, what)
        return Chain(steps)

    @property
    def is_local(self) -> bool:
        return self.world_size == 1

    def global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def describe(self, group_rank: int) -> str:
        g = self.global_rank(group_rank)
        return f"rank {group_rank}" if g == group_rank else f"group rank {group_rank} (global rank {g})"

    # ------------------------------------------------------------------------------------ all-to-all
    def all_to_all(
        self,
        inp: torch.Tensor,
        send_splits: list[int] | None,
        recv_splits: list[int] | None,
        what: str,
        out: torch.Tensor | None = None,
    ) -> Pending:
        """Launch ``all_to_all_single`` (rows split by the given counts; None = even). Local: the identity."""
        if self.is_local:
            if out is not None:
                out.copy_(inp)
                return Pending(self, None, out, what)
            return Pending(self, None, inp, what)
        if out is None:
            rows = sum(recv_splits) if recv_splits is not None else inp.shape[0]
            out = inp.new_empty((rows, *inp.shape[1:]))
        try:
            work = dist.all_to_all_single(out, inp, recv_splits, send_splits, group=self.group, async_op=True)
        except RuntimeError as e:  # a broken connection can surface when the collective is posted
            self._fail(what, e, time.monotonic())
        return Pending(self, work, out, what)

    def wait(self, work, what: str, start: float) -> None:
        left = max(0.001, self.timeout - (time.monotonic() - start))
        try:
            ok = work.wait(timedelta(seconds=left))
        except RuntimeError as e:
            self._fail(what, e, start)
        if ok is False:  # some backends report a timeout by returning False
            self._fail(what, TimeoutError(f"timed out after {self.timeout}s"), start)

    def exchange_counts(self, counts: torch.Tensor, signature: dict[str, int], what: str) -> Pending:
        """Launch the exchange of per-peer row counts (W,) together with a signature of the call.

        The result, after ``wait()``, is the (W, 1 + len(signature)) int64 CPU tensor received; pass it to
        :meth:`check_signature`. The signature (hidden size, dtype, top-k, ...) lets every rank verify that
        its peers agree before any payload moves, so a mismatch raises on every rank instead of hanging.
        """
        W = self.world_size
        sig = torch.tensor(list(signature.values()), dtype=torch.int64)
        send = torch.cat([counts.to("cpu", torch.int64).view(W, 1), sig.expand(W, -1)], dim=1).contiguous()
        if self.backend == "nccl":
            send = send.to(counts.device)
        pending = self.all_to_all(send, None, None, what)
        pending.meta = True
        return pending

    def check_signature(
        self,
        received: torch.Tensor,
        signature: dict[str, int],
        what: str,
        labels: dict[str, Sequence[str]] | None = None,
    ) -> list[int]:
        """Validate the peers' signatures; returns the counts column as a Python list (host sync).

        ``labels[name][code]`` names an encoded value in the error message (e.g. dtype codes)."""
        received = received.cpu()
        labels = labels or {}

        def show(name: str, v: int) -> str:
            names = labels.get(name)
            return names[v] if names is not None and 0 <= v < len(names) else str(v)

        for peer in range(self.world_size):
            theirs = received[peer, 1:].tolist()
            for (name, value), other in zip(signature.items(), theirs):
                if other != value:
                    raise ValueError(
                        f"moe_comm {what}: {self.describe(peer)} called with {name}={show(name, other)} but "
                        f"{self.describe(self.rank)} has {name}={show(name, value)}; every rank of the "
                        "expert-parallel group must use the same value"
                    )
        return received[:, 0].tolist()

    # ------------------------------------------------------------------------------------ failures
    def _fail(self, what: str, err: BaseException, start: float):
        waited = time.monotonic() - start
        peers = self.probe_peers() if self.backend == "gloo" else None
        if peers:
            who = ", ".join(self.describe(p) for p in peers)
            msg = (
                f"moe_comm {what} failed on {self.describe(self.rank)} after {waited:.1f}s "
                f"(timeout {self.timeout}s): no answer from {who} (dead, hung or not calling the same "
                f"collective). Cause: {err}"
            )
        else:
            msg = (
                f"moe_comm {what} failed on {self.describe(self.rank)} after {waited:.1f}s "
                f"(timeout {self.timeout}s); the failing peer could not be identified"
                f"{'' if peers is not None else f' on backend {self.backend}'}. Cause: {err}"
            )
        raise PeerError(msg, peers or []) from err

    def probe_peers(self) -> list[int]:
        """Exchange one tiny message (and an acknowledgement) with every peer; return the silent ones.

        The acknowledgement keeps a fast rank in the probe until each responsive peer has its message, so
        that a survivor which raises and exits early is not mistaken for a dead peer by a slower one.
        """
        start = time.monotonic()
        peers = [p for p in range(self.world_size) if p != self.rank]
        sends, probes, acks = [], {}, {}
        for p in peers:
            try:
                sends.append(dist.isend(torch.ones(1), group=self.group, group_dst=p, tag=_PROBE_TAG))
                probes[p] = dist.irecv(torch.empty(1), group=self.group, group_src=p, tag=_PROBE_TAG)
                acks[p] = dist.irecv(torch.empty(1), group=self.group, group_src=p, tag=_PROBE_TAG + 1)
            except RuntimeError:  # the connection to that peer is already closed
                probes[p] = None
        answered = [p for p in peers if self._wait_quietly(probes.get(p), start)]
        for p in answered:
            try:
                sends.append(dist.isend(torch.ones(1), group=self.group, group_dst=p, tag=_PROBE_TAG + 1))
            except RuntimeError:
                pass
        for p in answered:
            self._wait_quietly(acks.get(p), start)
        for w in sends:
            self._wait_quietly(w, start)
        return [p for p in peers if p not in answered]

    def _wait_quietly(self, work, start: float) -> bool:
        if work is None:
            return False
        left = max(0.001, self.timeout - (time.monotonic() - start))
        try:
            return work.wait(timedelta(seconds=left)) is not False
        except RuntimeError:
            return False
