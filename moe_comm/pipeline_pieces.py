"""MoELayer as compute pieces separated by communication points, for dualpipe's overlap hook.

dualpipe (``dualpipe/overlap.py``) cuts a module's autograd graph at the ``CommPoint``s its
``forward_pieces`` yields and runs the communication itself: ``point.forward(*tensors)`` launches it (the
tensors come detached) and ``point.backward(*grads)`` launches its adjoint, each returning an object whose
``wait()`` gives the received tensors. The runtime interleaves one micro-batch's forward pieces with another
micro-batch's backward pieces, so that A's dispatch travels while B's expert backward computes.

The MoE layer has three pieces and two points:

    piece 0   route (topk_idx, topk_weights); shared experts          (the dispatch is in flight meanwhile)
    dispatch  tokens -> expert layout       adjoint: combine of the gradients (weights 1)
    piece 1   routed experts
    combine   (y, topk_weights) -> out      adjoint: dispatch of d out weighted at the experts, and d weights
    piece 2   out + shared

``carry``: tensors the caller keeps across the layer (a residual, embeddings for a later module) are
appended to both points' ``carry`` so that the graph is cut cleanly there too; they come back with the
output: ``out, carried = yield from layer.forward_pieces(x, carry=(h, ...))``.

The launchers are the Dispatcher's raw (graph-free) ones; the routing weights travel through the combine
point as a sent tensor (carried past the dispatch point), so their gradient reaches the router. FP8
payloads: the dispatch point returns the grad proxy (a float tensor) and the experts read the FP8Tensor
kept in the shared state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moe_comm.dispatcher import DispatchResult, Work

__all__ = ["moe_forward_pieces"]


class _Received:
    """dualpipe's PendingComm over a moe_comm Work: ``wait()`` -> tuple of tensors."""

    def __init__(self, work: Work, convert: Callable[[Any], Sequence[torch.Tensor | None]]) -> None:
        self.work, self.convert = work, convert

    def wait(self) -> tuple[torch.Tensor | None, ...]:
        return tuple(self.convert(self.work.wait()))


class _State:
    """What the two points of one micro-batch share: routing, the dispatch result and its handle."""

    def __init__(self, layer, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> None:
        self.layer, self.topk_idx, self.topk_weights = layer, topk_idx, topk_weights
        self.result: DispatchResult | None = None
        self.y_dtype: torch.dtype | None = None

    def dispatch(self, tokens: torch.Tensor) -> _Received:
        d = self.layer.dispatcher
        work = d.launch_dispatch(tokens, self.topk_idx, self.topk_weights, payload=self.layer.payload)

        def received(res: DispatchResult):
            self.result = res
            if res.grad_proxy is None and not isinstance(res.x, torch.Tensor):  # FP8: a float stand-in
                shape = res.x.shape
                res.grad_proxy = torch.zeros((), dtype=tokens.dtype, device=tokens.device).expand(shape)
                return (res.grad_proxy,)
            return (res.x,)

        return _Received(work, received)

    def dispatch_backward(self, grad: torch.Tensor | None) -> _Received:
        return _Received(
            self.layer.dispatcher.launch_dispatch_backward(grad, self.result.handle), lambda g: (g,)
        )

    def combine(self, y: torch.Tensor, weights: torch.Tensor) -> _Received:
        self.y_dtype = y.dtype
        return _Received(self.layer.dispatcher.launch_combine(y, self.result.handle), lambda out: (out,))

    def combine_backward(self, grad_out: torch.Tensor | None) -> _Received:
        work = self.layer.dispatcher.launch_combine_backward(grad_out, self.result.handle, self.y_dtype)
        w_dtype = self.topk_weights.dtype
        return _Received(work, lambda gs: (gs[0], None if gs[1] is None else gs[1].to(w_dtype)))


def moe_forward_pieces(layer, x: torch.Tensor, carry: Sequence[torch.Tensor] | None = None):
    """The generator behind ``MoELayer.forward_pieces`` (see the module docstring).

    ``carry``: the caller's tensors threaded through both points (returned with the output)."""
    from dualpipe.overlap import CommPoint

    extra = () if carry is None else tuple(carry)
    n = len(extra)
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    topk_idx, topk_weights = layer.router(x)
    st = _State(layer, topk_idx, topk_weights)
    shared = layer.shared_experts(tokens) if layer.shared_experts is not None else tokens.new_zeros(())
    xe, topk_weights, shared, *extra = yield CommPoint(
        st.dispatch, st.dispatch_backward, (tokens,), carry=(topk_weights, shared, *extra), name="dispatch"
    )
    res = st.result
    res = (
        dataclasses.replace(res, grad_proxy=xe)
        if res.grad_proxy is not None
        else dataclasses.replace(res, x=xe)
    )
    y = layer.experts(res)
    out, shared, *extra = yield CommPoint(
        st.combine, st.combine_backward, (y, topk_weights), carry=(shared, *extra), name="combine"
    )
    out = (out + shared).view(shape)
    assert len(extra) == n, f"{len(extra)=} carried tensors came back, expected {n}"
    return out if carry is None else (out, tuple(extra))
