"""Execute one rank's action list for one step: the schedule (``dualpipe.schedules``) is the program.

Per action:
    RECV_F   post the header receive now; its data receives go up as soon as the header is in
    RECV_B   post the gradient receives now (shapes are known from this rank's own forward)
    F        wait for the inputs, run the stage (and the criterion on a chain's last stage)
    SEND_F   isend header + outputs at once (never behind compute), then keep only the outputs'
             autograd edges: the sent activation's memory is released as soon as the send completes
    B / BW   wait for the output gradients, backward of the inputs only (B, weight work deferred to W)
             or full (BW)
    W        run the weight work deferred by this chunk's B
    FB       F of one chunk and BW of another through the pipeline's overlap function
    SEND_B   isend the input gradients
Completed sends are reaped between actions where the backend reports a send complete before it is
waited (NCCL; gloo's P2P work only completes once waited); everything is waited (bounded) at the end
of the step. What depends on the schedule alone (handlers, fused B/W, weight-done points) is derived
once per schedule, and profiler spans and their names are built only while a profiler runs: at
small stage sizes the runtime's own Python was ~18% of a step's instructions.
Compute actions are recorded in the timeline (seconds from the step start) and as
``torch.profiler.record_function`` spans named ``dualpipe.<op><stage>.<mb>``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from dualpipe.overlap import (
    BackwardFn,
    ChunkGraph,
    OverlapFn,
    _profiling,
    _Tracked,
    backward_once,
    backward_steps,
    drive,
    forward_steps,
    interleave,
    sequential,
)
from dualpipe.p2p import (
    KIND_B,
    KIND_F,
    KIND_G,
    P2P,
    Meta,
    PeerError,
    PendingRecv,
    RecvTensors,
    make_tag,
    send_boundary,
    send_tensors,
)
from dualpipe.schedules import Action, Op, Schedule
from dualpipe.trace import Event
from dualpipe.weight_split import full_backward


class _Chunk:
    """One (stage, micro-batch) from its forward until its input gradients left and its W ran."""

    __slots__ = ("inputs", "needs_grad", "graph", "outs", "out_meta", "loss", "in_grads", "w_work")

    def __init__(self, inputs: tuple, needs_grad: list[bool], graph: ChunkGraph | None, loss: Tensor | None):
        self.inputs = inputs  # what the stage was called with (leaves where a gradient flows back)
        self.needs_grad = needs_grad  # per input: a gradient must be sent back for it
        self.graph = graph
        self.loss = loss
        self.outs: list = []  # stage outputs; autograd edges once sent
        self.out_meta: list[Meta] = []  # per output
        self.in_grads: list | None = None
        self.w_work: list = []


@dataclass
class StepIO:
    """What ``step`` hands to the engine: per micro-batch inputs/labels and the criterion."""

    inputs: dict[int, tuple]
    labels: dict[int, tuple]
    criterion: Callable[..., Tensor] | None
    return_outputs: bool
    fields: tuple[int, ...]  # checked against every received header (num_chunks, step id)


class Engine:
    """Runs a schedule on this rank with the given local modules (local i = schedule.local_stages[i])."""

    def __init__(
        self,
        schedule: Schedule,
        modules: Sequence[nn.Module],
        p2p: P2P,
        split_policy: BackwardFn,
        overlap: OverlapFn,
        device: torch.device,
        meta_cache: dict | None = None,
        groups: dict | None = None,
        early: frozenset = frozenset(),
        on_weights_done: Callable[[int], None] | None = None,
        plan: RankPlan | None = None,
    ):
        self.s = schedule
        self._next, self._prev = schedule._next.get, schedule._prev.get  # stage -> neighbour stage or None
        self.stage_rank = schedule.stage_rank
        self.p2p = p2p
        self.rank = p2p.rank
        stages = schedule.local_stages(self.rank)
        self.module_of = dict(zip(stages, modules))
        self.split = split_policy
        self.overlap = overlap
        self.device = device
        self.meta_cache = meta_cache if meta_cache is not None else {}  # boundary shapes, kept across steps
        self.groups = groups if groups is not None else {}  # coalesced messages (dualpipe.coalesce)
        self.early = early  # activations sent from inside an F&B action (dualpipe.coalesce.early_sends)
        # on_weights_done(local index) right after the last action that adds to that module's gradients
        self.on_weights_done = on_weights_done
        # what depends on the schedule alone (the pipeline derives it once per schedule and keeps it)
        self.plan = plan if plan is not None else RankPlan(schedule, self.rank)
        self.fused = plan.fused
        # Stages whose module has no communication points run as one piece; with an overlap function
        # that runs such an F&B as forward then backward (both built-in ones do), the F&B is called
        # directly instead of through two step iterators (~20-50 us of Python less per action).
        self.one_piece = {st: getattr(m, "forward_pieces", None) is None for st, m in self.module_of.items()}
        self.plain_overlap = overlap in (interleave, sequential)

    # ---------------------------------------------------------------------------------------------------
    def run(self, io: StepIO) -> dict[str, Any]:
        self.io = io
        self.chunks: dict[tuple[int, int], _Chunk] = {}
        self.recvs: dict[tuple[str, int, int], Any] = {}
        self.sends: list[tuple[Any, Tensor, int, str, tuple[int, int] | None]] = []
        self.local_acts: dict[tuple[int, int], tuple] = {}
        self.local_grads: dict[tuple[int, int], list] = {}
        self.out_groups: dict[tuple, list[tuple[str, list]]] = {}  # group -> parts sent so far
        self.in_groups: dict[tuple, int] = {}  # group -> receives reached so far
        self.group_parts: dict[tuple, list] = {}  # received part tensors by message key
        self.sent_early: set[tuple[int, int]] = set()  # (stage, mb) whose SEND_F already went
        self.inner_wait = 0.0  # time an F&B action spent waiting for its backward half's gradient
        self.losses: dict[int, Tensor] = {}
        self.outputs: dict[int, tuple] = {}
        self.events: list[Event] = []
        self.live = self.live_w = self.peak = self.peak_w = 0
        self.unsized: list[PendingRecv] = []  # receives of channels without known shapes (polled)
        # profiler spans and their names only while a profiler runs (checked once per step)
        self.prof = _profiling()
        notify = self.on_weights_done if torch.is_grad_enabled() else None
        self.t0 = time.perf_counter()
        reap = self.p2p.completes_early
        for handler, a, done in self.plan.program:
            if reap:
                self._reap()
            if self.unsized:
                self._poll_recvs()
            handler(self, a)
            if done is not None and notify is not None:
                notify(done)
        deadline = time.monotonic() + self.p2p.timeout_s
        for work, _t, peer, what, _key in self.sends:
            self.p2p.wait(work, peer, what, deadline)
        self.sends.clear()
        end = time.perf_counter() - self.t0
        busy = sum(e.duration for e in self.events)
        return dict(
            timeline=self.events,
            step_time=end,
            busy=busy,
            bubble=end - busy,
            peak_activations=self.peak,
            peak_activations_until_w=self.peak_w,
            losses=self.losses,
            outputs=self.outputs,
        )

    # ---------------------------------------------------------------------------------------------------
    # messages

    def _grouped_recv(self, key: tuple) -> bool:
        """A receive that is part of a coalesced group: post one receive at the group's last part."""
        g = self.groups.get(key)
        if g is None:
            return False
        seen = self.in_groups.get(g.first, 0) + 1
        self.in_groups[g.first] = seen
        if seen == len(g.keys):
            _, stage, mb = g.first
            self._post(("G", *g.first), g.src, KIND_G, stage, mb)
        return True

    def _group_part(self, key: tuple) -> tuple[list, list]:
        """(metas, tensors) of one part of a coalesced message (waits for the message once)."""
        g = self.groups[key]
        if key not in self.group_parts:
            fields, metas, data = self.recvs.pop(("G", *g.first)).wait()
            n = len(self.io.fields)
            self._check_fields(fields[:n], key)
            counts, off = fields[n:], 0
            for k, c in zip(g.keys, counts):
                self.group_parts[k] = (metas[off : off + c], data[off : off + c])
                off += c
        return self.group_parts.pop(key)

    def _check_fields(self, fields: Sequence[int], key: tuple) -> None:
        if tuple(fields) != self.io.fields:
            raise PeerError(
                f"pipeline rank {self.rank}: message {key} came from a peer at (num_chunks, step) "
                f"= {tuple(fields)} but this rank is at {self.io.fields}: ranks called step() differently"
            )

    def _do_RECV_F(self, a: Action) -> None:
        if self._grouped_recv(("F", a.stage, a.mb)):
            return
        self._post(("F", a.stage, a.mb), a.peer, KIND_F, a.stage, a.mb)

    def _do_RECV_B(self, a: Action) -> None:
        if self._grouped_recv(("B", a.stage, a.mb)):
            return
        ch = self.chunks[(a.stage, a.mb)]
        metas = [Meta(m.shape, m.dtype, False) for m in ch.out_meta if m.requires_grad]
        tag = make_tag(KIND_B, a.stage, a.mb, 1)
        self.recvs[("B", a.stage, a.mb)] = RecvTensors(self.p2p, metas, a.peer, tag, self.device)

    def _do_SEND_F(self, a: Action) -> None:
        if (a.stage, a.mb) in self.sent_early:
            self.sent_early.discard((a.stage, a.mb))
            return
        self._send_f(a.stage, a.mb, a.peer)

    def _send_f(self, stage: int, mb: int, peer: int) -> None:
        ch = self.chunks[(stage, mb)]
        nxt = self._next(stage)
        if ("F", nxt, mb) in self.groups:
            self._send_part(("F", nxt, mb), list(ch.outs), peer)
        else:
            sent = send_boundary(self.p2p, ch.outs, self.io.fields, peer, KIND_F, nxt, mb, self.meta_cache)
            for work, t in sent:
                self.sends.append(
                    (work, t, peer, ("sending the activation of stage %d mb %d", stage, mb), None)
                )
        if torch.is_grad_enabled():
            # keep only the autograd edges: the output tensors are freed once the sends complete
            ch.outs = [get_gradient_edge(o) if o.requires_grad else None for o in ch.outs]
        else:
            self.chunks.pop((stage, mb))

    def _do_SEND_B(self, a: Action) -> None:
        ch = self.chunks[(a.stage, a.mb)]
        prv = self._prev(a.stage)
        grads = [g for g in ch.in_grads or [] if g is not None]
        what = ("sending the input gradient of stage %d mb %d", a.stage, a.mb)
        if ("B", prv, a.mb) in self.groups:
            self._send_part(("B", prv, a.mb), grads, a.peer)
        else:
            for work, t in send_tensors(self.p2p, grads, a.peer, make_tag(KIND_B, prv, a.mb, 1)):
                self.sends.append((work, t, a.peer, what, None))
        ch.in_grads = None
        self._maybe_drop(a.stage, a.mb)

    def _send_part(self, key: tuple, tensors: list, peer: int) -> None:
        """Queue one part of a coalesced group; the group's last part sends them all as one message."""
        g = self.groups[key]
        parts = self.out_groups.setdefault(g.first, [])
        parts.append(tensors)
        if key != g.last:
            return
        del self.out_groups[g.first]
        flat = [t for p in parts for t in p]
        fields = (*self.io.fields, *(len(p) for p in parts))
        _, stage, mb = g.first
        for work, t in send_boundary(self.p2p, flat, fields, peer, KIND_G, stage, mb, self.meta_cache):
            self.sends.append((work, t, peer, ("sending messages %s", list(g.keys)), None))

    def _reap(self) -> None:
        # oldest first, stopping at the first send still in flight: sends complete about in issue order,
        # and a full scan per action costs O(sends in flight) calls (gloo's never complete before waited)
        i, sends = 0, self.sends
        while i < len(sends) and sends[i][0].is_completed():
            i += 1
        if i:
            del sends[:i]

    def _poll_recvs(self) -> None:
        still = []
        for r in self.unsized:
            r.poll()
            if r.metas is None:
                still.append(r)
        self.unsized = still

    def _post(self, key: tuple, peer: int, kind: int, stage: int, mb: int) -> None:
        """Post an activation (or coalesced) receive; one without known shapes is polled between
        actions, so that its data receive goes up as soon as its header is in."""
        r = PendingRecv(self.p2p, peer, kind, stage, mb, self.device, self.meta_cache)
        self.recvs[key] = r
        if r.expected is None:
            self.unsized.append(r)

    # ---------------------------------------------------------------------------------------------------
    # inputs of F and B

    def _f_inputs(self, stage: int, mb: int) -> tuple[tuple, list[bool]]:
        prv = self._prev(stage)
        grad = torch.is_grad_enabled()
        if prv is None:
            if mb not in self.io.inputs:
                raise ValueError(f"rank {self.rank} runs the first stage {stage} but step() got no inputs")
            # a user input that requires grad stays differentiable (its gradient is computed in B and
            # dropped): the stage's input backward then runs as on any other stage
            ins = self.io.inputs[mb]
            keep = [bool(grad and isinstance(t, Tensor) and t.requires_grad) for t in ins]
            return tuple(_leaf(t, k) for t, k in zip(ins, keep)), keep
        if self.stage_rank[prv] == self.rank:
            outs = self.local_acts.pop((prv, mb))
            leaves = tuple(_leaf(o, grad and o.requires_grad) for o in outs)
            return leaves, [bool(grad and o.requires_grad) for o in outs]
        if ("F", stage, mb) in self.groups:
            metas, data = self._group_part(("F", stage, mb))
        else:
            fields, metas, data = self.recvs.pop(("F", stage, mb)).wait()
            self._check_fields(fields, ("F", stage, mb))
        leaves = tuple(t.requires_grad_(grad and m.requires_grad) for t, m in zip(data, metas))
        return leaves, [bool(grad and m.requires_grad) for m in metas]

    def _b_grads(self, stage: int, mb: int, ch: _Chunk) -> tuple[list, list]:
        """(differentiable outputs or edges, their gradients) for the backward of (stage, mb)."""
        if ch.loss is not None:
            return [ch.loss], [torch.ones_like(ch.loss)]
        nxt = self._next(stage)
        diff = [o for o, m in zip(ch.outs, ch.out_meta) if m.requires_grad]
        if self.stage_rank[nxt] == self.rank:
            grads = self.local_grads.pop((nxt, mb))
        elif ("B", stage, mb) in self.groups:
            grads = self._group_part(("B", stage, mb))[1]
        else:
            grads = self.recvs.pop(("B", stage, mb)).wait(
                ("receiving the output gradient for stage %d mb %d", stage, mb)
            )
        return diff, list(grads)

    # ---------------------------------------------------------------------------------------------------
    # compute

    def _finish(self, stage: int, mb: int) -> Callable[[Any], Any]:
        """Stage output -> (outputs tuple, loss or None): the criterion runs on a chain's last stage."""
        last = self._next(stage) is None
        io = self.io

        def finish(out: Any) -> Any:
            outs = out if isinstance(out, tuple) else (out,)
            loss = None
            if last and io.criterion is not None and mb in io.labels:
                loss = io.criterion(*outs, *io.labels[mb])
            return outs, loss

        return finish

    def _forward_steps(self, stage: int, mb: int, inputs: tuple):
        name = f"F{stage}.{mb}" if self.prof else None
        return forward_steps(self.module_of[stage], inputs, self._finish(stage, mb), name=name)

    def _forward_now(self, stage: int, mb: int, inputs: tuple) -> ChunkGraph:
        """The forward of (stage, mb) to its end, without overlap (``forward_steps`` returns at once for
        a one-piece module)."""
        return drive(self._forward_steps(stage, mb, inputs))

    def _after_forward(
        self, stage: int, mb: int, inputs: tuple, needs: list[bool], graph: ChunkGraph
    ) -> None:
        outs, loss = graph.result
        graph.result = None
        last = self._next(stage) is None
        ch = _Chunk(inputs, needs, graph, loss)
        grad = torch.is_grad_enabled()
        if last:
            if loss is not None:
                self.losses[mb] = loss.detach()
            if self.io.return_outputs:
                self.outputs[mb] = tuple(o.detach() for o in outs)
            if not grad:
                return
            if loss is None:
                raise ValueError(
                    f"stage {stage} is the last of its chain: step() needs a criterion and labels"
                )
        else:
            for i, o in enumerate(outs):
                if not isinstance(o, Tensor):
                    raise TypeError(
                        f"stage {stage} output {i} is a {type(o).__name__}; boundaries carry tensors"
                    )
            ch.outs = list(outs)
            ch.out_meta = [Meta(tuple(o.shape), o.dtype, o.requires_grad) for o in outs]
            nxt = self._next(stage)
            if self.stage_rank[nxt] == self.rank:
                self.local_acts[(stage, mb)] = tuple(outs)
                if not grad:
                    return
        self.chunks[(stage, mb)] = ch
        if torch.is_grad_enabled():
            self.live += 1
            self.live_w += 1
            if self.live > self.peak:
                self.peak = self.live
            if self.live_w > self.peak_w:
                self.peak_w = self.live_w

    def _backward_steps(self, stage: int, mb: int, split: bool):
        ch = self.chunks[(stage, mb)]
        outs, grads = self._b_grads(stage, mb, ch)
        fn = self.split if split else full_backward
        return backward_steps(ch.graph, outs, grads, fn, name=f"B{stage}.{mb}" if self.prof else None)

    def _backward_now(self, stage: int, mb: int, split: bool) -> Callable[[], Any]:
        """Wait for the output gradients of (stage, mb) now; return its backward, run to its end
        without overlap when called."""
        ch = self.chunks[(stage, mb)]
        graph = ch.graph
        if graph.pieces != 1:
            steps = self._backward_steps(stage, mb, split)
            return lambda: drive(steps)
        outs, grads = self._b_grads(stage, mb, ch)
        fn = self.split if split else full_backward
        name = f"B{stage}.{mb}" if self.prof else None
        return lambda: backward_once(graph, outs, grads, fn, name=name)

    def _after_backward(self, stage: int, mb: int, result, split: bool) -> None:
        ch = self.chunks[(stage, mb)]
        by_id, w_work = result
        ch.in_grads = [
            (by_id.get(id(x)) if by_id.get(id(x)) is not None else torch.zeros_like(x)) if need else None
            for x, need in zip(ch.inputs, ch.needs_grad)
        ]
        ch.graph, ch.outs, ch.loss, ch.inputs = None, [], None, ()
        prv = self._prev(stage)
        if prv is not None and self.stage_rank[prv] == self.rank:
            self.local_grads[(stage, mb)] = [g for g in ch.in_grads if g is not None]
            ch.in_grads = None
        elif prv is None:
            ch.in_grads = None
        self.live -= 1
        if split:
            ch.w_work = w_work or [_nothing]  # the W action still comes (and ends the chunk)
        else:
            for w in w_work:
                w()
            self.live_w -= 1
        self._maybe_drop(stage, mb)

    def _maybe_drop(self, stage: int, mb: int) -> None:
        """Forget a chunk once its backward ran, its input gradients left and its W is done."""
        ch = self.chunks.get((stage, mb))
        if ch is not None and ch.graph is None and ch.in_grads is None and not ch.w_work:
            self.chunks.pop((stage, mb))

    def _timed(self, a: Action, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` as action ``a``: a timeline event (and a profiler span while one runs)."""
        start = time.perf_counter()
        self.inner_wait = 0.0
        if self.prof:
            with torch.profiler.record_function(f"dualpipe.{a}"):
                fn(*args)
        else:
            fn(*args)
        end = time.perf_counter()
        # an F&B that waited for its backward half's gradient is drawn as starting that much later (the
        # wait is bubble, not busy time)
        start += self.inner_wait
        self.events.append(
            Event(self.rank, a.op._value_, a.stage, a.mb, start - self.t0, end - self.t0, a.stage2, a.mb2)
        )

    # The handlers hand bound methods and their arguments to ``_timed`` rather than closures: no
    # function objects are made per action.

    def _do_F(self, a: Action) -> None:
        inputs, needs = self._f_inputs(a.stage, a.mb)
        self._timed(a, self._run_f, a, inputs, needs)

    def _run_f(self, a: Action, inputs: tuple, needs: list[bool]) -> None:
        self._after_forward(a.stage, a.mb, inputs, needs, self._forward_now(a.stage, a.mb, inputs))

    def _do_B(self, a: Action, split: bool = True) -> None:
        if a.op is Op.B and (a.stage, a.mb) in self.fused:
            split = False  # its W comes next: one full backward, without the split's extra passes
        backward = self._backward_now(a.stage, a.mb, split)  # waits for the gradients first
        self._timed(a, self._run_b, a.stage, a.mb, backward, split)

    def _run_b(self, stage: int, mb: int, backward: Callable[[], Any], split: bool) -> None:
        self._after_backward(stage, mb, backward(), split)

    def _do_BW(self, a: Action) -> None:
        self._do_B(a, split=False)

    def _do_W(self, a: Action) -> None:
        if (a.stage, a.mb) in self.fused:  # done by its B (a zero-length event keeps the timeline whole)
            self._timed(a, _nothing)
            return
        self._timed(a, self._run_w, a.stage, a.mb)

    def _run_w(self, stage: int, mb: int) -> None:
        ch = self.chunks[(stage, mb)]
        for w in ch.w_work:
            w()
        ch.w_work = []
        self.live_w -= 1
        self._maybe_drop(stage, mb)

    def _waited(self, backward_of: Callable[..., Any], stage: int, mb: int) -> Any:
        """``backward_of(stage, mb, split=False)`` (it waits for the output gradient first); the wait is
        added to ``inner_wait``, the part of an F&B action drawn as bubble."""
        t0 = time.perf_counter()
        out = backward_of(stage, mb, split=False)
        self.inner_wait += time.perf_counter() - t0
        return out

    def _do_FB(self, a: Action) -> None:
        inputs, needs = self._f_inputs(a.stage, a.mb)
        nxt = self._next(a.stage)
        early = nxt is not None and ("F", nxt, a.mb) in self.early
        direct = (
            self.plain_overlap
            and self.one_piece[a.stage]
            and self.chunks[(a.stage2, a.mb2)].graph.pieces == 1
        )
        self._timed(a, self._fb_direct if direct else self._fb_overlapped, a, inputs, needs, early)

    def _fb_forward_done(self, a: Action, inputs: tuple, needs: list[bool], early: bool, graph) -> None:
        self._after_forward(a.stage, a.mb, inputs, needs, graph)
        if early:  # the activation leaves now; the neighbour's next F&B needs it first
            self._send_f(a.stage, a.mb, self.stage_rank[self._next(a.stage)])
            self.sent_early.add((a.stage, a.mb))

    def _fb_direct(self, a: Action, inputs: tuple, needs: list[bool], early: bool) -> None:
        """One piece each, forward then backward: what the built-in overlap functions would do."""
        self._fb_forward_done(a, inputs, needs, early, self._forward_now(a.stage, a.mb, inputs))
        backward = self._waited(self._backward_now, a.stage2, a.mb2)
        self._after_backward(a.stage2, a.mb2, backward(), split=False)

    def _fb_overlapped(self, a: Action, inputs: tuple, needs: list[bool], early: bool) -> None:
        """The two halves as step iterators, driven by the pipeline's overlap function."""

        def backward() -> Generator[str, None, Any]:
            # the output gradient is awaited only when the backward half starts (after the forward
            # half, under the default overlap), so its transfer overlaps the forward half
            steps = self._waited(self._backward_steps, a.stage2, a.mb2)
            return (yield from steps)

        f = _Tracked(
            self._forward_steps(a.stage, a.mb, inputs),
            on_done=lambda graph: self._fb_forward_done(a, inputs, needs, early, graph),
        )
        b = _Tracked(backward())
        self.overlap(f, b)
        if not (f.done and b.done):
            raise RuntimeError(
                f"overlap function {self.overlap!r} returned before both halves of {a} finished"
            )
        self._after_backward(a.stage2, a.mb2, b.value, split=False)


class RankPlan:
    """What one rank derives from a schedule, once: per action its handler and the local module whose
    weight gradients are complete after it (or None), the fused B/W, and the micro-batches whose chain
    starts (inputs) and ends (losses) on this rank."""

    def __init__(self, schedule: Schedule, rank: int):
        s = schedule
        mbs = range(s.num_microbatches)
        self.first = [m for m in mbs if s.stage_rank[s.chains[s.mb_chain[m]][0]] == rank]
        self.last = [m for m in mbs if s.stage_rank[s.chains[s.mb_chain[m]][-1]] == rank]
        self.fused = fused_backwards(schedule, rank)
        done = _last_weight_actions(schedule, rank)
        self.program = [
            (getattr(Engine, "_do_" + a.op.value), a, done.get(i))
            for i, a in enumerate(schedule.actions[rank])
        ]


def fused_backwards(schedule: Schedule, rank: int) -> frozenset[tuple[int, int]]:
    """(stage, mb) of the B actions on ``rank`` followed by their own W with nothing in between but
    receive posts: nothing is gained by splitting them (no send or compute waits between the two), so
    the runtime runs one full backward in B and the W does nothing. Saves the split's cost (the generic
    split's extra autograd passes), e.g. in a pipeline's cooldown."""
    acts = schedule.actions[rank]
    out = set()
    for i, a in enumerate(acts):
        if a.op is not Op.B:
            continue
        j = i + 1
        while j < len(acts) and acts[j].op in (Op.RECV_F, Op.RECV_B):
            j += 1
        if j < len(acts) and acts[j].op is Op.W and (acts[j].stage, acts[j].mb) == (a.stage, a.mb):
            out.add((a.stage, a.mb))
    return frozenset(out)


def _last_weight_actions(schedule: Schedule, rank: int) -> dict[int, int]:
    """Position in ``rank``'s action list of the last action adding to each local stage's weight
    gradients (W, BW, B, or the backward half of an F&B) -> the stage's local index."""
    local = schedule.local_stages(rank)
    last: dict[int, int] = {}
    for i, a in enumerate(schedule.actions[rank]):
        if a.op in (Op.W, Op.BW, Op.B):
            last[a.stage] = i
        elif a.op is Op.FB:
            last[a.stage2] = i
    return {i: local.index(st) for st, i in last.items()}


def _nothing() -> None:
    pass


def _leaf(t: Any, grad: bool) -> Any:
    if not isinstance(t, Tensor):
        return t
    return t.detach().requires_grad_(True) if grad and t.is_floating_point() else t.detach()
