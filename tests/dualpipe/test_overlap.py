"""The overlap hook in-process: a module with communication points trains the same through
run_pieces (plain autograd), through the pipeline's step iterators with every weight-gradient policy,
with and without `carry`, and `interleave` alternates two micro-batches' pieces around the comms."""

import copy

import pytest
import torch
from torch import nn

from dualpipe.overlap import (
    CommPoint,
    Completed,
    backward_steps,
    drive,
    forward_steps,
    interleave,
    pieces,
    run_pieces,
    sequential,
)
from dualpipe.weight_split import enable_linear_fast_path, full_backward, make_policy


class LoggedRoll:
    """A stand-in for an all-to-all: rolls rows by `shift` (a permutation; its adjoint rolls back).
    Completion is deferred to wait(), and every launch/wait is logged."""

    def __init__(self, log: list, tag: str, shift: int):
        self.log, self.tag, self.shift = log, tag, shift

    def launch(self, shift):
        def start(*ts):
            self.log.append(f"{self.tag}:launch{shift:+d}")
            log, tag = self.log, self.tag

            class _Pending:
                def wait(self):
                    log.append(f"{tag}:wait{shift:+d}")
                    return tuple(None if t is None else torch.roll(t, shift, 0) for t in ts)

            return _Pending()

        return start


class MoELike(nn.Module):
    """attn-like piece | dispatch | expert piece | combine | tail, with a residual across both comms."""

    def __init__(self, d: int = 8, carry: bool = True):
        super().__init__()
        self.pre, self.expert, self.post = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.carry = carry
        self.log: list = []
        self.tag = "?"

    def forward_pieces(self, x, mask):
        self.log.append(f"{self.tag}:piece0")
        h = x + torch.tanh(self.pre(self.norm(x)))
        comm = LoggedRoll(self.log, self.tag, 1)
        carry = (h,) if self.carry else ()
        got = yield CommPoint(comm.launch(1), comm.launch(-1), (h * mask,), carry=carry, name="dispatch")
        y = got[0]
        h = got[1] if self.carry else h
        self.log.append(f"{self.tag}:piece1")
        y = torch.relu(self.expert(y))
        got = yield CommPoint(comm.launch(-1), comm.launch(1), (y,), carry=carry, name="combine")
        h = got[1] if self.carry else h
        self.log.append(f"{self.tag}:piece2")
        return self.post(got[0]) + h

    def forward(self, x, mask):
        return run_pieces(self.forward_pieces(x, mask))


def _math(m: MoELike, x, mask):
    h = x + torch.tanh(m.pre(m.norm(x)))
    y = torch.roll(torch.relu(m.expert(torch.roll(h * mask, 1, 0))), -1, 0)
    return m.post(y) + h


def _grads(m):
    return [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("carry", [True, False])
def test_run_pieces_is_differentiable(carry):
    torch.manual_seed(0)
    m = MoELike(carry=carry)
    x, mask, g = torch.randn(6, 8), (torch.rand(6, 1) > 0.2).float(), torch.randn(6, 8)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = copy.deepcopy(m)
    _math(ref, x1, mask).backward(g)
    m(x2, mask).backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(m), _grads(ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy", ["none", "generic", "linear"])
@pytest.mark.parametrize("carry", [True, False])
def test_pipeline_steps_match_autograd(policy, carry):
    torch.manual_seed(1)
    m = MoELike(carry=carry)
    ref = copy.deepcopy(m)
    if policy == "linear":
        assert enable_linear_fast_path(m) == 3
    x, mask, g = torch.randn(6, 8), (torch.rand(6, 1) > 0.2).float(), torch.randn(6, 8)
    xr = x.clone().requires_grad_()
    _math(ref, xr, mask).backward(g)

    xl = x.clone().requires_grad_()
    graph = drive(forward_steps(m, (xl, mask)))
    assert graph.pieces == 3
    pol = make_policy(policy)
    in_grads, w_work = drive(backward_steps(graph, [graph.result], [g], pol))
    if policy != "none":
        assert w_work and any(p.grad is None for p in m.expert.parameters())  # weight work deferred
    for w in w_work:
        w()
    torch.testing.assert_close(in_grads[id(xl)], xr.grad, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(m), _grads(ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_interleave_overlaps_comm_with_the_other_microbatch():
    torch.manual_seed(2)
    m = MoELike()
    log = m.log
    x, mask = torch.randn(6, 8), torch.ones(6, 1)
    m.tag = "B"
    graph_b = drive(forward_steps(m, (x.clone().requires_grad_(), mask)))
    log.clear()
    m.tag = "A"
    fwd = forward_steps(m, (x.clone().requires_grad_(), mask))
    bwd = backward_steps(graph_b, [graph_b.result], [torch.randn(6, 8)], full_backward)
    interleave(fwd, bwd)
    # A's dispatch is launched before B's first backward piece and waited only after it; B's
    # combine-adjoint is in flight while A's expert piece runs.
    i = log.index
    assert i("A:launch+1") < i("B:launch+1") < i("A:wait+1") < i("A:piece1") < i("B:wait+1")
    assert log[-1] == "A:piece2" or log[-1].startswith("B:")
    # without overlap: A's whole forward (3 pieces, 2 comms waited at once), then B's backward
    m.tag = "B"
    graph_b = drive(forward_steps(m, (x.clone().requires_grad_(), mask)))
    log.clear()
    m.tag = "A"
    fwd = forward_steps(m, (x.clone().requires_grad_(), mask))
    bwd = backward_steps(graph_b, [graph_b.result], [torch.randn(6, 8)], full_backward)
    sequential(fwd, bwd)
    assert all(e.startswith("A:") for e in log[:7]) and all(e.startswith("B:") for e in log[7:])


def test_composition_and_plain_modules():
    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.lin = MoELike(), MoELike(), nn.Linear(8, 8)

        def forward_pieces(self, x, mask):
            x = yield from pieces(self.a, x, mask)
            x = yield from pieces(self.lin, x)  # a plain module: one call, no point
            return (yield from pieces(self.b, x, mask))

    torch.manual_seed(3)
    s = Stage()
    x, mask = torch.randn(4, 8, requires_grad=True), torch.ones(4, 1)
    graph = drive(forward_steps(s, (x, mask)))
    assert graph.pieces == 5
    plain = drive(forward_steps(nn.Linear(8, 8), (x,)))
    assert plain.pieces == 1
    with torch.no_grad():
        out = drive(forward_steps(s, (x, mask))).result
    torch.testing.assert_close(out, graph.result.detach())


def test_comm_point_checks():
    with pytest.raises(TypeError, match="item 0 is int"):
        CommPoint(lambda *t: Completed(t), None, (3,))
    assert Completed((torch.ones(1),)).wait()[0].item() == 1.0


@pytest.mark.parametrize("all_threads", [False, True])
def test_spans_recorded_under_any_profiler(all_threads):
    """Spans are skipped without a profiler (they cost ~10 us each) but recorded under one, also under a
    profiler that records every thread (the training app's), which leaves the thread-local state unset."""
    from torch._C._profiler import _ExperimentalConfig

    from dualpipe.overlap import _profiling

    assert not _profiling()
    cfg = _ExperimentalConfig(profile_all_threads=all_threads)
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, experimental_config=cfg) as p:
        assert _profiling()
        drive(forward_steps(MoELike(), (torch.randn(4, 8), torch.ones(4, 1)), name="probe"))
    assert not _profiling()
    names = {e.name for e in p.events()}
    assert any(n.startswith("probe.piece") for n in names), sorted(names)[:20]
