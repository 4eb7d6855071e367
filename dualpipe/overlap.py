"""Overlap one micro-batch's forward with another micro-batch's backward (DualPipe's F&B pairs).

The hook has two halves, and a module needs only the first.

1. **A module marks its communication points.** Besides ``forward``, a stage module (or any module
   it calls) may define ``forward_pieces``: its forward as a generator of compute pieces separated by
   ``yield CommPoint(...)``. A ``CommPoint`` carries the tensors to send and two launchers:
   ``forward(*tensors) -> PendingComm`` starts the communication asynchronously (expert-parallel
   dispatch, say) and ``backward(*grads) -> PendingComm`` starts its adjoint (the backward of a
   dispatch is a combine). The generator resumes with the received tensors. Tensors computed before
   the point and used after it should be listed in ``carry`` (they come back after the received ones):
   the graph is then cut cleanly at the point. Forgetting ``carry`` stays correct, but the backward
   re-runs the part of the earlier piece that produced the tensor.

       class MoEBlock(nn.Module):
           def forward_pieces(self, x):
               h = x + self.attn(self.norm1(x))                      # piece 0: attention, routing
               tokens, plan = self.route(self.norm2(h))
               y, h = yield CommPoint(plan.dispatch, plan.combine, (tokens,), carry=(h,))
               y = self.experts(y)                                   # piece 1: experts
               out, h = yield CommPoint(plan.combine, plan.dispatch, (y,), carry=(h,))
               return h + out + self.shared(h)                       # piece 2

           def forward(self, x):                                     # the plain path, same code
               return run_pieces(self.forward_pieces(x))

   Composition: inside ``forward_pieces``, ``x = yield from pieces(block, x)`` runs a sub-module's
   pieces (or its plain forward if it has none), so a stage made of several blocks exposes all their
   communication points. Outside a pipeline, ``run_pieces`` runs the generator with each comm waited
   at once through a differentiable wrapper, so the module trains the same way everywhere.

2. **The pipeline interleaves two micro-batches.** For an F&B action the runtime turns the forward
   of micro-batch A and the backward of micro-batch B into two step iterators. One step runs one
   compute piece and launches the next communication, then yields; the next step of the same iterator
   first waits for that communication. The pipeline's ``overlap`` function (type ``OverlapFn``)
   drives both; the default ``interleave`` alternates them, so A's dispatch is in flight while B's
   expert backward computes, B's combine-backward is in flight while A's experts compute, and so on:

       A: attn | dispatch ~~~~~~~~~~~~ | experts | combine ~~~~~~~~~~~~ | tail
       B:        combine-bwd ~~ | experts-bwd   | dispatch-bwd ~~ | attn-bwd
       (compute pieces alternate on the rank; ~~ communication in flight)

   A module without ``forward_pieces`` is one piece: F&B then runs F, then B (the working default).
   Backward pieces run segment by segment with the weight-gradient policy of the pipeline (full
   backward, or input-only backward with the weight gradient deferred to the W action).

Contract for ``PendingComm.wait()``: bounded (raise with the peer rank on timeout), returns one tensor
per received result. ``CommPoint.backward`` receives one gradient per result (``None`` for results
that are not differentiable) and its handle returns one gradient per sent tensor (``None`` allowed).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = [
    "BackwardFn",
    "ChunkGraph",
    "CommPoint",
    "Completed",
    "OverlapFn",
    "PendingComm",
    "backward_once",
    "backward_steps",
    "drive",
    "forward_once",
    "forward_steps",
    "interleave",
    "pieces",
    "run_pieces",
    "sequential",
]


@runtime_checkable
class PendingComm(Protocol):
    """An asynchronous communication in flight."""

    def wait(self) -> Sequence[Tensor | None]:
        """Block (bounded) until done; the received tensors (forward) or gradients (backward)."""
        ...


@dataclass(frozen=True)
class Completed:
    """A ``PendingComm`` that is already done (a local, synchronous 'communication')."""

    results: tuple[Tensor | None, ...]

    def wait(self) -> tuple[Tensor | None, ...]:
        return self.results


@dataclass
class CommPoint:
    """A communication point yielded by ``forward_pieces``.

    ``forward(*tensors)`` launches the communication of ``tensors`` and returns a ``PendingComm``;
    ``backward(*grads_of_results)`` launches the adjoint (``None``: the results carry no gradient).
    ``carry``: tensors passed through unchanged (appended to the received results) to cut the graph.
    """

    forward: Callable[..., PendingComm]
    backward: Callable[..., PendingComm] | None
    tensors: tuple[Tensor, ...]
    carry: tuple[Tensor, ...] = ()
    name: str = "comm"

    def __post_init__(self) -> None:
        if isinstance(self.tensors, Tensor):
            self.tensors = (self.tensors,)
        if isinstance(self.carry, Tensor):
            self.carry = (self.carry,)
        self.tensors, self.carry = tuple(self.tensors), tuple(self.carry)
        for i, t in enumerate(self.tensors + self.carry):
            if not isinstance(t, Tensor):
                raise TypeError(f"CommPoint {self.name!r}: item {i} is {type(t).__name__}, expected a Tensor")


def _profiling() -> bool:
    """Whether a profiler runs: the calling thread's profiler state, or a ``torch.profiler.profile`` started
    anywhere in the process (one with ``profile_all_threads=True`` leaves the thread-local state unset)."""
    any_thread = getattr(torch.autograd.profiler, "_is_profiler_enabled", True)  # unknown torch: keep spans
    return torch.autograd._profiler_enabled() or any_thread


_NO_SPAN = nullcontext()


def _span(name: str | None) -> Any:
    """A profiler span (``torch.profiler.record_function``) while a profiler runs, else nothing: the
    span costs ~10 us per enter/exit even without a profiler, tens of times per pipeline step.
    ``name=None``: the caller already knows that no profiler runs (the pipeline checks once per step
    and then builds no span names at all)."""
    return torch.profiler.record_function(name) if name is not None and _profiling() else _NO_SPAN


def _sub(name: str | None, suffix: str) -> str | None:
    """A child span's name (None stays None: no profiler)."""
    return None if name is None else name + suffix


