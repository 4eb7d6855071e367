"""Autograd functions of dispatch and combine, and the FP8 payload helpers.

    dispatch  forward: expand the received rows into the expert layout
              backward: combine of the gradients (weights 1): d x[t] = sum_k d expert_x[pair (t, k)]
    combine   forward: out[t] = sum_k w[t, k] * y[pair (t, k)] (FP32, k ascending)
              backward: dispatch of d out, weighted on the expert side: d y[pair] = w * d out[t];
                        d w[t, k] = <d out[t], y[pair (t, k)]>

Both backwards run the dispatcher's raw launchers (moe_comm.dispatcher) and wait for them (bounded).

FP8 payloads: the source quantizes x per 1x128 tile once (``fp8.quantize_1x128``), each packed row carries
[e4m3 data (H bytes) | pad to 4 | fp32 scales (4 * ceil(H/128) bytes)], and the receiver gets an
``fp8.FP8Tensor``. A float8 tensor cannot carry an autograd gradient of the right dtype, so the dispatch's
differentiable output is a *grad proxy*: a zero-stride (rows, H) tensor in x's dtype whose gradient is the
gradient of the dequantized tokens. Expert functions either consume (FP8Tensor, proxy) themselves or call
``DispatchResult.dequantized()``.
"""

from __future__ import annotations

import torch

from moe_comm.dispatcher import DispatchHandle, DispatchResult

__all__ = ["CombineFn", "DequantThroughProxy", "DispatchFn", "finish_dispatch", "finish_dispatch_nograd"]

_TILE = 128


def _scale_offset(hidden: int) -> int:
    return (hidden + 3) // 4 * 4


def pack_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x (T, H) -> (T, nbytes) uint8 rows [e4m3 data | pad | fp32 1x128 scales], and nbytes."""
    try:
        from fp8 import quantize_1x128
    except ImportError as e:  # an fp8 package without its quantizer: say so instead of a bare ImportError
        raise RuntimeError(f"payload='fp8' needs fp8.quantize_1x128, which failed to import: {e}") from e
    T, H = x.shape
    off = _scale_offset(H)
    nbytes = off + 4 * ((H + _TILE - 1) // _TILE)
    if x.is_cuda:
        from moe_comm.cuda_ops import use_kernels

        if use_kernels(x):  # quantize straight into the packed rows (csrc/moe_comm/pack_fp8.cu)
            if not bool(torch.isfinite(x).all()):  # as quantize_1x128's check (the kernel's fmaxf hides NaN)
                raise ValueError("x has non-finite values (NaN or inf); FP8 dispatch needs finite tokens")
            index = torch.arange(T, device=x.device)
            return torch.ops.frugal_moe.pack_rows_fp8_1x128(x, index, nbytes, off, 0), nbytes
    q = quantize_1x128(x)
    rows = torch.zeros(T, nbytes, dtype=torch.uint8, device=x.device)
    rows[:, :H] = q.data.view(torch.uint8)
    rows[:, off:] = q.scale.contiguous().view(torch.uint8)
    return rows, nbytes


def expand_payload(layout, fmt, recv: torch.Tensor, payload: str, hidden: int, dtype: torch.dtype):
    """The received packed rows in the expert layout: a tensor in ``dtype``, or an fp8.FP8Tensor (padding
    rows: data 0, scale 0). Runs at the end of the dispatch chain (on the communication thread)."""
    rows = fmt.payload(recv)
    if payload == "native":
        out = layout.expand(rows)
        return out.view(dtype).view(*out.shape[:-1], hidden)
    from fp8 import FP8Tensor

    off, n_tiles = _scale_offset(hidden), (hidden + _TILE - 1) // _TILE
    data = layout.expand(rows[:, :hidden]).view(torch.float8_e4m3fn)
    scale = layout.expand(rows[:, off : off + 4 * n_tiles]).view(torch.float32)
    lead = data.shape[:-1]  # explicit sizes: a rank may receive no token at all
    return FP8Tensor(data.reshape(*lead, hidden), scale.reshape(*lead, n_tiles), (1, _TILE))


def _layout_shape(handle: DispatchHandle) -> tuple[int, ...]:
    layout = handle.layout
    if layout.kind == "contiguous":
        return (layout.num_rows, handle.hidden)
    return (layout.num_local, layout.capacity, handle.hidden)


def _result(handle: DispatchHandle, x, proxy) -> DispatchResult:
    layout = handle.layout
    if layout.kind == "contiguous":
        return DispatchResult(x, layout.counts, layout.m_offsets, handle, layout.counts_list, proxy)
    return DispatchResult(x, layout.counts, None, handle, None, proxy)


def finish_dispatch(x: torch.Tensor, handle: DispatchHandle, expanded) -> DispatchResult:
    """The autograd path: the result's tensor (or FP8 grad proxy) is connected to x."""
    if handle.payload == "native":
        handle.expanded = expanded  # handed over by attribute: an input returned as-is would become a view
        return _result(handle, DispatchFn.apply(x, handle), None)
    proxy = DispatchFn.apply(x, handle) if x.requires_grad and torch.is_grad_enabled() else None
    return _result(handle, expanded, proxy)


def finish_dispatch_nograd(x: torch.Tensor, handle: DispatchHandle, expanded) -> DispatchResult:
    return _result(handle, expanded, None)


class DispatchFn(torch.autograd.Function):
    """Forward: the received rows in the expert layout (FP8: a zero-stride proxy). Backward: a combine."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        ctx.handle = handle
        if handle.payload == "fp8":
            return x.new_zeros(()).expand(_layout_shape(handle))
        out, handle.expanded = handle.expanded, None  # computed by the dispatch chain
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        handle: DispatchHandle = ctx.handle
        return handle.dispatcher.launch_dispatch_backward(grad, handle).wait(), None


class CombineFn(torch.autograd.Function):
    """Forward: FP32 weighted sum in k order. Backward: dispatch of grad_out, weighted at the experts."""

    @staticmethod
    def forward(ctx, y, topk_weights, handle: DispatchHandle, result: tuple) -> torch.Tensor:
        saved, out = result  # computed by the combine chain; saved: what d topk_weights needs
        ctx.handle, ctx.y_dtype, ctx.w_dtype = handle, y.dtype, topk_weights.dtype
        handle.combine_saved = saved if ctx.needs_input_grad[1] else None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        handle: DispatchHandle = ctx.handle
        grad_y, grad_w = handle.dispatcher.launch_combine_backward(grad_out, handle, ctx.y_dtype).wait()
        if not ctx.needs_input_grad[0]:
            grad_y = None
        grad_w = grad_w.to(ctx.w_dtype) if ctx.needs_input_grad[1] and grad_w is not None else None
        return grad_y, grad_w, None, None


class DequantThroughProxy(torch.autograd.Function):
    """Dequantized FP8 tokens whose gradient flows to the dispatch's grad proxy."""

    @staticmethod
    def forward(ctx, proxy: torch.Tensor, q, dtype: torch.dtype) -> torch.Tensor:
        return q.dequantize(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None
