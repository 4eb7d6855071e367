"""MoELayer: local mode and expert parallelism (gloo) against a single-process MoE of the same weights.

The reference is written here, slot by slot: out[t] = sum_k w[t, k] * SwiGLU_{idx[t, k]}(x[t]) + shared(x[t]).
Expert-parallel ranks each hold E / W experts and their own tokens; gradients are compared with the
single-process gradients of the sum of all ranks' losses (router and shared-expert grads summed over ranks,
as a data-parallel all-reduce would). One launch checks flat, hierarchical and capacity modes, the
overlapped forward of two micro-batches, and the FP8 payload.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_comm import DeepSeekV3Router, Dispatcher, GroupedExperts, MoELayer, overlapped_forward
from tests.distributed import run_ranks
from tests.moe_comm.reference import assert_close

H, I_, E, K = 32, 24, 8, 3


def build(seed: int, num_local: int, first: int, dtype=torch.float32):
    """Router, this rank's slice of the experts and the shared expert, all from one seed."""
    torch.manual_seed(seed)
    router = DeepSeekV3Router(H, E, K, num_groups=4, topk_groups=2, route_scale=1.5, seq_aux_loss_coef=0.01)
    full = GroupedExperts(E, H, I_, dtype=dtype)
    shared = nn.Sequential(nn.Linear(H, I_, bias=False), nn.SiLU(), nn.Linear(I_, H, bias=False)).to(dtype)
    experts = GroupedExperts(num_local, H, I_, dtype=dtype)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(experts, name).copy_(getattr(full, name)[first : first + num_local])
    return router, full, experts, shared


def reference_moe(router, full, shared, x: torch.Tensor) -> torch.Tensor:
    """The single-process MoE, written per slot with gathered weights (no dispatch)."""
    tokens = x.reshape(-1, H)
    idx, w = router(x)
    acc = torch.zeros(tokens.shape[0], H)
    for k in range(K):
        e = idx[:, k]
        h = F.silu(torch.einsum("th,tih->ti", tokens, full.w1[e])) * torch.einsum(
            "th,tih->ti", tokens, full.w3[e]
        )
        acc = acc + w[:, k : k + 1] * torch.einsum("ti,thi->th", h, full.w2[e])
    return (acc + shared(tokens)).view(x.shape)


def rank_inputs(rank: int, seed: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + rank)
    return torch.randn(2, 3 + rank, H, generator=g)  # (batch, seq, H): different token counts per rank


def _ep_rank(rank: int, world_size: int, modes: list[dict]) -> dict:
    out = {}
    epr = E // world_size
    for mode in modes:
        router, _, experts, shared = build(0, epr, rank * epr)
        group = dist.group.WORLD if world_size > 1 else None
        disp = Dispatcher(group, E, timeout=30, **mode["kw"])
        layer = MoELayer(router, experts, disp, shared_experts=shared)
        x = rank_inputs(rank).requires_grad_()
        y = layer(x)
        (y * torch.linspace(-1, 1, H)).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        out[mode["name"]] = {"y": y.detach(), "x_grad": x.grad.clone(), "grads": grads}
        if mode.get("overlap"):  # two micro-batches interleaved == run one after the other
            layer.zero_grad()
            xa, xb = rank_inputs(rank, 21), rank_inputs(rank, 31)
            ya, yb = overlapped_forward(layer, xa, xb)
            assert torch.equal(ya, layer(xa)) and torch.equal(yb, layer(xb)), "overlapped forward differs"
        if mode.get("pieces"):
            check_dualpipe_pieces(layer, rank)
    return out


