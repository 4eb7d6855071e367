"""SwiGLU experts whose forward GEMMs run in FP8 on the FP8 dispatch payload (DeepSeek-V3's recipe).

Forward, for the tokens of every local expert at once (grouped GEMMs, contiguous or masked layout):

    h = grouped_gemm(x_fp8, [w1; w3])         x_fp8: the dispatched FP8Tensor (1x128 tiles), used as is
    a = silu(h1) * h3                          in the weights' dtype
    y = grouped_gemm(a, w2)                    a quantized 1x128 inside fp8.grouped_gemm_*

Weights are quantized 128x128 per expert inside ``fp8.grouped_gemm_*``; accumulation is FP32. Backward
recomputes the expert in the weights' dtype on the dequantized input (the values the forward consumed),
so the input gradient flows through the dispatch's grad proxy to the source tokens and the weight
gradients are those of the dequantized operands. (FP8 dgrad/wgrad for dense layers: ``fp8.FP8Linear``.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_comm.dispatcher import DispatchResult

__all__ = ["fp8_grouped_swiglu"]


def fp8_grouped_swiglu(
    res: DispatchResult, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> torch.Tensor:
    """y in the dispatch layout, differentiable in w1, w2, w3 and (through res.grad_proxy) the tokens."""
    from fp8 import FP8Tensor

    if not isinstance(res.x, FP8Tensor):
        raise ValueError(
            "the fp8 expert backend needs a dispatch with payload='fp8' (res.x is not an FP8Tensor)"
        )
    proxy = res.grad_proxy
    if proxy is None:  # no gradient wanted for the tokens: a cheap stand-in of the right shape
        proxy = torch.zeros((), dtype=w1.dtype, device=w1.device).expand(res.x.shape)
    return _FP8GroupedSwiGLU.apply(proxy, w1, w2, w3, res)


def _grouped(a, b: torch.Tensor, res: DispatchResult, dtype: torch.dtype) -> torch.Tensor:
    import fp8

    if res.layout == "contiguous":
        return fp8.grouped_gemm_contiguous(a, b, res.m_offsets, out_dtype=dtype)
    return fp8.grouped_gemm_masked(a, b, res.tokens_per_expert, out_dtype=dtype)


class _FP8GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proxy, w1, w2, w3, res: DispatchResult):
        dtype = w1.dtype
        inter = w1.shape[1]
        h = _grouped(res.x, torch.cat([w1, w3], dim=1), res, dtype)
        a = F.silu(h[..., :inter]) * h[..., inter:]
        y = _grouped(a, w2, res, dtype)
        ctx.res = res
        ctx.save_for_backward(w1, w2, w3)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        res: DispatchResult = ctx.res
        w1, w2, w3 = ctx.saved_tensors
        from moe_comm.experts import swiglu_reference

        with torch.enable_grad():
            x = res.x.dequantize(w1.dtype).requires_grad_(ctx.needs_input_grad[0])
            ws = [w.detach().requires_grad_() for w in (w1, w2, w3)]
            if res.layout == "contiguous":
                b = res.m_offsets.tolist()
                y = torch.cat([swiglu_reference(x[b[e] : b[e + 1]], ws[0][e], ws[1][e], ws[2][e])
                               for e in range(w1.shape[0])])  # fmt: skip
            else:
                h = F.silu(torch.bmm(x, ws[0].transpose(1, 2))) * torch.bmm(x, ws[2].transpose(1, 2))
                y = torch.bmm(h, ws[1].transpose(1, 2))
                valid = torch.arange(x.shape[1], device=x.device)[None, :] < res.tokens_per_expert[:, None]
                grad_y = grad_y * valid[..., None]
            inputs = ([x] if ctx.needs_input_grad[0] else []) + ws
            grads = torch.autograd.grad(y, inputs, grad_y)
        gx = grads[0] if ctx.needs_input_grad[0] else None
        g1, g2, g3 = grads[-3:]
        return gx, g1, g2, g3, None
