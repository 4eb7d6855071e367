"""A DeepSeekMoE layer for any model: router -> dispatch -> routed experts -> combine (+ shared experts).

    layer = MoELayer(
        DeepSeekV3Router(dim, num_experts=64, topk=6, num_groups=8, topk_groups=3),
        GroupedExperts(64 // ep_size, dim, inter_dim),
        Dispatcher(ep_group, 64, ranks_per_node=8),          # or None: local mode (EP=1), no communication
        shared_experts=MyMLP(dim),
    )
    y = layer(x)                                              # x (..., H) -> (..., H), fully differentiable

Every rank of the expert-parallel group runs the layer on its own tokens; routed experts live where the
Dispatcher places them (``GroupedExperts`` holds this rank's ``num_experts / ep_size`` of them); the router
and the shared experts are replicated like any dense layer.

Overlap. ``forward_steps(x)`` is the same forward as a generator that yields an asynchronous ``Work`` at
each communication point and resumes with its result; ``moe_comm.overlap.interleave`` runs two micro-batches'
generators so that one's dispatch/combine is in flight while the other computes. The shared experts of a
micro-batch run while its own dispatch is in flight. ``forward_pieces(x)`` is the same forward for
dualpipe's overlap hook (one micro-batch's forward against another's backward, see pipeline_pieces.py).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import torch
from torch import nn

from moe_comm.dispatcher import Dispatcher, Work

__all__ = ["MoELayer", "run_steps"]


def run_steps(steps: Generator[Work, Any, Any]) -> Any:
    """Drive a ``forward_steps`` generator, waiting each communication at once (the plain forward)."""
    value = None
    while True:
        try:
            work = steps.send(value)
        except StopIteration as stop:
            return stop.value
        value = work.wait()


class MoELayer(nn.Module):
    """Router + expert-parallel dispatch/combine + routed experts (+ optional shared experts).

    Args:
        router: module ``router(x (..., H)) -> (topk_idx (N, K) int64, topk_weights (N, K) float)``.
        experts: module ``experts(DispatchResult) -> y`` in the dispatch layout (e.g. GroupedExperts with
            ``dispatcher.num_local_experts`` experts).
        dispatcher: a :class:`Dispatcher`; ``None`` builds a local one (EP=1) from the router's num_experts.
        shared_experts: module applied to every token, added to the routed output (None: no shared expert).
        payload: "native" (tokens travel in x's dtype) or "fp8" (quantized 1x128 before dispatch).
    """

    def __init__(
        self,
        router: nn.Module,
        experts: nn.Module,
        dispatcher: Dispatcher | None = None,
        shared_experts: nn.Module | None = None,
        *,
        payload: str = "native",
    ) -> None:
        super().__init__()
        self.router, self.experts, self.shared_experts = router, experts, shared_experts
        num_experts = getattr(router, "num_experts", None)
        if dispatcher is None:
            if num_experts is None:
                raise ValueError("dispatcher=None needs a router with a num_experts attribute")
            dispatcher = Dispatcher.local(num_experts)
        if num_experts is not None and num_experts != dispatcher.num_experts:
            raise ValueError(
                f"router.num_experts={num_experts} != dispatcher.num_experts={dispatcher.num_experts}"
            )
        local = getattr(experts, "num_local_experts", None)
        if local is not None and local != dispatcher.num_local_experts:
            raise ValueError(
                f"experts.num_local_experts={local} must equal the dispatcher's "
                f"{dispatcher.num_local_experts} (num_experts={dispatcher.num_experts} over "
                f"{dispatcher.comm.world_size} ranks)"
            )
        self.dispatcher = dispatcher
        self.payload = payload

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_steps(self.forward_steps(x))

    def forward_steps(self, x: torch.Tensor) -> Generator[Work, Any, torch.Tensor]:
        """The forward as a generator: yields the dispatch and the combine as asynchronous Works."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        topk_idx, topk_weights = self.router(x)
        work = self.dispatcher.dispatch(tokens, topk_idx, topk_weights, payload=self.payload, async_op=True)
        shared = (
            self.shared_experts(tokens) if self.shared_experts is not None else None
        )  # under the dispatch
        res = yield work
        y = self.experts(res)
        out = yield self.dispatcher.combine(y, res.handle, async_op=True)
        if shared is not None:
            out = out + shared
        return out.view(shape)

    def forward_pieces(self, x: torch.Tensor, *, carry: Sequence[torch.Tensor] | None = None):
        """The forward for dualpipe's overlap hook: pieces separated by the dispatch and combine points
        (moe_comm/pipeline_pieces.py). Returns the output (..., H); with ``carry`` (tensors the caller
        keeps across the layer, e.g. the residual), ``(output, carry as it comes out of the last point)``:

            out, (h, *extra) = yield from moe.forward_pieces(norm(h), carry=(h, *extra))
        """
        from moe_comm.pipeline_pieces import moe_forward_pieces

        return moe_forward_pieces(self, x, carry)
