"""Calls into the autograd engine without the per-call Python of ``torch.autograd.backward`` / ``grad``.

A pipeline step runs one autograd call per backward piece: ~20 per rank and step for DualPipeV at
pp=2 with 8 micro-batches, each on a small graph. The public functions spend ~40 us of Python per call
before the engine starts (argument normalisation, ``__torch_function__`` dispatch, and a symbolic-shape
check of every gradient against its output); the engine itself then takes ~60 us on a two-GEMM graph
(measured on the 2-core CPU host, one thread). Here the runtime's own calls go straight to
``torch.autograd.graph._engine_run_backward`` -- the function both public ones end in, which also
keeps the context for compiled autograd -- when the arguments are of the kinds the runtime makes:

- outputs: plain ``torch.Tensor`` (not a subclass, not nested) or ``GradientEdge``;
- gradients: plain ``torch.Tensor``, one per output, with the output's shape (checked here with one
  ``torch.Size`` comparison; a ``GradientEdge``'s shape is checked by the engine, which raises naming
  both shapes).

Anything else (tensor subclasses such as ``DTensor`` or FP8 wrappers, nested tensors, a torch without
the private entry point) takes the public function, so the semantics are the public ones either way:
gradients accumulate into ``.grad`` (``backward``) or are returned (``grad``, unused inputs -> None).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

_ENGINE = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _plain(outputs: Sequence, grads: Sequence) -> bool:
    """True when the engine can be called directly (see the module docstring)."""
    if _ENGINE is None or len(outputs) != len(grads):
        return False
    for o, g in zip(outputs, grads):
        if type(g) is not Tensor or g.is_nested:
            return False
        if type(o) is Tensor:
            if o.is_nested or o.shape != g.shape:
                return False
        elif not isinstance(o, GradientEdge):
            return False
    return True


def backward(
    outputs: Sequence[Tensor | GradientEdge],
    grads: Sequence[Tensor],
    *,
    inputs: Sequence[Tensor] | None = None,
    retain_graph: bool = False,
) -> None:
    """``torch.autograd.backward(outputs, grads, inputs=inputs, retain_graph=retain_graph)``: accumulate
    into ``.grad`` of the leaves reached (only of ``inputs`` when given, which must then be non-empty)."""
    if not _plain(outputs, grads) or (inputs is not None and not inputs):
        torch.autograd.backward(list(outputs), list(grads), retain_graph=retain_graph, inputs=inputs)
        return
    _ENGINE(  # type: ignore[misc]
        tuple(outputs),
        tuple(grads),
        retain_graph,
        False,  # create_graph
        tuple(inputs) if inputs is not None else (),
        allow_unreachable=True,
        accumulate_grad=True,
    )


def grad(
    outputs: Sequence[Tensor | GradientEdge],
    inputs: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    retain_graph: bool = False,
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grads, retain_graph=retain_graph, allow_unused=True)``:
    one gradient per input (None where the input is not reached); nothing accumulates."""
    if not _plain(outputs, grads) or not inputs:
        return torch.autograd.grad(
            list(outputs), list(inputs), list(grads), retain_graph=retain_graph, allow_unused=True
        )
    return _ENGINE(  # type: ignore[misc]
        tuple(outputs),
        tuple(grads),
        retain_graph,
        False,  # create_graph
        tuple(inputs),
        allow_unreachable=True,
        accumulate_grad=False,
    )
