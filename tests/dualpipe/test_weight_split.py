"""The generic weight split (B: input gradients only, W later) against one full backward, in one process.

Graph shapes that exercise the split's graph walk: a plain stage (three inputs, one without gradient),
a parameter reused along the input path and one used both on and off it (both fall back to a full
backward, with a warning), and an output that never touches the inputs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dualpipe.weight_split import GenericSplit, full_backward

from .pipeline_models import Stage, rel_err


class Reused(nn.Module):
    """The same Linear twice along the input path (its weight gets gradient from two W roots)."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x, z):
        return (self.fc(torch.tanh(self.fc(self.norm(x)))),)


class SideOutput(nn.Module):
    """A second output computed from a parameter alone (no input on its path); with ``shared``, the
    Linear of the input path is also applied to a parameter off the path (its weight then gets
    gradient from two W roots, one above the other on the path: the split falls back)."""

    def __init__(self, d: int, shared: bool):
        super().__init__()
        self.fc, self.fc_off = nn.Linear(d, d), nn.Linear(d, d)
        self.bias_src = nn.Parameter(torch.randn(1, d))
        self.table = nn.Parameter(torch.randn(3, d))
        self.shared = shared

    def forward(self, x, z):
        h = torch.relu(self.fc(x))
        # off the path: a subgraph of three parameters (fc's or fc_off's weight and bias, bias_src)
        h = h + (self.fc if self.shared else self.fc_off)(self.bias_src)
        side = (self.table**2).sum(0, keepdim=True)  # never touches an input
        return h * z[:, :1], side


def _run(module: nn.Module, inputs, grads, split: bool):
    for p in module.parameters():
        p.grad = None
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = module(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if split:
        in_grads, w = GenericSplit()(list(outs), list(grads), leaves, False)
        before = {k: (None if p.grad is None else p.grad.clone()) for k, p in module.named_parameters()}
        if w is not None:
            w()
    else:
        in_grads, _ = full_backward(list(outs), list(grads), leaves, False)
        before = None
    return in_grads, {k: p.grad for k, p in module.named_parameters()}, before


@pytest.mark.parametrize("kind", ["stage", "reused", "side", "shared"])
@pytest.mark.parametrize("b", [5, 16])
def test_generic_split_equals_full_backward(kind, b):
    g = torch.Generator().manual_seed(3 + b)
    d = 16 if kind == "stage" else 7
    x = torch.randn(b, d, generator=g)
    if kind == "stage":
        module = Stage(1)
        inputs = (x, torch.randn(b, 3, generator=g), torch.randint(0, 9, (b,), generator=g))
    else:
        module = Reused(d) if kind == "reused" else SideOutput(d, shared=kind == "shared")
        inputs = (x, torch.randn(b, 3, generator=g))
    with torch.no_grad():
        outs = module(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn(o.shape, generator=g) for o in outs if o.is_floating_point()]
    if kind == "stage":
        outs_diff = 2  # h and z carry gradients, ids does not
        grads = grads[:outs_diff]
        module_fwd = module.forward
        module.forward = lambda *a: module_fwd(*a)[:outs_diff]
    ref_in, ref_p, _ = _run(module, inputs, grads, split=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_in, got_p, before_w = _run(module, inputs, grads, split=True)
    reuse_warned = any("reused along a stage's input path" in str(w.message) for w in caught)
    falls_back = kind in ("reused", "shared")
    assert reuse_warned == falls_back
    for r, t in zip(ref_in, got_in):
        assert (r is None) == (t is None)
        if r is not None:
            assert rel_err(t, r) < 1e-6
    for k, r in ref_p.items():  # (a parameter the module does not use has no gradient either way)
        assert (r is None) == (got_p[k] is None), k
        if r is not None:
            assert rel_err(got_p[k], r) < 1e-6, k
    if not falls_back:  # the split deferred the weight gradients of the input path to W
        deferred = [
            k
            for k, v in before_w.items()
            if ref_p[k] is not None and (v is None or not torch.equal(v, ref_p[k]))
        ]
        assert deferred, "B already computed every weight gradient: nothing was split off"
