"""Parameters and FLOPs of the plan's model accounting against DeepSeek-V3's figures and the real model."""

import pytest

from examples.deepseek_v3 import model as model_mod
from examples.deepseek_v3.config import get_preset
from examples.deepseek_v3.plan.model import (
    Attention,
    attention_flops_per_token,
    model_blocks,
    model_flops_per_token,
    param_counts,
)

V3 = get_preset("v3-671b")


def test_v3_total_and_active_parameters():
    c = param_counts(V3)
    assert abs(c.total / 671e9 - 1) <= 0.01, c.total
    # Active = weights a token multiplies (head included, embedding table excluded): ANCHORS' "6 x 36.6B".
    assert abs(c.active / 36.6e9 - 1) <= 0.005, c.active
    # DeepSeek's "37B" is that figure rounded; it sits 1.0% below 37B exactly (see the plan's README row).
    assert round(c.active / 1e9) == 37
    assert abs(c.active / 37e9 - 1) < 0.011
    assert abs(c.mtp / 11.6e9 - 1) < 0.01  # one MTP module: an MoE block + eh_proj (V3: 14B incl. own head)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_counts_equal_the_instantiated_model(name):
    """The formulas agree exactly with the model helper's meta-device model (an independent count)."""
    cfg = get_preset(name)
    ours, real = param_counts(cfg), model_mod.param_counts(cfg)
    assert ours.total == real["total"]
    assert ours.active == real["active_matmul"]
    assert ours.mtp == real["mtp"]


def test_v3_flops_per_token():
    causal = model_flops_per_token(V3, 4096)
    assert abs(causal / 250e9 - 1) <= 0.02, causal
    # ISCA Table 4: 432 TFLOPS non-causal vs 385 causal for the same step -> the ratio of FLOPs per token.
    ratio = model_flops_per_token(V3, 4096, causal=False) / causal
    assert abs(ratio / (432 / 385) - 1) < 0.01, ratio
    # 6N + attention, attention linear in the sequence length.
    att = attention_flops_per_token(V3, 4096)
    assert causal == pytest.approx(6 * param_counts(V3).active + att)
    assert attention_flops_per_token(V3, 8192) == pytest.approx(2 * att)


def test_attention_flops_match_a_direct_count():
    """fwd FLOPs = 2 (QK^T) + 2 (PV) multiply-adds per (query, key) pair over heads x dims; causal halves."""
    a = Attention(tokens=64, context=64, heads=3, qk_dim=5, v_dim=7, causal=False)
    pairs = 64 * 64
    assert a.fwd_flops == 2 * pairs * 3 * (5 + 7)
    assert Attention(64, 64, 3, 5, 7, causal=True).fwd_flops == a.fwd_flops / 2
    assert a.bwd_flops == 2.5 * a.fwd_flops


@pytest.mark.parametrize("name,ep", [("v3-671b", 64), ("small", 8), ("tiny", 1)])
def test_blocks_add_up(name, ep):
    cfg = get_preset(name)
    t = 512
    blocks = model_blocks(cfg, tokens=t, seq_len=cfg.max_seq_len, ep=ep)
    kinds = [b.kind for b in blocks]
    assert kinds.count("dense") == cfg.n_dense_layers and kinds.count("moe") == cfg.n_moe_layers
    assert (
        kinds.count("mtp") == cfg.mtp_depth
        and kinds[0] == "embed"
        and kinds.index("head") > kinds.index("moe")
    )
    # The MFU-convention FLOPs of the blocks sum to tokens x model FLOPs per token.
    assert sum(b.model_flops for b in blocks) == pytest.approx(
        t * model_flops_per_token(cfg, cfg.max_seq_len)
    )
    # Parameters: replicated + all experts of every block == total + MTP (MTP shares embedding and head).
    c = param_counts(cfg)
    assert sum(b.params_replicated + b.params_expert for b in blocks) == c.total + c.mtp
    moe = next(b for b in blocks if b.kind == "moe")
    grouped = [g for g in moe.gemms if g.groups > 1]
    assert all(g.groups == cfg.n_routed_experts // ep and g.m == t * cfg.n_activated_experts for g in grouped)
    assert (moe.all_to_all is None) == (ep == 1)


def test_bad_block_inputs():
    with pytest.raises(ValueError, match="ep=3"):
        model_blocks(V3, tokens=4096, seq_len=4096, ep=3)
    with pytest.raises(ValueError, match="tokens=0"):
        model_blocks(V3, tokens=0, seq_len=4096)
