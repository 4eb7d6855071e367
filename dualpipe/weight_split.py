"""Zero-bubble weight-gradient split: the input backward (B) now, the weight backward (W) later.

Three policies, chosen per pipeline (``weight_split=``); all state lives in the policy object of one
pipeline instance, never in a global, so two pipelines in one process do not see each other's work.

- ``"generic"`` (``GenericSplit``, any module, autograd based). B asks autograd for the gradients of
  the stage inputs only, so no weight-gradient GEMM runs. Before that it walks the chunk's graph: nodes
  that lead to a stage input form the *input path* P; a W root is a node of P with a child outside P
  that leads to a parameter (for a Linear: the addmm node, whose weight edge is not needed by B). A
  pre-hook on each W root keeps the gradient flowing into it. W then runs autograd once per root, from
  that root to its own parameters only (``torch.autograd.backward`` on a ``GradientEdge``, so
  parameters accumulate through AccumulateGrad and their hooks fire). A parameter reached from two W
  roots of which one lies on the other's input path (weights reused along the path) would be counted
  twice: such a chunk falls back to a full backward in B (W does nothing) and the policy says so once.
- ``"linear"`` (``LinearSplit``, opt-in fast path). ``enable_linear_fast_path(module)`` routes every
  plain ``nn.Linear`` through an autograd function whose backward computes dgrad and, while this
  policy runs a B, queues the weight and bias gradient (``dW = dY^T X``) in the policy's own store
  instead of computing it; W runs the queue. No graph walk. Other parameters (norms, embeddings) get
  their gradients in B. Outside a pipeline the patched Linear computes everything at once. Custom
  autograd functions join the same fast path with ``defer_weight_work(fn)`` in their backward.
- ``"none"`` (``FullBackward``): every backward is full; W actions do nothing.

Each policy is a ``BackwardFn`` (see ``dualpipe.overlap``): ``policy(outputs, grads, inputs,
retain_graph) -> (input_grads, w_work)``; the runtime calls it for split backwards and calls
``full_backward`` for BW and F&B.
"""

from __future__ import annotations

import contextvars
import types
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from dualpipe import autograd_call

__all__ = [
    "defer_weight_work",
    "FullBackward",
    "GenericSplit",
    "LinearSplit",
    "enable_linear_fast_path",
    "full_backward",
    "make_policy",
]


def _take_grads(inputs: Sequence[Tensor]) -> list[Tensor | None]:
    """Read and clear ``.grad`` of our own leaves (the runtime's detached stage inputs)."""
    out = []
    for t in inputs:
        out.append(t.grad)
        t.grad = None
    return out


def full_backward(
    outputs: Sequence[Tensor], grads: Sequence[Tensor], inputs: Sequence[Tensor], retain_graph: bool
) -> tuple[list[Tensor | None], None]:
    """Inputs and weights at once (parameters accumulate into ``.grad``)."""
    for t in inputs:
        t.grad = None
    autograd_call.backward(outputs, grads, retain_graph=retain_graph)
    return _take_grads(inputs), None


class FullBackward:
    """``weight_split="none"``: B is a full backward, W does nothing."""

    name = "none"

    def __call__(self, outputs, grads, inputs, retain_graph):
        return full_backward(outputs, grads, inputs, retain_graph)


# --------------------------------------------------------------------------------------------------------
# Generic split


def _node(o: Tensor | GradientEdge):
    """The autograd node an output's gradient enters (None for a leaf output)."""
    return o.node if isinstance(o, GradientEdge) else o.grad_fn


