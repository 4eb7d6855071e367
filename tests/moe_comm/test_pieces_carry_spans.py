"""MoELayer.forward_pieces(carry=...) through dualpipe's hook, and the profiler spans moe_comm records."""

from __future__ import annotations

import torch
from torch import nn

from moe_comm import MoELayer
from tests.moe_comm.reference import assert_close
from tests.moe_comm.test_moe_layer import H, _Keep, build, rank_inputs


class _ResidualMoE(nn.Module):
    """h = scale * x kept across the MoE layer (the residual pattern): out = moe(x) + h * h."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer, self.scale = layer, nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = self.scale * x
        return self.layer(x) + h * h

    def forward_pieces(self, x):
        h = self.scale * x
        out, (h2,) = yield from self.layer.forward_pieces(x, carry=(h,))
        return out + h2 * h2


def test_forward_pieces_carry_through_an_fb_pair():
    """The carried tensor rides through both points (a leaf of the last segment, not a reach back into
    the first piece's graph); outputs and gradients equal plain autograd, also in an F&B pair."""
    from dualpipe.overlap import backward_steps, drive, forward_steps, interleave, run_pieces
    from dualpipe.weight_split import full_backward

    router, _, experts, shared = build(0, 8, 0)
    model = _ResidualMoE(MoELayer(router, experts, None, shared_experts=shared))
    params = list(model.parameters())
    xa, xb = rank_inputs(1, 61), rank_inputs(2, 71)
    g = torch.randn(xb.shape, generator=torch.Generator().manual_seed(3))

    xr = xb.clone().requires_grad_()
    model(xr).backward(g)
    ref = [p.grad.clone() for p in params]
    ya_ref = model(xa).detach()

    model.zero_grad()
    xp = xb.clone().requires_grad_()
    run_pieces(model.forward_pieces(xp)).backward(g)
    assert_close(xp.grad, xr.grad, 1e-6, 1e-7, "run_pieces x grad")

    model.zero_grad()
    xl = xb.clone().requires_grad_()
    graph_b = drive(forward_steps(model, (xl,)))
    assert graph_b.pieces == 3 and [len(s.carried) for s in graph_b.segments[1:]] == [3, 2]
    assert graph_b.segments[-1].carried[-1] is not None  # h arrives as a leaf that needs a gradient
    fwd, bwd = (
        _Keep(forward_steps(model, (xa.clone(),))),
        _Keep(backward_steps(graph_b, [graph_b.result], [g], full_backward)),
    )
    interleave(fwd, bwd)
    assert torch.equal(fwd.value.result.detach(), ya_ref), "F of the F&B pair differs"
    in_grads, _ = bwd.value
    assert_close(in_grads[id(xl)], xr.grad, 1e-6, 1e-7, "F&B x grad")
    for p, r in zip(params, ref):
        assert_close(p.grad, r, 1e-6, 1e-7, "F&B param grad")
    assert model.scale.grad.abs() > 0


def test_forward_pieces_without_carry_returns_the_output():
    from dualpipe.overlap import run_pieces

    router, _, experts, shared = build(0, 8, 0)
    layer = MoELayer(router, experts, None, shared_experts=shared)
    x = rank_inputs(0)
    assert torch.equal(run_pieces(layer.forward_pieces(x)), layer(x))
    out, carried = run_pieces(layer.forward_pieces(x, carry=()))
    assert torch.equal(out, layer(x)) and carried == ()


def _span_names(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def test_profiler_spans_name_launches_and_waits():
    """Launches and waits of dispatch/combine and of their adjoints carry spans (the overlap report and
    traces name them): through autograd (forward, backward) and through dualpipe's pieces path."""
    from dualpipe.overlap import run_pieces

    router, _, experts, shared = build(0, 8, 0)
    layer = MoELayer(router, experts, None, shared_experts=shared)
    x = rank_inputs(0).requires_grad_()
    w = torch.linspace(-1, 1, H)
    ops = ("dispatch", "combine", "dispatch.backward", "combine.backward")
    want = set(ops) | {f"{n}.wait" for n in ops}
    for run in (
        lambda: (layer(x) * w).sum().backward(),
        lambda: (run_pieces(layer.forward_pieces(x)) * w).sum().backward(),
    ):
        names = _span_names(run)
        assert want <= set(names), sorted(want - set(names))
        for n in ops:  # one launch and one wait each: a layer call and its backward, nothing doubled
            assert names.count(n) == 1 and names.count(f"{n}.wait") == 1, (n, names.count(n))
