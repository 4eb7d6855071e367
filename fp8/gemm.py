"""Blockwise-scaled FP8 GEMMs: ``gemm`` (fprop/dgrad, NT) and ``gemm_wgrad`` (weight grad), with references.

``gemm(a, b) = a @ b.T`` with ``a`` (M, K) quantized per 1x128 and ``b`` (N, K) per 128x128 block. The
hardware (Hopper WGMMA) accumulates FP8 products of one 128-wide K slice in limited precision; DeepSeek-V3
promotes each slice's partial sum to an FP32 accumulator, applying the scales there. The reference
emulates exactly that, for every K block ``kb``::

    partial[m, n] = sum_{k in kb} fp32(a_q[m, k]) * fp32(b_q[n, k])     (exact in fp32 for 128 e4m3 products)
    acc[m, n]    += partial[m, n] * (a_scale[m, kb] * b_scale[n // 128, kb])

``gemm_wgrad(dy, x) = dy.T @ x`` contracts over the token dim M; both operands are quantized per 128
tokens (FP8Tensor block (128, 1)), so the promotion happens per 128-token slice ``mb``::

    acc[n, k] += (sum_{m in mb} fp32(dy_q[m, n]) * fp32(x_q[m, k])) * (dy_scale[mb, n] * x_scale[mb, k])

Both are vectorised (one bmm over all K or M blocks, chunked to bound the FP32 partials' memory).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fp8.backends import register_impl, select_backend
from fp8.quant import BLOCK, FP8Tensor, ceil_div, quantize_1x128, quantize_128x1, quantize_128x128

OUT_DTYPES = (torch.bfloat16, torch.float32, torch.float16)
# Elements of the (blocks, rows, cols) FP32 partials the references hold at once (x2 with the scale product).
_CHUNK_ELEMS = 1 << 22


def gemm(
    a: torch.Tensor | FP8Tensor,
    b: torch.Tensor | FP8Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """``a @ b.T`` in FP8 with FP32 accumulation, promoted every 128 of K (the fprop and dgrad GEMM).

    a: (M, K) float tensor (quantized 1x128 here) or FP8Tensor with block (1, 128).
    b: (N, K) float tensor (quantized 128x128 here) or FP8Tensor with block (128, 128).
    out_dtype: bfloat16 (default), float32 or float16; when ``out`` is given it defaults to out.dtype.
    out: optional (M, N) tensor written in place (and returned).
    accumulate: ``out += a @ b.T`` (out required, float32).
    backend: None/"auto", "cuda", "torch" or "reference" (see fp8/backends.py).
    Returns (M, N) of ``out_dtype``. Any M >= 0, N >= 1, K >= 1.
    """
    aq = as_fp8(a, "a", (1, BLOCK), quantize_1x128)
    bq = as_fp8(b, "b", (BLOCK, BLOCK), quantize_128x128)
    _require_dim(aq, "a", 2)
    _require_dim(bq, "b", 2)
    if aq.shape[1] != bq.shape[1]:
        raise ValueError(
            f"gemm computes a @ b.T: a.shape={tuple(aq.shape)} and b.shape={tuple(bq.shape)} need the same K"
        )
    _same_device(aq, bq)
    out_dtype = resolve_out(out, out_dtype, accumulate, (aq.shape[0], bq.shape[0]))
    _, impl = select_backend("gemm", aq.device, backend)
    return impl(aq, bq, out_dtype=out_dtype, out=out, accumulate=accumulate)


def gemm_wgrad(
    dy: torch.Tensor | FP8Tensor,
    x: torch.Tensor | FP8Tensor,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Weight gradient ``dy.T @ x`` in FP8 with FP32 accumulation, promoted every 128 tokens.

    dy: (M, N) output grad, float tensor (quantized 128x1 here) or FP8Tensor with block (128, 1).
    x:  (M, K) layer input, float tensor (quantized 128x1 here) or FP8Tensor with block (128, 1).
    out: optional (N, K) float32 tensor (e.g. the FP32 weight grad); ``accumulate=True`` adds into it.
    Returns (N, K) float32.
    """
    dyq = as_fp8(dy, "dy", (BLOCK, 1), quantize_128x1)
    xq = as_fp8(x, "x", (BLOCK, 1), quantize_128x1)
    _require_dim(dyq, "dy", 2)
    _require_dim(xq, "x", 2)
    if dyq.shape[0] != xq.shape[0]:
        raise ValueError(
            f"gemm_wgrad computes dy.T @ x: dy.shape={tuple(dyq.shape)} and x.shape={tuple(xq.shape)} need "
            "the same number of tokens M (dim 0)"
        )
    _same_device(dyq, xq)
    if out is not None and out.dtype != torch.float32:
        raise ValueError(f"gemm_wgrad: out.dtype={out.dtype} must be torch.float32 (the FP32 weight grad)")
    resolve_out(out, torch.float32, accumulate, (dyq.shape[1], xq.shape[1]))
    _, impl = select_backend("gemm_wgrad", dyq.device, backend)
    return impl(dyq, xq, out=out, accumulate=accumulate)