class _Walk:
    """One pass over a chunk's graph: input path, W roots, their parameters, and reuse conflicts."""

    def __init__(self, roots: Sequence, input_ids: set[int]):
        self.reach_in: dict = {}
        self.weights: dict = {}  # node -> frozenset of parameter ids reachable from it
        self.params: dict[int, Tensor] = {}
        self.inputs_met: set[int] = set()
        order, kids_of = self._postorder(roots)
        reach_in, weights, empty = self.reach_in, self.weights, frozenset()
        for node in order:
            kids = kids_of[node]
            if kids is None:  # a leaf (AccumulateGrad): a stage input or a parameter
                v = node.variable
                if id(v) in input_ids:
                    self.inputs_met.add(id(v))
                    reach_in[node], weights[node] = True, empty
                else:
                    self.params[id(v)] = v
                    reach_in[node], weights[node] = False, frozenset((id(v),))
                continue
            r, w = False, empty
            for c in kids:
                r = r or reach_in[c]
                if weights[c]:
                    w = w | weights[c]
            reach_in[node], weights[node] = r, w
        # W roots: input-path nodes with a weight-reaching child off the path
        self.w_roots: dict = {}  # node -> frozenset of its own parameter ids
        via_path: dict = {}  # node on P -> parameter ids owned by W roots below it on P
        for node in order:
            kids = kids_of[node]
            if kids is None or not reach_in[node]:
                continue
            own, below = empty, empty
            for c in kids:
                if reach_in[c]:
                    if c in via_path:
                        below = below | via_path[c]
                    if c in self.w_roots:
                        below = below | self.w_roots[c]
                elif weights[c]:
                    own = own | weights[c]
            via_path[node] = below
            if own:
                self.w_roots[node] = own
        self.conflict = any(own & via_path[n] for n, own in self.w_roots.items())

    @staticmethod
    def _postorder(roots: Sequence) -> tuple[list, dict]:
        """Nodes children-first, and each node's children (None for a leaf), read once per node."""
        kids_of: dict = {}
        order: list = []
        stack = [(r, False) for r in roots if r is not None]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node in kids_of:
                continue
            if hasattr(node, "variable"):  # AccumulateGrad: a leaf tensor
                kids_of[node] = None
                order.append(node)
                continue
            kids = [c for c, _ in node.next_functions if c is not None]
            kids_of[node] = kids
            stack.append((node, True))
            stack.extend((c, False) for c in kids if c not in kids_of)
        return order, kids_of


class GenericSplit:
    """``weight_split="generic"``: autograd-based split for any module (see the module docstring)."""

    name = "generic"

    def __init__(self) -> None:
        self.fallbacks = 0

    def __call__(
        self, outputs: Sequence[Tensor], grads: Sequence[Tensor], inputs: Sequence[Tensor], retain_graph: bool
    ) -> tuple[list[Tensor | None], Callable[[], None] | None]:
        outputs, grads = list(outputs), list(grads)
        roots = [_node(o) for o in outputs]
        if any(r is None for r in roots):  # an output that is itself a leaf: nothing to split
            return full_backward(outputs, grads, inputs, retain_graph)
        walk = _Walk(roots, {id(t) for t in inputs})
        if walk.conflict:
            self.fallbacks += 1
            if self.fallbacks == 1:
                warnings.warn(
                    "dualpipe weight_split='generic': a parameter is reused along a stage's input path; "
                    "those chunks run a full backward in B (correct, without the zero-bubble gain)",
                    stacklevel=2,
                )
            return full_backward(outputs, grads, inputs, retain_graph)
        captured: dict = {}

        def keep(node):
            def hook(grad_outputs):
                prev = captured.get(node)
                captured[node] = (
                    tuple(grad_outputs)
                    if prev is None
                    else tuple(
                        a if b is None else (b if a is None else a + b) for a, b in zip(prev, grad_outputs)
                    )
                )

            return hook

        handles = [n.register_prehook(keep(n)) for n in walk.w_roots]
        try:
            need = [t for t in inputs if id(t) in walk.inputs_met]
            got = {}
            if need:
                res = autograd_call.grad(outputs, need, grads, retain_graph=True)
                got = {id(t): g for t, g in zip(need, res)}
        finally:
            for h in handles:
                h.remove()
        in_grads = [got.get(id(t)) for t in inputs]
        # outputs whose graph never touches an input: their weights are W work from the output itself
        off_path = [
            (o, g) for o, g, r in zip(outputs, grads, roots) if not walk.reach_in[r] and walk.weights[r]
        ]
        params = walk.params

        def weight_work() -> None:
            for node, own in walk.w_roots.items():
                go = captured.get(node)
                if go is None:
                    continue
                edges = [(GradientEdge(node, i), g) for i, g in enumerate(go) if g is not None]
                if edges:
                    autograd_call.backward(
                        [e for e, _ in edges],
                        [g for _, g in edges],
                        inputs=[params[i] for i in own],
                        retain_graph=True,
                    )
            if off_path:
                own = frozenset().union(*(walk.weights[_node(o)] for o, _ in off_path))
                autograd_call.backward(
                    [o for o, _ in off_path],
                    [g for _, g in off_path],
                    inputs=[params[i] for i in own],
                    retain_graph=True,
                )
            captured.clear()

        return in_grads, weight_work


