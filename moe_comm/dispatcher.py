"""Expert-parallel dispatch and combine over all-to-all, as autograd functions.

    disp = Dispatcher(ep_group, num_experts=64, ranks_per_node=8, align=128)
    res = disp.dispatch(x, topk_idx, topk_weights)        # x (T, H); res.x (sum_e M_e, H) grouped by expert
    y = experts(res.x, res.m_offsets)                      # any per-expert computation, same row layout
    out = disp.combine(y, res.handle)                      # (T, H) in x.dtype

Semantics (what the tests check bitwise against a plain ``all_to_all_single`` of one row per pair):
  dispatch  expert e of this rank receives x[t] of every (source rank s, token t, slot k) with
            topk_idx[t, k] == e, ordered by (s, t, k), in ``res.x[m_offsets[e] : m_offsets[e] + counts[e]]``.
  combine   out[t] = sum over k = 0..K-1, in that order, in FP32, starting from 0, of
            topk_weights[t, k] * y[row of pair (t, k)], cast to x's dtype. Unused slots (id -1) add nothing.
  autograd  the backward of dispatch is a combine of the gradients (weights 1); the backward of combine
            is a dispatch of grad_out, multiplied by each pair's weight on the expert side, plus
            d topk_weights[t, k] = <grad_out[t], y_pair> in FP32.

Transfer. A token crosses to each destination rank once, whatever number of that rank's experts it picked
(the receiver expands it into one row per pair). Hierarchical mode (ranks in several nodes): a token
crosses the inter-node link once per destination NODE, to the rank with the sender's local index there,
which forwards it inside its node. Combine returns one row per pair along the reverse path, so that the
source sums them in its fixed order. Metadata (expert ids, weights) travels inside the payload rows: one
collective per hop. FP8 payloads (``payload="fp8"``) are quantized per 1x128 tile before sending (data and
FP32 scales travel) and arrive as an ``fp8.FP8Tensor``; combine stays in the experts' dtype (BF16).

Receive counts. Default (``capacity=None``): per-peer counts are exchanged first (with a signature of the
call, so that a hidden size, dtype or top-k that differs across ranks raises on every rank) and read on
the host. ``capacity=C``: every peer is sent a fixed C-row slot per rank, empty slots marked by meta -1;
no count exchange, no host synchronisation, static shapes, output in the masked layout
(num_local_experts, world_size * C, H) with per-expert counts in a tensor. Flat topology only.

Async. ``dispatch(..., async_op=True)`` / ``combine(..., async_op=True)`` return a work object at once;
``wait()`` returns the result, ``progress()`` launches the next hop if the previous one landed (without
blocking). Every wait is bounded by ``timeout`` and names the peer that did not answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import record_function

from moe_comm.comm import Chain, Comm, ThreadRun
from moe_comm.expert_chunks import AUTO_MIN_ROW_BYTES, build_plan, chunks_to_source
from moe_comm.expert_layout import ContiguousLayout, MaskedLayout
from moe_comm.layout import Topology, check_topk_idx
from moe_comm.row_ops import sum_pairs_fp32, weights_grad
from moe_comm.stages import DynamicStage, RowFormat, StaticStage

__all__ = ["Dispatcher", "DispatchHandle", "DispatchResult", "Work", "sum_pairs_fp32"]

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_SIGNATURE_LABELS = {"dtype": [str(d) for d in _DTYPE_CODES], "payload": ["native", "fp8"],
                     "combine": ["pairs", "reduced"]}  # fmt: skip
_PAYLOADS = ("native", "fp8")
_COMBINE_MODES = ("pairs", "reduced")


@dataclass
class DispatchHandle:
    """What combine and both backwards need: the hops' index plans and the source-side routing."""

    dispatcher: Dispatcher
    stages: list
    layout: ContiguousLayout | MaskedLayout
    topk_idx: torch.Tensor  # (T, K) int64
    topk_weights: torch.Tensor  # (T, K) as given (autograd input of combine)
    x_dtype: torch.dtype
    hidden: int
    payload: str
    expanded: torch.Tensor | None = None  # the dispatch chain's output, until DispatchFn takes it
    # kept by combine for its backward (d topk_weights): ("pairs", (rows, (T, K) index)) or ("reduced", y)
    combine_saved: tuple | None = None
    chunk_plan: Any = None  # moe_comm.expert_chunks plan, built on the first combine by expert

    def weights_fp32(self) -> torch.Tensor:
        """The routing weights as used by combine: FP32, 0 at unused slots, detached."""
        return torch.where(self.topk_idx >= 0, self.topk_weights.detach().float(), 0.0)

    @property
    def num_tokens(self) -> int:
        return self.topk_idx.shape[0]


