"""``dualpipe.autograd_call``: the direct engine calls give what ``torch.autograd.backward``/``grad`` give,
and anything the direct path does not cover takes the public functions."""

import pytest
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from dualpipe import autograd_call


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 29), nn.GELU(), nn.LayerNorm(29), nn.Linear(29, 7))


def _grads(m: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in m.parameters()]


def _run(use_public: bool, edge: bool, monkeypatch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two outputs of a stage (one as a GradientEdge if ``edge``), their gradients, input + weights."""
    if use_public:
        monkeypatch.setattr(autograd_call, "_ENGINE", None)
    m = _model(1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 13, generator=g).requires_grad_(True)
    h = m[:3](x)
    y = m[3](h)
    outs = [get_gradient_edge(h) if edge else h, y]
    grads = [torch.randn(5, 29, generator=g), torch.randn(5, 7, generator=g)]
    autograd_call.backward(outs, grads)
    monkeypatch.undo()
    return _grads(m), x.grad.clone()


@pytest.mark.parametrize("edge", [False, True])
def test_backward_accumulates_what_the_public_backward_does(edge, monkeypatch):
    ref_w, ref_x = _run(True, edge, monkeypatch)
    w, x = _run(False, edge, monkeypatch)
    torch.testing.assert_close(x, ref_x, rtol=0, atol=0)
    for a, b in zip(w, ref_w):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grad_returns_input_gradients_none_for_unused_and_leaves_params_alone():
    m = _model(3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 13, generator=g).requires_grad_(True)
    unused = torch.randn(3, requires_grad=True)
    y = m(x)
    gy = torch.randn(6, 7, generator=g)
    ref = torch.autograd.grad([y], [x, unused], [gy], retain_graph=True, allow_unused=True)
    got = autograd_call.grad([y], [x, unused], [gy], retain_graph=True)
    assert got[1] is None and ref[1] is None
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    assert all(p.grad is None for p in m.parameters())
    # restricted backward: only the listed leaves accumulate
    autograd_call.backward([y], [gy], inputs=[m[3].weight])
    assert m[3].weight.grad is not None and m[0].weight.grad is None and x.grad is None


def test_shape_mismatch_raises_through_either_path():
    m = _model(5)
    x = torch.randn(4, 13, requires_grad=True)
    y = m(x)
    with pytest.raises(RuntimeError, match="shape"):
        autograd_call.backward([y], [torch.randn(4, 8)], retain_graph=True)
    with pytest.raises(RuntimeError, match=r"\[4, 7\]|4, 7"):
        autograd_call.backward([get_gradient_edge(y)], [torch.randn(4, 8)])


class _Tagged(torch.Tensor):
    """A tensor subclass with ``__torch_function__``: must go through the public functions."""

    seen = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.autograd.backward:
            cls.seen += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclasses_take_the_public_path():
    assert not autograd_call._plain([torch.ones(2).as_subclass(_Tagged)], [torch.ones(2)])
    assert not autograd_call._plain([torch.ones(2)], [torch.ones(2).as_subclass(_Tagged)])
    assert not autograd_call._plain([torch.ones(2)], [torch.ones(3)])
    assert autograd_call._plain([torch.ones(2)], [torch.ones(2)])
    w = torch.randn(3, requires_grad=True)
    y = (w * 2).as_subclass(_Tagged)
    autograd_call.backward([y], [torch.ones(3)])
    assert _Tagged.seen >= 1
    torch.testing.assert_close(w.grad, torch.full((3,), 2.0))