# --------------------------------------------------------------------------------------------------------
# Linear fast path

_ACTIVE_STORE: contextvars.ContextVar[list | None] = contextvars.ContextVar("dualpipe_w_store", default=None)


def defer_weight_work(fn: Callable[[], None]) -> bool:
    """For custom autograd functions with weights (an FP8 Linear, say): call from ``backward``.

    While a ``weight_split="linear"`` pipeline runs a split backward (B), queue ``fn`` (which must
    accumulate the weight gradients itself) for that chunk's W and return True; the backward then
    returns ``None`` for the weights. Otherwise return False: compute the weight gradients now.
    """
    store = _ACTIVE_STORE.get()
    if store is None:
        return False
    store.append(fn)
    return True


def _linear_wgrad(x: Tensor, gy: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """dW = dY^T X (and db = sum dY) over all leading dims, accumulated into ``.grad``."""
    x2 = x.reshape(-1, x.shape[-1])
    g2 = gy.reshape(-1, gy.shape[-1])
    gw = (g2.t() @ x2).to(weight.dtype)
    weight.grad = gw if weight.grad is None else weight.grad.add_(gw)
    if bias is not None and bias.requires_grad:
        gb = g2.sum(0).to(bias.dtype)
        bias.grad = gb if bias.grad is None else bias.grad.add_(gb)


class _DeferredWLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        gx = gy @ weight if ctx.needs_input_grad[0] else None
        if weight.requires_grad and defer_weight_work(lambda: _linear_wgrad(x, gy, weight, bias)):
            return gx, None, None
        gw = (
            gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        )
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _deferred_forward(self: nn.Linear, x: Tensor) -> Tensor:
    if torch.is_grad_enabled() and self.weight.requires_grad:
        return _DeferredWLinear.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def enable_linear_fast_path(module: nn.Module) -> int:
    """Route every plain ``nn.Linear`` in ``module`` through the deferred-weight-gradient function.

    Only modules whose ``forward`` is ``nn.Linear.forward`` are patched (subclasses with their own
    forward, such as an FP8 Linear, are left alone). Idempotent; returns the number patched.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and "forward" not in vars(m):
            m.forward = types.MethodType(_deferred_forward, m)
            n += 1
    return n


class LinearSplit:
    """``weight_split="linear"``: queued Linear weight gradients; everything else in B."""

    name = "linear"

    def __call__(
        self, outputs: Sequence[Tensor], grads: Sequence[Tensor], inputs: Sequence[Tensor], retain_graph: bool
    ) -> tuple[list[Tensor | None], Callable[[], None] | None]:
        store: list = []
        token = _ACTIVE_STORE.set(store)
        try:
            in_grads, _ = full_backward(outputs, grads, inputs, retain_graph)
        finally:
            _ACTIVE_STORE.reset(token)

        def weight_work() -> None:
            for fn in store:
                fn()
            store.clear()

        return in_grads, weight_work


def make_policy(weight_split: str):
    """``"generic"`` | ``"linear"`` | ``"none"`` -> a fresh policy object (one per pipeline)."""
    policies = {"generic": GenericSplit, "linear": LinearSplit, "none": FullBackward}
    if weight_split not in policies:
        raise ValueError(f"weight_split={weight_split!r} must be one of {sorted(policies)}")
    return policies[weight_split]()