def check_dualpipe_pieces(layer: MoELayer, rank: int) -> None:
    """dualpipe's hook: the plain pieces path and an F&B pair (A's forward interleaved with B's backward)
    give the same outputs and gradients as plain autograd."""
    from dualpipe.overlap import backward_steps, drive, forward_steps, interleave, run_pieces
    from dualpipe.weight_split import full_backward

    xa, xb, g = rank_inputs(rank, 41), rank_inputs(rank, 51), torch.randn(rank_inputs(rank, 51).shape)
    params = list(layer.parameters())
    layer.zero_grad()
    xr = xb.clone().requires_grad_()
    layer(xr).backward(g)
    ref_grads = [p.grad.clone() for p in params]
    ya_ref = layer(xa).detach()

    layer.zero_grad()
    xp = xb.clone().requires_grad_()
    yp = run_pieces(layer.forward_pieces(xp))
    yp.backward(g)
    assert_close(xp.grad, xr.grad, 1e-6, 1e-7, "run_pieces x grad")
    for p, r in zip(params, ref_grads):
        assert_close(p.grad, r, 1e-6, 1e-7, "run_pieces param grad")

    layer.zero_grad()
    xl = xb.clone().requires_grad_()
    graph_b = drive(forward_steps(layer, (xl,)))
    fwd = forward_steps(layer, (xa.clone(),))
    bwd = backward_steps(graph_b, [graph_b.result], [g], full_backward)
    fwd_run = _Keep(fwd)
    bwd_run = _Keep(bwd)
    interleave(fwd_run, bwd_run)
    assert torch.equal(fwd_run.value.result.detach(), ya_ref), "F of the F&B pair differs"
    in_grads, _ = bwd_run.value
    assert_close(in_grads[id(xl)], xr.grad, 1e-6, 1e-7, "F&B x grad")
    for p, r in zip(params, ref_grads):
        assert_close(p.grad, r, 1e-6, 1e-7, "F&B param grad")


class _Keep:
    """Keeps a generator's return value when an overlap function exhausts it."""

    def __init__(self, gen):
        self.gen, self.value = gen, None

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.gen)
        except StopIteration as stop:
            self.value = stop.value
            raise


def test_local_mode_equals_reference():
    router, full, experts, shared = build(0, E, 0)
    layer = MoELayer(router, experts, None, shared_experts=shared)  # EP=1, no process group
    x = rank_inputs(0).requires_grad_()
    y = layer(x)
    (y * torch.linspace(-1, 1, H)).sum().backward()
    xr = rank_inputs(0).requires_grad_()
    yr = reference_moe(router, full, shared, xr)
    (yr * torch.linspace(-1, 1, H)).sum().backward()
    assert_close(y, yr, 1e-5, 1e-6, "output")
    assert_close(x.grad, xr.grad, 1e-5, 1e-6, "x grad")
    for n in ("w1", "w2", "w3"):
        assert_close(getattr(experts, n).grad, getattr(full, n).grad, 1e-5, 1e-6, n)


def test_expert_parallel_gradients_equal_single_process():
    W = 4
    modes = [
        {"name": "flat", "kw": {}, "overlap": True, "pieces": True},
        {"name": "hierarchical", "kw": {"ranks_per_node": 2}, "pieces": True},
        {"name": "capacity", "kw": {"capacity": 2 * (3 + W)}},
        {"name": "aligned", "kw": {"align": 8}},
        {"name": "by expert, aligned", "kw": {"align": 8, "combine_by_expert": True}, "pieces": True},
        {"name": "reduced", "kw": {"combine": "reduced"}},
        {"name": "reduced hierarchical", "kw": {"combine": "reduced", "ranks_per_node": 2}, "pieces": True},
    ]
    outs = run_ranks(_ep_rank, W, args=(modes,))
    # Single-process reference over all ranks' tokens (one loss = sum of the ranks' losses).
    router, full, _, shared = build(0, E, 0)
    xs = [rank_inputs(r).requires_grad_() for r in range(W)]
    loss = sum((reference_moe(router, full, shared, x) * torch.linspace(-1, 1, H)).sum() for x in xs)
    loss.backward()
    epr = E // W
    for mode in modes:
        name = mode["name"]
        for r in range(W):
            got = outs[r][name]
            assert_close(
                got["y"], reference_moe(router, full, shared, rank_inputs(r)).detach(), 1e-5, 1e-6, name
            )
            assert_close(got["x_grad"], xs[r].grad, 1e-5, 1e-6, f"{name} x grad rank {r}")
            for n in ("w1", "w2", "w3"):
                ref = getattr(full, n).grad[r * epr : (r + 1) * epr]
                assert_close(got["grads"][f"experts.{n}"], ref, 1e-5, 1e-6, f"{name} {n} rank {r}")
        for key, ref in [
            ("router.weight", router.weight.grad),
            ("shared_experts.0.weight", shared[0].weight.grad),
        ]:
            summed = sum(
                outs[r][name]["grads"][key] for r in range(W)
            )  # what a data-parallel all-reduce sums
            assert_close(summed, ref, 1e-5, 1e-6, f"{name} {key}")


