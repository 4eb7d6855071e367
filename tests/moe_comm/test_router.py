"""DeepSeek-V3 gate (in-process): selection against a per-token oracle, node limit, weights, balancing."""

from __future__ import annotations

import pytest
import torch

from moe_comm import DeepSeekV3Router, select_experts


def oracle_select(scores, bias, topk, groups, topk_groups):
    """Per-token loops: group score = sum of its top (topk // topk_groups) biased scores, keep the best
    topk_groups groups, then the topk best biased scores among their experts."""
    T, E = scores.shape
    per = E // groups
    out = []
    for t in range(T):
        b = (scores[t] + bias).tolist()
        gs = [
            sum(sorted(b[g * per : (g + 1) * per], reverse=True)[: max(1, topk // topk_groups)])
            for g in range(groups)
        ]
        keep = sorted(range(groups), key=lambda g: -gs[g])[:topk_groups]
        allowed = [e for e in range(E) if e // per in keep]
        out.append(sorted(sorted(allowed, key=lambda e: -b[e])[:topk]))
    return torch.tensor(out)


def test_selection_matches_oracle_and_node_limit():
    g = torch.Generator().manual_seed(0)
    for E, K, G, M in [(16, 4, 4, 2), (32, 8, 8, 4), (12, 3, 3, 1), (10, 3, 1, 1)]:
        scores = torch.rand(64, E, generator=g)
        bias = torch.randn(E, generator=g) * 0.1
        idx = select_experts(scores, bias, K, num_groups=G, topk_groups=M)
        assert torch.equal(idx.sort(1).values, oracle_select(scores, bias, K, G, M))
        groups_per_token = torch.tensor([len(set((row // (E // G)).tolist())) for row in idx])
        assert int(groups_per_token.max()) <= M, f"node limit {M} exceeded"


def test_router_weights_and_shapes():
    torch.manual_seed(0)
    r = DeepSeekV3Router(24, 16, 4, num_groups=4, topk_groups=2, route_scale=2.5)
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    idx, w = r(x)
    assert idx.shape == (15, 4) and idx.dtype == torch.int64 and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(1), torch.full((15,), 2.5), rtol=1e-6, atol=1e-6)
    s = torch.sigmoid(x.reshape(15, 24).float() @ r.weight.float().t())  # weights use unbiased affinities
    r.bias.fill_(0.3)
    idx2, w2 = r(x)
    chosen = s.gather(1, idx2)
    torch.testing.assert_close(w2, chosen / chosen.sum(1, keepdim=True) * 2.5, rtol=1e-6, atol=1e-6)


def test_bias_balancing_reduces_imbalance_on_skewed_router():
    torch.manual_seed(0)
    E, K = 16, 2
    r = DeepSeekV3Router(32, E, K, bias_update_rate=0.02)
    u = torch.ones(32) / 32**0.5  # every token has a component along u; experts 0-3 favour it
    with torch.no_grad():
        r.weight[:4] += u

    def tokens(seed: int) -> torch.Tensor:
        return torch.randn(512, 32, generator=torch.Generator().manual_seed(seed)) + 3 * u

    held_out = tokens(999)

    def max_over_mean() -> float:
        with torch.no_grad():
            load = torch.bincount(r(held_out)[0].flatten(), minlength=E).float()
        return float(load.max() / load.mean())

    r.eval()
    before = max_over_mean()
    r.train()
    for step in range(60):  # one bias update per "training step"
        r(tokens(step))
        r.update_bias()
    r.eval()
    after = max_over_mean()
    assert before > 2.0, f"the router is not skewed enough to test balancing ({before=})"
    assert after < 0.6 * before, f"max/mean load {before:.2f} -> {after:.2f}: balancing did not help"


def test_sequence_balance_loss_value_and_gradient():
    torch.manual_seed(0)
    B, S, H, E, K, alpha = 2, 6, 8, 8, 2, 0.01
    r = DeepSeekV3Router(H, E, K, seq_aux_loss_coef=alpha)
    r.train()
    x = torch.randn(B, S, H)
    idx, w = r(x)
    s = torch.sigmoid(x.reshape(-1, H) @ r.weight.t()).view(B, S, E)
    p = (s / s.sum(-1, keepdim=True)).mean(1)
    f = (
        torch.stack([torch.bincount(idx.view(B, S * K)[b], minlength=E).float() for b in range(B)])
        * E
        / (K * S)
    )
    expected = alpha * (f * p).sum(1).mean()
    torch.testing.assert_close(r.aux_loss, expected, rtol=1e-6, atol=1e-7)
    # The loss reaches the gate weight through the weights' backward without being added by the caller:
    # a loss that ignores the weights still yields exactly d(aux_loss)/d(gate weight).
    (w * 0).sum().backward()
    (g_aux,) = torch.autograd.grad(expected, r.weight)
    torch.testing.assert_close(r.weight.grad, g_aux, rtol=1e-5, atol=1e-8)
    assert g_aux.abs().sum() > 0


def test_router_bad_arguments():
    with pytest.raises(ValueError, match=r"topk=9 must be in \[1, num_experts=8\]"):
        DeepSeekV3Router(4, 8, 9)
    with pytest.raises(ValueError, match="topk_groups=3 must be in"):
        DeepSeekV3Router(4, 8, 2, num_groups=2, topk_groups=3)
    with pytest.raises(ValueError, match="num_groups=3 must be >= 1 and divide num_experts=8"):
        DeepSeekV3Router(4, 8, 2, num_groups=3)
    with pytest.raises(ValueError, match="cannot be chosen from topk_groups=1 groups of 2"):
        DeepSeekV3Router(4, 8, 3, num_groups=4, topk_groups=1)
    with pytest.raises(ValueError, match="last dim must be the router's dim=4"):
        DeepSeekV3Router(4, 8, 2)(torch.randn(3, 5))