Pieces = Generator[CommPoint, tuple, Any]
# An overlap function drives a forward step iterator and a backward step iterator to the end.
OverlapFn = Callable[[Iterator[str], Iterator[str]], None]


def pieces(module: Callable[..., Any], *args: Any) -> Pieces:
    """``yield from pieces(sub, *args)``: the sub-module's pieces if it defines ``forward_pieces``,
    else one plain call (no communication point)."""
    fp = getattr(module, "forward_pieces", None)
    if fp is None:
        return module(*args)
    return (yield from fp(*args))


class _DifferentiableComm(torch.autograd.Function):
    """A comm point waited at once, inside autograd: the plain (non-pipelined) path of ``run_pieces``."""

    @staticmethod
    def forward(ctx, point: CommPoint, *tensors: Tensor):  # type: ignore[override]
        ctx.point = point
        out = tuple(point.forward(*tensors).wait())
        ctx.diff = [isinstance(o, Tensor) and o.is_floating_point() for o in out]
        ctx.mark_non_differentiable(*[o for o, d in zip(out, ctx.diff) if not d and isinstance(o, Tensor)])
        return out

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        if ctx.point.backward is None:
            return (None,) * (1 + len(ctx.point.tensors))
        g = [gr if d else None for gr, d in zip(grads, ctx.diff)]
        back = tuple(ctx.point.backward(*g).wait())
        return (None, *back)


def run_pieces(gen: Pieces) -> Any:
    """Run a ``forward_pieces`` generator to its end, waiting each communication at once (plain forward,
    differentiable through ``CommPoint.backward``)."""
    send = None
    while True:
        try:
            point = gen.send(send)
        except StopIteration as stop:
            return stop.value
        if torch.is_grad_enabled() and point.backward is not None:
            received = _DifferentiableComm.apply(point, *point.tensors)
        else:
            received = tuple(point.forward(*point.tensors).wait())
        send = tuple(received) + point.carry


# --------------------------------------------------------------------------------------------------------
# The pipeline's side: forward and backward of one chunk as step iterators.


@dataclass
class _Segment:
    leaves: tuple[Tensor, ...]  # graph inputs of this segment that need a gradient
    outputs: tuple[Tensor, ...] = ()  # what leaves the segment (sent by the next point, or final)
    point: CommPoint | None = None  # the point that consumed ``outputs`` (None for the last segment)
    # for segments after a point: leaves aligned with the point's results and carry (None: no gradient)
    received: tuple[Tensor | None, ...] = ()
    carried: tuple[Tensor | None, ...] = ()


@dataclass
class ChunkGraph:
    """The autograd graph of one chunk's forward, cut at its communication points."""

    segments: list[_Segment] = field(default_factory=list)
    result: Any = None

    @property
    def pieces(self) -> int:
        return len(self.segments)


