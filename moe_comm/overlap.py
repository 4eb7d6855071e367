"""Overlap one micro-batch's dispatch/combine with another micro-batch's compute.

A *step generator* is a forward written as compute pieces separated by communication: it yields an
asynchronous ``Work`` (already launched) and resumes with its result (``MoELayer.forward_steps``,
or any generator of the same shape). ``interleave`` runs several of them on one rank:

    A: route | dispatch ~~~~~~~~~~~~~~ | experts | combine ~~~~~~~~~~~~~~ | add
    B:         route | dispatch ~~~~~~~~~~~~~~~~~ | experts | combine ~~~~~~~~~~~~ | add
               (pieces run one at a time on the rank; ~~ communication in flight)

so that A's dispatch travels while B routes, B's dispatch while A's experts compute, and so on. On gloo
the collectives progress on the process group's own threads; on NCCL they run on the communication
stream. Launch order is program order on every rank (collectives are matched by issue order): a Work
launches its payload when created (after its small count exchange) and any later hop (the second hop
of a hierarchical transfer) inside ``wait()``, never depending on timing.

Autograd is untouched: each Work applies the differentiable dispatch/combine when it is waited, so
``interleave`` returns the same (differentiable) outputs as running the forwards one after the other.

``moe_comm.pipeline_pieces`` exposes the same layer to dualpipe's overlap hook (forward of one
micro-batch against the backward of another).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from torch import nn

from moe_comm.dispatcher import Work

__all__ = ["interleave", "overlapped_forward"]

Steps = Generator[Work, Any, Any]


def interleave(*steps: Steps) -> list[Any]:
    """Run step generators round-robin, each one's communication in flight while the others compute.

    Returns their return values in order. Every wait is bounded by the dispatcher's timeout.
    """
    n = len(steps)
    pending: list[Work | None] = [None] * n
    results: list[Any] = [None] * n
    done = [False] * n

    def advance(i: int, value: Any) -> None:
        try:
            pending[i] = steps[i].send(value)
        except StopIteration as stop:
            done[i], results[i], pending[i] = True, stop.value, None

    for i in range(n):  # first pieces: i's communication is launched before i+1 computes
        advance(i, None)
    while not all(done):
        for i in range(n):
            if done[i]:
                continue
            advance(i, pending[i].wait())
    return results


def overlapped_forward(layer: nn.Module, *micro_batches) -> list[Any]:
    """``layer.forward_steps`` of each micro-batch, interleaved (see ``interleave``)."""
    return interleave(*(layer.forward_steps(x) for x in micro_batches))
