"""Gradient bookkeeping after the last W of a step: mirrored copies, tied parameters, data parallel.

- **Mirrors** (DualPipe): model stage s lives on rank s (down copy) and on rank pp-1-s (up copy); each
  copy saw half of the micro-batches. Ranks r and pp-1-r swap their flattened gradients and add, so
  both copies end up with the full gradient (bitwise equal on both sides: ``a + b == b + a``).
  ``MirrorExchange`` starts each module's swap right after its last weight-gradient action, so it
  overlaps the rest of the step; ``sum_mirror_grads`` swaps both after the step.
- **Ties** (e.g. embedding and output head): gradients of tied parameters are summed, locally when
  both live on the rank, else with the rank that holds the other copy on the same chain; the sum is
  always formed in the order (lower stage, higher stage), so both sides agree bitwise.
- **Data parallel**: one all-reduce per dtype bucket over ``dp_group`` (mean by default).

All exchanges are P2P on the pipeline group or collectives on the given DP group, with bounded waits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dualpipe.p2p import KIND_X, P2P, PeerError, make_tag


def grad_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def flatten_grads(params: Sequence[nn.Parameter]) -> Tensor:
    """All gradients (zeros where none) as one FP32-or-native 1-D buffer; params share one dtype here."""
    if not params:
        return torch.empty(0)
    dtype = params[0].dtype
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in params]
    return torch.cat(parts)


def unflatten_into(params: Sequence[nn.Parameter], flat: Tensor) -> None:
    off = 0
    for p in params:
        n = p.numel()
        g = flat[off : off + n].view_as(p).to(p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
        off += n


def _by_dtype(params: Sequence[nn.Parameter]) -> list[list[nn.Parameter]]:
    groups: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    return list(groups.values())


def exchange_add(
    p2p: P2P, peer: int, mine: Sequence[nn.Parameter], theirs_for: Sequence[nn.Parameter], tag_base: int
):
    """Send ``mine``'s gradients to ``peer`` and add the peer's buffer into ``theirs_for``.

    Both sides call this with matching parameter lists; buffers are split by dtype.
    """
    works = []
    for i, (a, b) in enumerate(zip(_by_dtype(mine), _by_dtype(theirs_for))):
        send = flatten_grads(a)
        recv = torch.empty_like(flatten_grads(b))
        works.append(
            (
                p2p.isend(send, peer, make_tag(KIND_X, tag_base, 1, i)),
                p2p.irecv(recv, peer, make_tag(KIND_X, tag_base, 1, i)),
                send,
                recv,
                b,
            )
        )
    out = []
    for ws, wr, _send, recv, b in works:
        p2p.wait(wr, peer, "receiving the mirror/tie gradients")
        p2p.wait(ws, peer, "sending the mirror/tie gradients")
        out.append((b, recv))
    return out


class MirrorExchange:
    """DualPipe's mirrored copies summed per module, each exchange started as soon as that module's
    gradients are final (its last weight-gradient action of the step), so it overlaps the rest of the
    schedule; ``finish`` (after the last action) waits and adds.

    Model stage ``m`` (my local 0 is model stage r, local 1 is model stage pp-1-r; the peer pp-1-r holds
    the same two, swapped) travels under one tag both ways: each side sends its copy and receives the
    peer's. The sums are formed as ``lower rank's + higher rank's``, so both copies end bitwise equal
    and equal to ``sum_mirror_grads``.
    """

    def __init__(self, p2p: P2P, local: Sequence[nn.Module]):
        self.p2p, self.local = p2p, list(local)
        self.peer = p2p.size - 1 - p2p.rank
        self.models = (p2p.rank, self.peer)  # model stage of local 0 and local 1
        self.pending: dict[int, list] = {}

    def start(self, i: int) -> None:
        """Local module ``i``'s gradients are final: send them, post the receive of the peer's copy."""
        if i in self.pending:
            return
        works = []
        for k, bucket in enumerate(_by_dtype(grad_params(self.local[i]))):
            send = flatten_grads(bucket)
            recv = torch.empty_like(send)
            tag = make_tag(KIND_X, 250, self.models[i], k)
            works.append(
                (self.p2p.isend(send, self.peer, tag), self.p2p.irecv(recv, self.peer, tag), send, recv)
            )
        self.pending[i] = works

    def finish(self) -> None:
        """Start what is not started yet, wait for both copies, add (both sides in the same order)."""
        for i in range(len(self.local)):
            self.start(i)
        deadline = time.monotonic() + self.p2p.timeout_s
        for i, works in sorted(self.pending.items()):
            for (ws, wr, send, recv), bucket in zip(works, _by_dtype(grad_params(self.local[i]))):
                self.p2p.wait(wr, self.peer, "receiving the mirror gradients", deadline)
                self.p2p.wait(ws, self.peer, "sending the mirror gradients", deadline)
                unflatten_into(bucket, send + recv if self.p2p.rank < self.peer else recv + send)
        self.pending.clear()


def sum_mirror_grads(p2p: P2P, local: Sequence[nn.Module]) -> None:
    """DualPipe: local 0 (model stage r) += partner's local 1; local 1 += partner's local 0."""
    peer = p2p.size - 1 - p2p.rank
    p0, p1 = grad_params(local[0]), grad_params(local[1])
    # I send local 0 then local 1; the peer's local 1 mirrors my local 0 and vice versa.
    got0 = exchange_add(p2p, peer, p0, p1, tag_base=250)  # my p0 out, peer's p0 (= my p1 mirror) in
    got1 = exchange_add(p2p, peer, p1, p0, tag_base=251)  # my p1 out, peer's p1 (= my p0 mirror) in
    for b, recv in got0 + got1:
        flat = flatten_grads(b)
        unflatten_into(b, flat + recv.to(flat.dtype) if p2p.rank < peer else recv.to(flat.dtype) + flat)


def sum_tied_local(pa: nn.Parameter, pb: nn.Parameter) -> None:
    """Both copies on this rank: each becomes ``grad_a + grad_b``."""
    ga = pa.grad if pa.grad is not None else torch.zeros_like(pa)
    gb = pb.grad if pb.grad is not None else torch.zeros_like(pb)
    total = ga + gb
    pa.grad, pb.grad = total, total.clone()


def sum_tied_remote(p2p: P2P, peer: int, mine: nn.Parameter, mine_is_first: bool, tag: int) -> None:
    """One copy here, the other on ``peer``: both become ``grad_first + grad_second``."""
    g = mine.grad if mine.grad is not None else torch.zeros_like(mine)
    g = g.contiguous()
    other = torch.empty_like(g)
    ws = p2p.isend(g, peer, make_tag(KIND_X, tag, 2, 0))
    wr = p2p.irecv(other, peer, make_tag(KIND_X, tag, 2, 0))
    p2p.wait(wr, peer, "receiving a tied parameter's gradient")
    p2p.wait(ws, peer, "sending a tied parameter's gradient")
    mine.grad = g + other if mine_is_first else other + g


def allreduce_dp(
    modules: Sequence[nn.Module], group: dist.ProcessGroup, average: bool, timeout_s: float
) -> None:
    """Sum (or average) every local gradient over ``group``: one all-reduce per dtype bucket."""
    params = [p for m in modules for p in grad_params(m)]
    size = dist.get_world_size(group)
    if size == 1 or not params:
        return
    pending = []
    for bucket in _by_dtype(params):
        flat = flatten_grads(bucket)
        pending.append((dist.all_reduce(flat, group=group, async_op=True), flat, bucket))
    deadline = time.monotonic() + timeout_s
    for work, flat, bucket in pending:
        try:
            work.wait(timeout=timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
        except Exception as e:  # noqa: BLE001
            ranks = [dist.get_global_rank(group, r) for r in range(size)]
            raise PeerError(
                f"data-parallel gradient all-reduce over global ranks {ranks} failed or timed out "
                f"({timeout_s:.0f}s): {str(e).strip()[:400]}"
            ) from e
        if average:
            flat.div_(size)
        unflatten_into(bucket, flat)