# --- argument handling shared with fp8/grouped.py ----------------------------------------------------------


def as_fp8(
    t: torch.Tensor | FP8Tensor, arg: str, block: tuple[int, int], quantize: Callable[..., FP8Tensor]
) -> FP8Tensor:
    """``t`` itself if it is an FP8Tensor with ``block``, else ``quantize(t)``."""
    if isinstance(t, FP8Tensor):
        if t.block != block:
            raise ValueError(f"{arg}.block={t.block} must be {block} here")
        return t
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor or an FP8Tensor, got {type(t).__name__}")
    return quantize(t, arg=arg)


def resolve_out(
    out: torch.Tensor | None, out_dtype: torch.dtype | None, accumulate: bool, shape: tuple[int, ...]
) -> torch.dtype:
    """Validate ``out`` / ``out_dtype`` / ``accumulate`` for a result of ``shape``; return the out dtype."""
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out= (the float32 tensor to add the product into)")
        dtype = torch.bfloat16 if out_dtype is None else out_dtype
    else:
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"out.shape={tuple(out.shape)} must be {tuple(shape)}")
        if out_dtype is not None and out_dtype != out.dtype:
            raise ValueError(f"out_dtype={out_dtype} disagrees with out.dtype={out.dtype}")
        if accumulate and out.dtype != torch.float32:
            raise ValueError(
                f"accumulate=True needs a float32 out (accumulation is FP32), got out.dtype={out.dtype}"
            )
        dtype = out.dtype
    if dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype={dtype} must be one of {OUT_DTYPES}")
    return dtype


def write_out(
    acc: torch.Tensor, out_dtype: torch.dtype, out: torch.Tensor | None, accumulate: bool
) -> torch.Tensor:
    """Deliver an FP32 result: a new ``out_dtype`` tensor, a copy into ``out``, or ``out += acc``."""
    if out is None:
        return acc.to(out_dtype)
    if accumulate:
        return out.add_(acc)
    return out.copy_(acc)


def _require_dim(t: FP8Tensor, arg: str, dim: int) -> None:
    if t.dim() != dim:
        raise ValueError(f"{arg} must be {dim}-D, got shape {tuple(t.shape)}")


def _same_device(a: FP8Tensor, b: FP8Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"operands on different devices: {a.device} and {b.device}")


# --- references -------------------------------------------------------------------------------------------


def _blocks_along_last(q: torch.Tensor) -> torch.Tensor:
    """(R, K) fp8 -> (ceil(K/128), R, 128) float32, zero-padded along K, contiguous (bmm-ready)."""
    r, k = q.shape
    kb = ceil_div(k, BLOCK)
    qf = q.float()
    if kb * BLOCK != k:
        qf = F.pad(qf, (0, kb * BLOCK - k))
    return qf.view(r, kb, BLOCK).transpose(0, 1).contiguous()


