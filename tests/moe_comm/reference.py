"""A plain all_to_all_single reference of dispatch/combine (the oracle of the bitwise tests).

One row per (token, expert) pair, sent in (destination rank, token, k) order with exchanged counts, then
stably sorted by local expert on arrival (what Megatron's all-to-all dispatcher does). Combine sends the
rows back, restores the pair order and sums sum_k w[t, k] * y[t, k] in FP32, k ascending, from 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _a2a(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    if group is None:
        return x.clone()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x, recv, send, group=group)
    return out


def reference_dispatch(x, topk_idx, num_experts, group=None):
    """Returns (expert_x (P, H) grouped by local expert, counts (E_local,), state for reference_combine)."""
    W = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    epr = num_experts // W
    t, k = (topk_idx >= 0).nonzero(as_tuple=True)
    e = topk_idx[t, k]
    order = torch.sort(e // epr, stable=True).indices
    send = torch.bincount(e // epr, minlength=W)
    recv = _a2a(send, [1] * W, [1] * W, group)
    send_l, recv_l = send.tolist(), recv.tolist()
    rx = _a2a(x[t[order]], send_l, recv_l, group)
    re = _a2a(e[order], send_l, recv_l, group)
    local = re - rank * epr
    order2 = torch.sort(local, stable=True).indices
    counts = torch.bincount(local, minlength=epr)
    return rx[order2], counts, (t, k, order, order2, send_l, recv_l, topk_idx.shape)


def reference_combine(y, weights, state, out_dtype, group=None):
    t, k, order, order2, send_l, recv_l, (T, K) = state
    ry = torch.empty_like(y)
    ry[order2] = y
    back = _a2a(ry, recv_l, send_l, group)
    pair_y = torch.empty_like(back)
    pair_y[order] = back
    dense = y.new_zeros((T, K, y.shape[1]))
    dense[t, k] = pair_y
    acc = torch.zeros(T, y.shape[1], dtype=torch.float32)
    w = torch.zeros(T, K, dtype=torch.float32)
    w[t, k] = weights[t, k].float()
    for j in range(K):
        acc = acc + w[:, j : j + 1] * dense[:, j].float()
    return acc.to(out_dtype)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = ""
) -> None:
    """torch.allclose with the worst difference in the message. Used inside rank processes instead of
    torch.testing.assert_close, whose first call in a process with torch.distributed initialised imports
    DTensor and sympy (about 10 s per process on the 2-core CI machine)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    if not torch.allclose(a, e, rtol=rtol, atol=atol):
        diff = (a - e).abs()
        i = int((diff - rtol * e.abs()).flatten().argmax())  # the worst violation of the tolerance
        raise AssertionError(
            f"{what}: |diff| {diff.flatten()[i].item():.3g} at flat index {i} "
            f"(actual {a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g}), {rtol=}, {atol=}"
        )