@dataclass
class DispatchResult:
    """Received tokens grouped by local expert.

    x: contiguous layout (sum_e aligned M_e, H) -- or masked (E_local, capacity, H) with ``capacity`` set --
       in x's dtype; an ``fp8.FP8Tensor`` (data e4m3, scale (rows, ceil(H/128)) fp32) for FP8 payloads.
    tokens_per_expert: (E_local,) int64 real rows per expert (masked layout: rows per expert block).
    m_offsets: (E_local + 1,) int64 row offsets of the (padded) groups; None for the masked layout.
    tokens_per_expert_list: the counts as host ints (contiguous layout only).
    grad_proxy: FP8 payloads only: a differentiable (rows, H) stand-in with zero strides whose gradient is
       the gradient of the dequantized tokens; pass it to the expert function (``dequantized()`` does).
    """

    x: Any
    tokens_per_expert: torch.Tensor
    m_offsets: torch.Tensor | None
    handle: DispatchHandle
    tokens_per_expert_list: list[int] | None = None
    grad_proxy: torch.Tensor | None = None

    @property
    def layout(self) -> str:
        return self.handle.layout.kind

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tokens as a plain differentiable tensor (FP8 payloads dequantized, gradient to the source)."""
        if self.grad_proxy is None:
            return self.x if dtype is None else self.x.to(dtype)
        from moe_comm.functions import DequantThroughProxy

        return DequantThroughProxy.apply(self.grad_proxy, self.x, dtype or self.handle.x_dtype)


class Work:
    """An asynchronous dispatcher operation, launched: ``wait()`` returns its result (bounded by the
    timeout); ``is_done()`` tells, without blocking, whether the transfer in flight has landed.

    ``name``: the operation ("dispatch", "combine", "dispatch.backward", "combine.backward"); the first
    ``wait()`` runs inside a profiler span ``<name>.wait``."""

    def __init__(
        self, chain: Chain | ThreadRun, finish: Callable[[Any], Any] | None = None, name: str = "moe_comm"
    ) -> None:
        self._chain, self._finish, self.name = chain, finish, name
        self._result, self._finished = None, False

    def is_done(self) -> bool:
        return self._finished or self._chain.is_done()

    def wait(self) -> Any:
        if not self._finished:
            with record_function(f"{self.name}.wait"):
                value = self._chain.wait()
                self._result = self._finish(value) if self._finish is not None else value
            self._finished = True
        return self._result


class Dispatcher:
    """Dispatch/combine over an expert-parallel process group.

    Args:
        group: the expert-parallel group (``dist.group.WORLD`` for all ranks); ``None`` = local mode (EP=1):
            this rank owns every expert and nothing is communicated.
        num_experts: routed experts E, a multiple of the group size; rank r owns [r*E/W, (r+1)*E/W).
        ranks_per_node: consecutive group ranks that share a node (default: all of them, one node).
        hierarchical: two-hop transfer across nodes (default: on when the group spans several nodes).
        align: pad each expert's rows to a multiple of this (grouped-GEMM tiles), contiguous layout.
        capacity: worst-case tokens per rank; enables the no-host-sync path (masked layout). On a GPU that
            path does not range-check expert ids (it would synchronise); the first call per input
            signature checks the peers' signatures (one synchronisation), later calls none.
        combine: "pairs" (every (token, expert) output returns to the source, summed there in FP32 in k order:
            bitwise equal to the plain all_to_all_single reference) or "reduced" (DeepEP's traffic: each
            rank, then each node's forwarder, pre-sums a token's outputs in FP32 and returns one row per
            (token, rank / node) in y's dtype; deterministic, partial sums rounded per hop).
        combine_by_expert: return expert outputs (combine, dispatch backward) with one all-to-all per
            local expert straight from the layout, instead of gathering them into one send buffer
            (moe_comm/expert_chunks.py). None (default): when a row of x's dtype is >= 8 KiB or there is
            one local expert. Flat topology with exact counts only (ignored otherwise).
        timeout: seconds any wait may block before raising a PeerError naming the silent peer.
        comm_thread: run each exchange on the group's FIFO communication thread (default: on for gloo), so
            that count exchanges and later hops never block the caller (moe_comm/comm.py, "Issue order").
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        num_experts: int,
        *,
        ranks_per_node: int | None = None,
        hierarchical: bool | None = None,
        align: int = 1,
        capacity: int | None = None,
        combine: str = "pairs",
        combine_by_expert: bool | None = None,
        timeout: float = 300.0,
        comm_thread: bool | None = None,
    ) -> None:
        self.comm = Comm(group, timeout, comm_thread)
        if combine not in _COMBINE_MODES:
            raise ValueError(f"combine={combine!r} must be one of {_COMBINE_MODES}")
        if combine == "reduced" and capacity is not None:
            raise ValueError("combine='reduced' is implemented for the exact-count path (capacity=None)")
        self.combine_mode = combine
        W = self.comm.world_size
        self.topo = Topology(W, num_experts, ranks_per_node or W)
        self.num_experts = num_experts
        self.rank = self.comm.rank
        self.num_local_experts = self.topo.experts_per_rank
        self.first_local_expert = self.rank * self.num_local_experts
        if align < 1:
            raise ValueError(f"align={align} must be >= 1")
        self.align = align
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1 (tokens per rank) or None")
        self.capacity = capacity
        self.hierarchical = self.topo.num_nodes > 1 if hierarchical is None else bool(hierarchical)
        if self.hierarchical and self.topo.num_nodes == 1:
            raise ValueError(
                f"hierarchical=True needs several nodes: ranks_per_node={ranks_per_node}, world {W}"
            )
        if self.hierarchical and capacity is not None:
            raise ValueError(
                "capacity (no-host-sync path) supports the flat topology only: pass hierarchical=False"
            )
        self.combine_by_expert = combine_by_expert
        self._checked: set[tuple] = set()

    @classmethod
    def local(cls, num_experts: int, **kwargs) -> Dispatcher:
        """EP=1: every expert on this rank, no communication."""
        return cls(None, num_experts, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Dispatcher(world={self.comm.world_size}, rank={self.rank}, experts={self.num_experts}, "
            f"ranks_per_node={self.topo.ranks_per_node}, hierarchical={self.hierarchical}, "
            f"align={self.align}, capacity={self.capacity})"
        )

    # --------------------------------------------------------------------------- autograd entry points
    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        payload: str = "native",
        async_op: bool = False,
    ) -> DispatchResult | Work:
        """Send tokens to their experts: x (T, H) float, topk_idx (T, K) int (-1 = unused), weights (T, K).

        Differentiable in x (the backward is a combine of the gradients). ``topk_weights`` are only
        recorded here; they take effect (and get their gradient) in :meth:`combine`.
        """
        from moe_comm.functions import finish_dispatch

        return self._launch_dispatch(x, topk_idx, topk_weights, payload, finish_dispatch, async_op)

    def combine(
        self, y: torch.Tensor, handle: DispatchHandle, *, async_op: bool = False
    ) -> torch.Tensor | Work:
        """out[t] = sum_k w[t, k] * y[pair (t, k)] in FP32, k ascending, in x's dtype: (T, H).

        y: expert outputs in the dispatch layout (rows, H) or (E_local, capacity, H). Differentiable in y
        and in the ``topk_weights`` given to dispatch.
        """
        from moe_comm.functions import CombineFn

        def finish(result: tuple) -> torch.Tensor:
            return CombineFn.apply(y, handle.topk_weights, handle, result)

        return self._launch_combine(y, handle, finish, async_op)

    # --------------------------------------------------------------------------- raw launchers
    # No autograd: for runtimes that cut the graph at communication points (dualpipe's overlap hook)
    # and supply the adjoint themselves. Each returns a Work; results have requires_grad=False.
    def launch_dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *, payload: str = "native"
    ) -> Work:
        """Work -> DispatchResult whose ``x`` is not connected to the input's graph."""
        from moe_comm.functions import finish_dispatch_nograd

        return self._launch_dispatch(x, topk_idx, topk_weights, payload, finish_dispatch_nograd, True)

    def launch_combine(self, y: torch.Tensor, handle: DispatchHandle) -> Work:
        """Work -> out (T, H). Keeps the returned pairs on the handle for :meth:`launch_combine_backward`."""

        def finish(result: tuple) -> torch.Tensor:
            handle.combine_saved, out = result
            return out

        return self._launch_combine(y, handle, finish, True)

    def launch_dispatch_backward(self, grad: torch.Tensor, handle: DispatchHandle) -> Work:
        """Adjoint of dispatch: d expert_x (layout) -> Work -> d x (T, H), x dtype (a combine, weights 1)."""
        handle.layout.check_y(grad)

        def steps():
            src = yield from self._layout_to_source(grad.detach(), handle, "dispatch backward")
            return sum_pairs_fp32(*src, None, handle.x_dtype)

        with record_function("dispatch.backward"):
            return Work(self.comm.start(steps(), "dispatch backward"), name="dispatch.backward")

    def launch_combine_backward(
        self, grad_out: torch.Tensor, handle: DispatchHandle, y_dtype: torch.dtype
    ) -> Work:
        """Adjoint of combine: d out (T, H) -> Work -> (d y in the layout, d topk_weights (T, K) or None).

        d y[pair (t, k)] = w[t, k] * d out[t] (computed on the expert side, cast to ``y_dtype``);
        d w[t, k] = <d out[t], y[pair (t, k)]> in FP32 (needs the pairs kept by launch_combine).
        """
        grad_out = grad_out.detach().contiguous()
        saved, handle.combine_saved = handle.combine_saved, None
        layout, stages = handle.layout, handle.stages

        def steps():
            grad_w = None
            if saved is not None and saved[0] == "pairs":  # the pairs are at the source
                grad_w = weights_grad(grad_out, *saved[1], handle.topk_idx)
            rows = grad_out
            for s, st in enumerate(stages):
                rows = yield st.forward_rows(rows, f"combine backward hop {s}")
            grad_y = layout.scatter_pairs(rows, y_dtype)
            if saved is not None and saved[0] == "reduced":  # the pairs are at the experts: dot there, return
                dots = layout.pair_dots(rows, saved[1])
                dots = torch.cat([dots, dots.new_zeros(1, 1)])  # padded like every pairs buffer
                buf, index = yield from self._pairs_to_source(dots, handle, "combine backward (weights)")
                grad_w = torch.where(
                    handle.topk_idx >= 0, buf[:, 0].index_select(0, index.flatten()).view(index.shape), 0.0
                )
            return grad_y, grad_w

        with record_function("combine.backward"):
            return Work(self.comm.start(steps(), "combine backward"), name="combine.backward")

    # --------------------------------------------------------------------------- internals
    def _launch_dispatch(self, x, topk_idx, topk_weights, payload, finish, async_op):
        with record_function("dispatch"):
            self._check_inputs(x, topk_idx, topk_weights, payload)
            idx = topk_idx.long()
            w = torch.where(idx >= 0, topk_weights.detach().float(), 0.0)
            sig = self._signature(x, idx, payload)
            chain = self.comm.start(self._dispatch_steps(x.detach(), idx, w, payload, sig), "dispatch")

        def done(parts) -> DispatchResult:
            stages, layout, expanded = parts
            handle = DispatchHandle(self, stages, layout, idx, topk_weights, x.dtype, x.shape[1], payload)
            return finish(x, handle, expanded)

        work = Work(chain, done, "dispatch")
        return work if async_op else work.wait()

    def _launch_combine(self, y, handle: DispatchHandle, finish, async_op):
        with record_function("combine"):
            work = Work(self._start_combine(y, handle), finish, "combine")
        return work if async_op else work.wait()

    def _start_combine(self, y, handle: DispatchHandle) -> Chain | ThreadRun:
        if handle.dispatcher is not self:
            raise ValueError("the handle comes from another Dispatcher")
        if not y.is_floating_point():
            raise ValueError(f"y.dtype={y.dtype} must be floating point")
        handle.layout.check_y(y)
        weights = handle.weights_fp32()

        def steps():  # all on the communication thread: gather, hops, FP32 sums
            yd = y.detach()
            if self.combine_mode == "pairs":  # every pair back to the source, summed there in k order
                src = yield from self._layout_to_source(yd, handle, "combine")
                return ("pairs", src), sum_pairs_fp32(*src, weights, handle.x_dtype)
            # reduced: a rank sums its pairs of a row (k ascending), a forwarder its ranks' partials (rank
            # ascending), the source its nodes' / ranks' partials (ascending); partials in y's dtype per hop
            partial = handle.layout.row_partials(yd)
            for s in reversed(range(len(handle.stages))):
                buf, slots = yield handle.stages[s].reverse_rows(partial, f"combine hop {s}")
                partial = sum_pairs_fp32(buf, slots, None, yd.dtype if s > 0 else handle.x_dtype)
            return ("reduced", yd), partial

        return self.comm.start(steps(), "combine")

    def _check_inputs(self, x, topk_idx, topk_weights, payload) -> None:
        if payload not in _PAYLOADS:
            raise ValueError(f"payload={payload!r} must be one of {_PAYLOADS}")
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"x must be a (num_tokens, hidden) float tensor, got {tuple(x.shape)} {x.dtype}")
        if x.dtype not in _DTYPE_CODES:
            raise ValueError(f"x.dtype={x.dtype} is not supported; use one of {list(_DTYPE_CODES)}")
        # The no-host-sync path on a GPU skips the id range check, which would synchronise.
        check_topk_idx(
            topk_idx, self.num_experts, values=not (self.capacity is not None and topk_idx.is_cuda)
        )
        if topk_idx.shape[0] != x.shape[0]:
            raise ValueError(f"topk_idx.shape={tuple(topk_idx.shape)} must have x.shape[0]={x.shape[0]} rows")
        if topk_weights.shape != topk_idx.shape or not topk_weights.is_floating_point():
            raise ValueError(
                f"topk_weights must be a float tensor of topk_idx's shape {tuple(topk_idx.shape)}, got "
                f"{tuple(topk_weights.shape)} {topk_weights.dtype}"
            )
        if self.capacity is not None and x.shape[0] > self.capacity:
            raise ValueError(f"num_tokens={x.shape[0]} exceeds capacity={self.capacity} tokens per rank")

    def _signature(self, x: torch.Tensor, idx: torch.Tensor, payload: str) -> dict[str, int]:
        return {
            "hidden size": x.shape[1],
            "dtype": _DTYPE_CODES[x.dtype],
            "top-k": idx.shape[1],
            "num_experts": self.num_experts,
            "ranks_per_node": self.topo.ranks_per_node,
            "hierarchical": int(self.hierarchical),
            "payload": _PAYLOADS.index(payload),
            "capacity (0 = exact counts)": self.capacity or 0,
            "combine": _COMBINE_MODES.index(self.combine_mode),
            "combine by expert (0 no, 1 yes, 2 auto)": {False: 0, True: 1, None: 2}[self.combine_by_expert],
        }

    def _payload_bytes(self, x: torch.Tensor, payload: str) -> tuple[torch.Tensor, int]:
        """(T, payload_bytes) uint8 rows: x's bytes, or [e4m3 data | pad to 4 | fp32 1x128 scales]."""
        if payload == "native":
            data = x.contiguous().view(torch.uint8)
            return data, data.shape[1]
        from moe_comm.functions import pack_fp8_rows

        return pack_fp8_rows(x)

    def _dispatch_steps(self, x, idx, w, payload, sig):
        """Generator of hops (driven by comm.Chain); returns (stages, layout, recv, fmt)."""
        payload_rows, pb = self._payload_bytes(x, payload)
        fmt = RowFormat(pb, idx.shape[1])
        topo, comm = self.topo, self.comm
        if self.capacity is not None and tuple(sig.values()) not in self._checked:
            zeros = torch.zeros(comm.world_size, dtype=torch.long)
            got = yield comm.exchange_counts(zeros, sig, "dispatch check")
            comm.check_signature(got, sig, "dispatch", _SIGNATURE_LABELS)
            self._checked.add(tuple(sig.values()))
        if self.hierarchical:  # hop 0 to the same local index on each target node, hop 1 inside the node
            R, li = topo.ranks_per_node, topo.local_index(self.rank)
            hops = [
                ("inter-node", lambda meta: torch.where(meta >= 0, topo.node_of(meta) * R + li, -1)),
                ("intra-node", topo.rank_of),
            ]
        else:
            hops = [("flat", topo.rank_of)]
        rows, meta, weights, stages, recv = payload_rows, idx, w, [], None
        origin = torch.full((idx.shape[0],), self.rank, dtype=torch.long, device=idx.device)
        for s, (name, target_of) in enumerate(hops):
            what = f"dispatch hop {s} ({name})"
            target = target_of(meta)
            if self.capacity is None:
                st = DynamicStage(comm, target)
                counts = comm.exchange_counts(st.send_counts, {**sig, "hop": s}, what + " counts")
                buf = st.pack(fmt, rows, meta, weights, origin)  # while the counts travel
                got = yield counts
                st.recv_splits = comm.check_signature(got, {**sig, "hop": s}, what, _SIGNATURE_LABELS)
            else:
                st = StaticStage(comm, target, self.capacity, min(idx.shape[1], self.num_local_experts))
                buf = st.pack(fmt, rows, meta, weights, origin)
            recv = yield st.send_packed(buf, fmt, what)
            meta, weights, origin = st.received(fmt, recv)
            rows = fmt.payload(recv)
            stages.append(st)
        first, num = self.first_local_expert, self.num_local_experts
        if self.capacity is None:
            # Rows arrive forwarder-major after two hops: order the experts' rows by origin rank (stable, so
            # each origin keeps its token order) to get the same layout as a flat transfer.
            row_order = torch.sort(origin, stable=True).indices if self.hierarchical else None
            layout = ContiguousLayout(meta, weights, first, num, self.align, row_order)
        else:
            cap_e = (comm.world_size * self.capacity + self.align - 1) // self.align * self.align
            layout = MaskedLayout(meta, weights, first, num, cap_e, min(idx.shape[1], num))
        from moe_comm.functions import expand_payload

        return stages, layout, expand_payload(layout, fmt, recv, payload, x.shape[1], x.dtype)

    def combines_by_expert(self, handle: DispatchHandle) -> bool:
        """Whether outputs in the layout go back by local expert (the same answer on every rank)."""
        if self.combine_by_expert is False or self.comm.is_local or len(handle.stages) != 1:
            return False
        if handle.layout.kind != "contiguous":
            return False
        if self.combine_by_expert:
            return True
        row_bytes = handle.hidden * torch.empty((), dtype=handle.x_dtype).element_size()
        return self.num_local_experts == 1 or row_bytes >= AUTO_MIN_ROW_BYTES

    def _layout_to_source(self, y: torch.Tensor, handle: DispatchHandle, what: str):
        """Generator: rows in the expert layout -> at the source, (rows + a zero row, (T, K) index)."""
        if self.combines_by_expert(handle):
            if handle.chunk_plan is None:
                handle.chunk_plan = build_plan(handle, self.comm.world_size)
            return (yield from chunks_to_source(self.comm, y, handle, handle.chunk_plan, what))
        return (yield from self._pairs_to_source(handle.layout.gather_pairs(y), handle, what))

    def _pairs_to_source(self, pairs: torch.Tensor, handle: DispatchHandle, what: str):
        """Generator: per-pair rows at the experts, followed by a zero row -> at the source, (rows + a zero
        row, (T, K) index)."""
        for s in reversed(range(1, len(handle.stages))):
            pairs = yield handle.stages[s].reverse_pairs(pairs, f"{what} hop {s}")
        return (yield handle.stages[0].reverse_pairs_indexed(pairs, f"{what} hop 0"))