def gemm_nt_fp32(a: FP8Tensor, b: FP8Tensor) -> torch.Tensor:
    """Reference of ``a @ b.T`` (a 1x128, b 128x128, both 2-D) as an FP32 (M, N) tensor."""
    with torch.autocast(a.device.type, enabled=False):  # FP32 partials even under autocast
        return _gemm_nt_fp32(a, b)


def _gemm_nt_fp32(a: FP8Tensor, b: FP8Tensor) -> torch.Tensor:
    m, n = a.shape[0], b.shape[0]
    kb = a.scale.shape[1]
    acc = torch.empty(m, n, dtype=torch.float32, device=a.device)
    a_blocks = _blocks_along_last(a.data)  # (kb, M, 128)
    b_blocks = _blocks_along_last(b.data).transpose(1, 2).contiguous()  # (kb, 128, N)
    a_scale = a.scale.t().unsqueeze(-1)  # (kb, M, 1)
    b_scale = (
        b.scale.repeat_interleave(BLOCK, dim=0)[:n].t().unsqueeze(1)
    )  # (kb, 1, N): scale of row n's block
    rows = max(1, _CHUNK_ELEMS // max(1, kb * n))
    for m0 in range(0, m, rows):  # chunks bound the (kb, rows, N) partials; one bmm per chunk
        rs = slice(m0, m0 + rows)
        partial = torch.bmm(a_blocks[:, rs], b_blocks)  # (kb, mc, N): one FP32 partial per 128-wide K slice
        partial.mul_(a_scale[:, rs] * b_scale)  # promotion: each partial times its two block scales ...
        torch.sum(partial, dim=0, out=acc[rs])  # ... summed in FP32
    return acc


def wgrad_fp32(dy: FP8Tensor, x: FP8Tensor) -> torch.Tensor:
    """Reference of ``dy.T @ x`` (both (128, 1)-blocked, 2-D) as an FP32 (N, K) tensor."""
    with torch.autocast(dy.device.type, enabled=False):  # FP32 partials even under autocast
        return _wgrad_fp32(dy, x)


def _wgrad_fp32(dy: FP8Tensor, x: FP8Tensor) -> torch.Tensor:
    n, k = dy.shape[1], x.shape[1]
    mb = dy.scale.shape[0]
    acc = torch.empty(n, k, dtype=torch.float32, device=dy.device)
    dy_blocks = _blocks_along_last(dy.data.t())  # (mb, N, 128): 128-token slices of dy.T
    x_blocks = _blocks_along_last(x.data.t()).transpose(1, 2).contiguous()  # (mb, 128, K)
    dy_scale = dy.scale.unsqueeze(-1)  # (mb, N, 1)
    x_scale = x.scale.unsqueeze(1)  # (mb, 1, K)
    cols = max(1, _CHUNK_ELEMS // max(1, mb * k))
    for n0 in range(0, n, cols):
        ns = slice(n0, n0 + cols)
        partial = torch.bmm(dy_blocks[:, ns], x_blocks)  # (mb, nc, K): one FP32 partial per token slice
        partial.mul_(dy_scale[:, ns] * x_scale)
        torch.sum(partial, dim=0, out=acc[ns])
    return acc


@register_impl("gemm", "reference")
def _gemm_reference(
    a: FP8Tensor, b: FP8Tensor, *, out_dtype: torch.dtype, out: torch.Tensor | None, accumulate: bool
) -> torch.Tensor:
    return write_out(gemm_nt_fp32(a, b), out_dtype, out, accumulate)


@register_impl("gemm_wgrad", "reference")
def _gemm_wgrad_reference(
    dy: FP8Tensor, x: FP8Tensor, *, out: torch.Tensor | None, accumulate: bool
) -> torch.Tensor:
    return write_out(wgrad_fp32(dy, x), torch.float32, out, accumulate)
