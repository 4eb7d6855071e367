"""FP8Linear (fprop/dgrad/wgrad in FP8) vs FP32 autograd; saved tensors; convert_to_fp8 on a transformer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp8

# Each output and gradient comes out of exactly one FP8 GEMM (the upstream gradient g is fixed, not computed
# from the FP8 output), so each must meet the FP8 GEMM bound calc_diff < 1e-3 against FP32 autograd of the
# same parameters. The bias gradient is a plain FP32 sum of g: it must match to FP32 round-off.
FP8_GEMM_BOUND = 1e-3


def _grads(module, x, g):
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    y = module(x)
    (y.float() * g).sum().backward()
    return y, x.grad, module.weight.grad.clone(), None if module.bias is None else module.bias.grad.clone()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 33, 300), (128, 256), (1, 100)])
def test_fp8_linear_matches_fp32_autograd(bias, shape):
    torch.manual_seed(sum(shape) + bias)
    in_f, out_f = shape[-1], 257
    lin = nn.Linear(in_f, out_f, bias=bias)
    f8 = fp8.FP8Linear.from_linear(lin)
    assert f8.weight is lin.weight and f8.bias is lin.bias
    x = torch.randn(shape)
    g = torch.randn(*shape[:-1], out_f)
    y32, dx32, dw32, db32 = _grads(lin, x, g)
    y8, dx8, dw8, db8 = _grads(f8, x, g)
    assert y8.shape == y32.shape and y8.dtype == torch.float32
    for name, ref, got in [("y", y32, y8), ("dx", dx32, dx8), ("dw", dw32, dw8)]:
        diff = fp8.calc_diff(got, ref)
        assert 0 < diff < FP8_GEMM_BOUND, (name, diff)
    if bias:
        torch.testing.assert_close(db8, db32, rtol=1e-5, atol=1e-5)


def test_fp8_linear_bf16_master_weights_and_inputs():
    torch.manual_seed(3)
    lin = nn.Linear(200, 130).bfloat16()
    f8 = fp8.FP8Linear.from_linear(lin, scale_format="pow2")
    x = torch.randn(4, 50, 200, dtype=torch.bfloat16)
    g = torch.randn(4, 50, 130)
    ref = nn.Linear(200, 130)
    ref.load_state_dict({k: v.float() for k, v in lin.state_dict().items()})
    y32, dx32, dw32, db32 = _grads(ref, x.float(), g)
    y8, dx8, dw8, db8 = _grads(f8, x, g)
    assert y8.dtype == dx8.dtype == dw8.dtype == db8.dtype == torch.bfloat16
    for name, r, got in [("y", y32, y8), ("dx", dx32, dx8), ("dw", dw32, dw8)]:
        assert fp8.calc_diff(got.float(), r) < FP8_GEMM_BOUND, name
    # the bias grad is the FP32 sum of the bf16 upstream gradient, rounded once to bf16
    assert torch.equal(db8, g.bfloat16().float().reshape(-1, 130).sum(0).bfloat16())


def test_saved_tensors_for_backward_are_fp8():
    lin = fp8.FP8Linear(300, 140)
    x = torch.randn(3, 70, 300, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    fp8_shapes = {tuple(t.shape) for t in saved if t.dtype == torch.float8_e4m3fn}
    assert (210, 300) in fp8_shapes, "the input is kept as its (128, 1)-quantized FP8 copy"
    assert (140, 300) in fp8_shapes, "the weight is kept as its 128x128-quantized FP8 copy"
    high = [t for t in saved if t.dtype != torch.float8_e4m3fn]
    assert all(t.dtype == torch.float32 for t in high), [t.dtype for t in high]
    # only the block scales remain in FP32: (ceil(210/128), 300) for x and (2, 3) for the weight
    assert sorted(tuple(t.shape) for t in high) == [(2, 3), (2, 300)]
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def test_no_grad_forward_saves_nothing_and_matches():
    lin = fp8.FP8Linear(130, 64)
    x = torch.randn(5, 130)
    with torch.no_grad():
        y0 = lin(x)
    y1 = lin(x.requires_grad_())
    assert torch.equal(y0, y1.detach())


# --- convert_to_fp8 on a small transformer ------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, heads: int, experts: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d)
        self.gate = nn.Linear(d, experts, bias=False)  # a router: stays high precision
        self.gate_proj = nn.Linear(d, 2 * d, bias=False)  # SwiGLU gate: an ordinary projection (FP8)
        self.up_proj = nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        route = torch.softmax(self.gate(h), dim=-1).amax(-1, keepdim=True)  # a toy router weight per token
        return x + route * self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLM(nn.Module):
    def __init__(self, vocab=97, d=64, heads=4, layers=2, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.proj_out = nn.Linear(d, vocab, bias=False)  # tied to the embedding, not named like a head
            self.proj_out.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.proj_out(x) if hasattr(self, "proj_out") else self.lm_head(x)


def test_convert_to_fp8_keeps_head_embedding_and_router():
    model = fp8.convert_to_fp8(TinyLM(tie=True))
    assert type(model.embed) is nn.Embedding
    assert type(model.lm_head) is nn.Linear and type(model.proj_out) is nn.Linear
    for blk in model.blocks:
        assert type(blk.gate) is nn.Linear
        for name in ("qkv", "o_proj", "gate_proj", "up_proj", "down_proj"):
            assert isinstance(getattr(blk, name), fp8.FP8Linear), name
    custom = fp8.convert_to_fp8(TinyLM(), filter_fn=lambda name, m: name.endswith("down_proj"))
    converted = [n for n, m in custom.named_modules() if isinstance(m, fp8.FP8Linear)]
    assert converted == ["blocks.0.down_proj", "blocks.1.down_proj"]


def test_convert_to_fp8_small_transformer_trains_on_cpu():
    torch.manual_seed(0)
    model = TinyLM()
    params_before = {id(p) for p in model.parameters()}
    fp8.convert_to_fp8(model)
    assert {id(p) for p in model.parameters()} == params_before  # the optimizer's references stay valid
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 97, (4, 25))  # a fixed batch: the model can memorise it
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    print(f"FP8 tiny transformer: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 30 steps")
    assert losses[-1] < 0.5 * losses[0], losses