def _fp8_rank(rank: int, world_size: int) -> dict:
    import fp8

    torch.manual_seed(5)
    x = torch.randn(9 + rank, 256) * (1 + torch.arange(256) / 64)  # two 1x128 tiles with different ranges
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(x.shape[0])])
    w = torch.rand(x.shape[0], K)
    disp = Dispatcher(dist.group.WORLD, E, timeout=30)
    res_n = disp.dispatch(x.bfloat16(), idx, w)
    res_q = disp.dispatch(x.bfloat16(), idx, w, payload="fp8")
    assert isinstance(res_q.x, fp8.FP8Tensor) and res_q.x.data.dtype == torch.float8_e4m3fn
    # The FP8 rows are exactly the 1x128 quantization of the rows a BF16 dispatch delivers.
    q_ref = fp8.quantize_1x128(res_n.x)
    assert torch.equal(res_q.x.data.view(torch.uint8), q_ref.data.view(torch.uint8))
    assert torch.equal(res_q.x.scale, q_ref.scale)
    diff = fp8.calc_diff(res_q.x.dequantize(), res_n.x.float())
    assert diff < 1e-3, f"FP8 payload calc_diff {diff:.2e} >= 1e-3"
    # FP8 experts on the FP8 payload vs BF16 experts on the BF16 payload; combine stays BF16.
    torch.manual_seed(6)
    ex = GroupedExperts(E // world_size, 256, 128, dtype=torch.bfloat16)
    ex_fp8 = GroupedExperts(E // world_size, 256, 128, dtype=torch.bfloat16, backend="fp8")
    ex_fp8.load_state_dict(ex.state_dict())
    xg = x.bfloat16().requires_grad_()
    res_g = disp.dispatch(xg, idx, w, payload="fp8")
    out_q = disp.combine(ex_fp8(res_g), res_g.handle)
    out_q.float().sum().backward()
    out_n = disp.combine(ex(res_n), res_n.handle)
    assert out_q.dtype == torch.bfloat16
    # The FP8 layer through dualpipe's pieces path equals its plain forward and backward.
    from dualpipe.overlap import run_pieces

    torch.manual_seed(7)
    router = DeepSeekV3Router(256, E, K)
    layer = MoELayer(router, ex_fp8, disp, payload="fp8")
    xs = [x.bfloat16().requires_grad_() for _ in range(2)]
    ys = [layer(xs[0]), run_pieces(layer.forward_pieces(xs[1]))]
    assert torch.equal(ys[0], ys[1]), "FP8 layer: pieces forward differs"
    grads = []
    for y in ys:
        layer.zero_grad()
        y.float().square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    assert torch.equal(xs[0].grad, xs[1].grad) and xs[0].grad.abs().sum() > 0
    for a, b in zip(*grads):
        assert_close(a.float(), b.float(), 1e-6, 1e-6, "FP8 layer pieces grads")
    # A rank that receives no token at all (every token routed to rank 0's experts): an FP8 payload of 0 rows.
    idx0 = torch.stack([torch.randperm(E // world_size)[:K] for _ in range(x.shape[0])])
    res0 = disp.dispatch(x.bfloat16(), idx0, w, payload="fp8")
    assert (res0.x.data.shape[0] == 0) == (rank != 0) and res0.x.scale.shape[-1] == 2
    out0 = disp.combine(ex_fp8(res0), res0.handle)
    assert out0.shape == x.shape and bool(torch.isfinite(out0).all())
    # Combine by local expert (one all-to-all per expert, no pair gather) == the gathered combine, bitwise.
    disp_x = Dispatcher(dist.group.WORLD, E, timeout=30, combine_by_expert=True)
    for ids in (idx, idx0):
        a, b = (d.dispatch(x.bfloat16(), ids, w, payload="fp8") for d in (disp, disp_x))
        assert torch.equal(disp.combine(ex_fp8(a), a.handle), disp_x.combine(ex_fp8(b), b.handle))
        assert b.handle.chunk_plan is not None and a.handle.chunk_plan is None
    return {
        "payload": diff,
        "experts": fp8.calc_diff(out_q.float(), out_n.float()),
        "grad": xg.grad.abs().sum(),
    }


def test_fp8_payload_and_experts():
    outs = run_ranks(_fp8_rank, 2)
    for o in outs:
        # FP8 GEMMs on both expert projections: the error budget of two FP8 GEMMs (calc_diff ~1e-3 each).
        assert o["experts"] < 3e-3, o
        assert o["grad"] > 0