def _as_leaf(t: Any, grad: bool) -> Any:
    if grad and isinstance(t, Tensor) and t.is_floating_point():
        return t.detach().requires_grad_(True)
    return t.detach() if isinstance(t, Tensor) else t


def forward_steps(
    module: Callable[..., Any],
    inputs: tuple[Tensor, ...],
    finish: Callable[[Any], Any] | None = None,
    name: str | None = "F",
) -> Generator[str, None, ChunkGraph]:
    """Forward of one chunk as steps; returns the ``ChunkGraph`` (``result`` = ``finish(outputs)``).

    ``inputs`` are the stage inputs (leaves that require grad where a gradient must flow back).
    ``name`` prefixes the profiler spans of the pieces (None: no spans, the caller knows that no
    profiler runs).
    """
    gen = getattr(module, "forward_pieces", None)
    if gen is None:
        return forward_once(module, inputs, finish, name)
    grad = torch.is_grad_enabled()
    graph = ChunkGraph([_Segment(tuple(t for t in inputs if isinstance(t, Tensor) and t.requires_grad))])
    it = gen(*inputs)
    send: tuple | None = None
    i = 0
    while True:
        with _span(_sub(name, f".piece{i}")):
            try:
                point = it.send(send)
            except StopIteration as stop:
                graph.result = finish(stop.value) if finish is not None else stop.value
                return graph
            handle = point.forward(*[t.detach() for t in point.tensors])
        yield point.name
        with _span(_sub(name, f".wait.{point.name}")):
            received = tuple(handle.wait())
        differentiable = grad and point.backward is not None and any(t.requires_grad for t in point.tensors)
        rec = tuple(_as_leaf(t, differentiable) for t in received)
        car = tuple(_as_leaf(t, grad and t.requires_grad) for t in point.carry)
        seg = graph.segments[-1]
        seg.outputs, seg.point = point.tensors + point.carry, point
        needs = [t if isinstance(t, Tensor) and t.requires_grad else None for t in rec + car]
        graph.segments.append(
            _Segment(
                tuple(t for t in needs if t is not None),
                received=tuple(needs[: len(rec)]),
                carried=tuple(needs[len(rec) :]),
            )
        )
        send = rec + car
        i += 1


def forward_once(
    module: Callable[..., Any],
    inputs: tuple[Tensor, ...],
    finish: Callable[[Any], Any] | None = None,
    name: str | None = "F",
) -> ChunkGraph:
    """The forward of a chunk of one piece (a module without ``forward_pieces``): what
    ``forward_steps`` returns for it, without a step iterator."""
    graph = ChunkGraph([_Segment(tuple(t for t in inputs if isinstance(t, Tensor) and t.requires_grad))])
    with _span(_sub(name, ".piece0")):
        out = module(*inputs)
        graph.result = finish(out) if finish is not None else out
    return graph


class BackwardFn(Protocol):
    """How one segment's backward runs (``dualpipe.weight_split`` provides the policies)."""

    def __call__(
        self, outputs: Sequence[Tensor], grads: Sequence[Tensor], inputs: Sequence[Tensor], retain_graph: bool
    ) -> tuple[list[Tensor | None], Callable[[], None] | None]:
        """Input gradients (aligned with ``inputs``) and the deferred weight work, if any."""
        ...


def backward_steps(
    graph: ChunkGraph,
    outputs: Sequence[Tensor],
    grads: Sequence[Tensor],
    backward: BackwardFn,
    name: str | None = "B",
) -> Generator[str, None, tuple[dict[int, Tensor], list[Callable[[], None]]]]:
    """Backward of one chunk as steps, last segment first, launching each point's adjoint in between.

    ``outputs``/``grads``: the chunk's differentiable results (tensors, or their ``GradientEdge`` once
    the runtime freed a sent activation) and their gradients (the loss and 1.0 on the last stage).
    Returns the gradients of the stage inputs (by ``id`` of the leaf) and the deferred weight work of
    every segment (run them in the W action).
    """
    segs = graph.segments
    multi = len(segs) > 1
    acc: dict[int, Tensor] = {}
    w_work: list[Callable[[], None]] = []
    outs, gs = list(outputs), list(grads)
    for k in range(len(segs) - 1, -1, -1):
        # Leaves of this and every earlier segment: a tensor used across a point without `carry` sends
        # part of its gradient straight into an earlier segment (correct by linearity).
        leaves = [t for s in segs[: k + 1] for t in s.leaves]
        _segment_backward(
            leaves, outs, gs, backward, multi, _sub(name, f".piece{len(segs) - 1 - k}"), acc, w_work
        )
        if k == 0:
            break
        prev, cur = segs[k - 1], segs[k]
        point = prev.point
        grads_rec = [_grad_or_zeros(acc, t) if t is not None else None for t in cur.received]
        carry_grads = [_grad_or_zeros(acc, t) if t is not None else None for t in cur.carried]
        if point.backward is not None and any(g is not None for g in grads_rec):
            handle = point.backward(*grads_rec)
            yield point.name
            with _span(_sub(name, f".wait.{point.name}")):
                sent_grads = list(handle.wait())
            if len(sent_grads) != len(point.tensors):
                raise RuntimeError(
                    f"CommPoint {point.name!r}: backward returned {len(sent_grads)} gradients for "
                    f"{len(point.tensors)} sent tensors"
                )
        else:
            sent_grads = [None] * len(point.tensors)
        outs = list(prev.outputs)
        gs = sent_grads + carry_grads
    return acc, w_work


def backward_once(
    graph: ChunkGraph,
    outputs: Sequence[Tensor],
    grads: Sequence[Tensor],
    backward: BackwardFn,
    name: str | None = "B",
) -> tuple[dict[int, Tensor], list[Callable[[], None]]]:
    """The backward of a chunk of one piece: what ``backward_steps`` returns for it, without a step
    iterator."""
    if graph.pieces != 1:
        raise ValueError(f"backward_once: the chunk has {graph.pieces} pieces; use backward_steps")
    acc: dict[int, Tensor] = {}
    w_work: list[Callable[[], None]] = []
    leaves = graph.segments[0].leaves
    _segment_backward(leaves, outputs, grads, backward, False, _sub(name, ".piece0"), acc, w_work)
    return acc, w_work


def _segment_backward(
    leaves: Sequence[Tensor],
    outs: Sequence[Any],
    gs: Sequence[Tensor | None],
    backward: BackwardFn,
    retain: bool,
    span: str | None,
    acc: dict[int, Tensor],
    w_work: list[Callable[[], None]],
) -> None:
    """One segment: gradients of ``leaves`` added into ``acc`` (by id), its deferred weight work onto
    ``w_work``."""
    pairs = [(o, g) for o, g in zip(outs, gs) if g is not None and _differentiable(o)]
    if not pairs:
        return
    # nothing upstream needs a gradient when ``leaves`` is empty: weights only
    with _span(span):
        got, w = backward([o for o, _ in pairs], [g for _, g in pairs], list(leaves), retain)
    for t, g in zip(leaves, got):
        if g is not None:
            acc[id(t)] = acc[id(t)] + g if id(t) in acc else g
    if w is not None:
        w_work.append(w)


def _differentiable(o: Any) -> bool:
    return isinstance(o, GradientEdge) or (isinstance(o, Tensor) and o.requires_grad)


def _grad_or_zeros(acc: dict[int, Tensor], t: Tensor) -> Tensor:
    g = acc.get(id(t))
    return g if g is not None else torch.zeros_like(t)


def drive(steps: Generator[str, None, Any]) -> Any:
    """Run a step iterator to its end (no overlap) and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


class _Tracked:
    """Wrap a generator so its return value is kept when an overlap function exhausts it;
    ``on_done(value)`` runs once, as soon as it ends (inside the overlap function)."""

    def __init__(self, gen: Generator[str, None, Any], on_done: Callable[[Any], None] | None = None):
        self.gen, self.done, self.value, self.on_done = gen, False, None, on_done

    def __iter__(self) -> _Tracked:
        return self

    def __next__(self) -> str:
        try:
            return next(self.gen)
        except StopIteration as stop:
            if not self.done:
                self.done, self.value = True, stop.value
                if self.on_done is not None:
                    self.on_done(stop.value)
            raise


def interleave(forward: Iterator[str], backward: Iterator[str]) -> None:
    """Default ``OverlapFn``: alternate one step of the forward and one of the backward until both end
    (forward first, so its first communication is launched before the backward computes)."""
    live = [forward, backward]
    while live:
        for it in list(live):
            try:
                next(it)
            except StopIteration:
                live.remove(it)


def sequential(forward: Iterator[str], backward: Iterator[str]) -> None:
    """``OverlapFn`` without overlap: the forward to its end, then the backward (for comparison)."""
    for it in (forward, backward):
        for _ in it:
            pass
