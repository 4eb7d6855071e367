"""The "cuda" backend of fp8's quantizers: csrc/fp8/quant_e4m3_blockwise.cu as torch.library ops.

Ops (namespace ``frugal_fp8``; CPU implementation = the reference where one is registered; CUDA through
``fp8._C`` with raw pointers and the current stream; fake implementations that check the arguments)::

    quant_per_token_1x128(x (M, K), scale_format) -> q (M, K) e4m3, scales (M, ceil(K/128)) fp32
    quant_rowwise_colwise(x (T, C), scale_format, rowwise, colwise) -> q_row (T, C) e4m3,
        s_row (T, ceil(C/128)), qt_col (C, ld_t) e4m3, s_col (ceil(T/128), C), nonfinite (1,) int32
    quant_colwise_grouped(x (T, C), token_offsets (G+1,) int32, scale_format, rowwise)
        -> q_row, s_row, qt_col (C, ld_t), s_col (T//128 + G, C), block_offsets (G+1,) int32, nonfinite
    quant_per_block_128x128(w (B, N, K), scale_format) -> q (B, N, K), s (B, N/128, K/128) (ceil), nonfinite

``scale_format`` is ScaleFormat.code (0 fp32, 1 pow2, 2 ue8m0). ``qt_col`` is the 128x1 (per 128 tokens)
quantization stored transposed, token-contiguous, as the weight-grad GEMM reads it; the FP8Tensor (block
(128, 1)) that :func:`quantize_128x1_cuda` returns keeps the logical (T, C) shape as the view
``qt_col[:, :T].t()``, so fp8's reference code reads it unchanged and the wgrad kernel uses it without a copy.
``nonfinite`` is a device flag the kernels raise on NaN/inf input: the finiteness check costs no extra pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8._cuda_util import FP8_DTYPE as _FP8
from fp8._cuda_util import check as _check
from fp8._cuda_util import ext as _ext
from fp8._cuda_util import ptr as _ptr
from fp8._ext import DTYPE_CODES, require_extension, stream_handle
from fp8.quant import BLOCK, INPUT_DTYPES, FP8Tensor, ScaleFormat, ceil_div, quantize_blockwise

_FORMATS = {f.code: f for f in ScaleFormat}


def _check_1x128(x: torch.Tensor, scale_format: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"quant_per_token_1x128: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"quant_per_token_1x128: x.dtype={x.dtype} must be one of {INPUT_DTYPES}")
    if x.shape[1] < 1:
        raise ValueError(f"quant_per_token_1x128: x.shape={tuple(x.shape)} needs K >= 1")
    if scale_format not in _FORMATS:
        raise ValueError(f"quant_per_token_1x128: {scale_format=} must be one of {sorted(_FORMATS)}")


@torch.library.custom_op("frugal_fp8::quant_per_token_1x128", mutates_args=(), device_types="cpu")
def quant_per_token_1x128(x: torch.Tensor, scale_format: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_1x128(x, scale_format)
    q, scale = quantize_blockwise(x, 1, BLOCK, scale_format=_FORMATS[scale_format], check_finite=False)
    return q, scale


@quant_per_token_1x128.register_kernel("cuda")
def _quant_per_token_1x128_cuda(x: torch.Tensor, scale_format: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_1x128(x, scale_format)
    ext = require_extension("fp8")
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(m, ceil_div(k, BLOCK), dtype=torch.float32, device=x.device)
    if m > 0:
        ext.quant_per_token_1x128(
            x.data_ptr(),
            DTYPE_CODES[x.dtype],
            q.data_ptr(),
            scales.data_ptr(),
            m,
            k,
            max(x.stride(0), k),
            scale_format,
            stream_handle(x.device),
        )
    return q, scales


@quant_per_token_1x128.register_fake
def _quant_per_token_1x128_fake(x: torch.Tensor, scale_format: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
    m, k = x.shape
    q = x.new_empty((m, k), dtype=torch.float8_e4m3fn)
    scales = x.new_empty((m, (k + BLOCK - 1) // BLOCK), dtype=torch.float32)
    return q, scales


def quant_per_token_1x128_cuda(
    x: torch.Tensor, fmt: ScaleFormat, *, check_finite: bool = True, arg: str = "x"
) -> FP8Tensor:
    """quantize_1x128 of a CUDA tensor (..., K) through the kernel; same result as the reference."""
    if check_finite and not bool(torch.isfinite(x).all()):  # the kernel's fmaxf would hide NaN
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{arg} has {bad} non-finite values (NaN or inf) of {x.numel()}; FP8 quantization needs finite "
            "input (check_finite=False skips this check)"
        )
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    q, scale = torch.ops.frugal_fp8.quant_per_token_1x128(x2, fmt.code)
    return FP8Tensor(q.view(x.shape), scale.view(*x.shape[:-1], ceil_div(k, BLOCK)), (1, BLOCK), fmt)


# ------------------------------------------------ fused 1x128 / 128x1, grouped 128x1, 128x128 quantizers


def _check_quant_input(x: torch.Tensor, scale_format: int, op: str, dims: int) -> None:
    _check(x.dim() == dims, f"{op}: x must be {dims}-D, got shape {tuple(x.shape)}")
    _check(x.dtype in INPUT_DTYPES, f"{op}: x.dtype={x.dtype} must be one of {INPUT_DTYPES}")
    _check(x.shape[-1] >= 1, f"{op}: x.shape={tuple(x.shape)} needs a last dim >= 1")
    _check(scale_format in _FORMATS, f"{op}: {scale_format=} must be one of {sorted(_FORMATS)}")


def check_offsets_arg(token_offsets: torch.Tensor, op: str) -> int:
    ok = token_offsets.dim() == 1 and token_offsets.numel() >= 2 and token_offsets.dtype == torch.int32
    _check(
        ok,
        f"{op}: token_offsets must be (G+1,) int32, got {token_offsets.dtype} {tuple(token_offsets.shape)}",
    )
    return token_offsets.numel() - 1


def _quant_outputs(x: torch.Tensor, rowwise: bool, colwise: bool, n_blocks: int):
    t, c = x.shape
    e8, e32 = x.new_empty((0, 0), dtype=_FP8), x.new_empty((0, 0), dtype=torch.float32)
    q_row = x.new_empty((t, c), dtype=_FP8) if rowwise else e8
    s_row = x.new_empty((t, ceil_div(c, BLOCK)), dtype=torch.float32) if rowwise else e32
    qt_col = x.new_empty((c, n_blocks * BLOCK), dtype=_FP8) if colwise else e8
    s_col = x.new_empty((n_blocks, c), dtype=torch.float32) if colwise else e32
    return q_row, s_row, qt_col, s_col


def _x_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    return x, max(x.stride(0), x.shape[1])


@torch.library.custom_op("frugal_fp8::quant_rowwise_colwise", mutates_args=(), device_types="cuda")
def quant_rowwise_colwise(
    x: torch.Tensor, scale_format: int, rowwise: bool, colwise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_quant_input(x, scale_format, "quant_rowwise_colwise", 2)
    _check(rowwise or colwise, "quant_rowwise_colwise: ask for rowwise and/or colwise output")
    t, c = x.shape
    n_blocks = ceil_div(t, BLOCK)
    q_row, s_row, qt_col, s_col = _quant_outputs(x, rowwise, colwise, n_blocks)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    if t > 0:
        x, ld_x = _x_rows(x)
        rows = (q_row, s_row) if rowwise else (None, None)
        cols = (qt_col, s_col) if colwise else (None, None)
        with torch.cuda.device(x.device):
            _ext().quant_rowwise_colwise_128(
                x.data_ptr(), DTYPE_CODES[x.dtype], t, c, ld_x, _ptr(rows[0]), _ptr(rows[1]), _ptr(cols[0]),
                _ptr(cols[1]), n_blocks * BLOCK, n_blocks, 0, 0, 0, scale_format, flag.data_ptr(),
                stream_handle(x.device),
            )  # fmt: skip
    return q_row, s_row, qt_col, s_col, flag


@quant_rowwise_colwise.register_fake
def _(x, scale_format, rowwise, colwise):
    _check_quant_input(x, scale_format, "quant_rowwise_colwise", 2)
    _check(rowwise or colwise, "quant_rowwise_colwise: ask for rowwise and/or colwise output")
    outs = _quant_outputs(x, rowwise, colwise, ceil_div(x.shape[0], BLOCK))
    return (*outs, x.new_empty((1,), dtype=torch.int32))


@torch.library.custom_op("frugal_fp8::quant_colwise_grouped", mutates_args=(), device_types="cuda")
def quant_colwise_grouped(
    x: torch.Tensor, token_offsets: torch.Tensor, scale_format: int, rowwise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_quant_input(x, scale_format, "quant_colwise_grouped", 2)
    g = check_offsets_arg(token_offsets, "quant_colwise_grouped")
    t, c = x.shape
    n_blocks = t // BLOCK + g  # capacity: sum_g max(1, ceil(T_g / 128)) <= T // 128 + G
    q_row, s_row, qt_col, s_col = _quant_outputs(x, rowwise, True, n_blocks)
    blk = torch.empty(g + 1, dtype=torch.int32, device=x.device)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    x, ld_x = _x_rows(x)
    offsets = token_offsets.to(x.device).contiguous()
    rows = (q_row, s_row) if rowwise else (None, None)
    with torch.cuda.device(x.device):
        ext, stream = _ext(), stream_handle(x.device)
        ext.token_block_offsets(offsets.data_ptr(), g, blk.data_ptr(), stream)
        ext.quant_rowwise_colwise_128(
            x.data_ptr(), DTYPE_CODES[x.dtype], t, c, ld_x, _ptr(rows[0]), _ptr(rows[1]), qt_col.data_ptr(),
            s_col.data_ptr(), n_blocks * BLOCK, n_blocks, offsets.data_ptr(), blk.data_ptr(), g, scale_format,
            flag.data_ptr(), stream,
        )  # fmt: skip
    return q_row, s_row, qt_col, s_col, blk, flag


@quant_colwise_grouped.register_fake
def _(x, token_offsets, scale_format, rowwise):
    _check_quant_input(x, scale_format, "quant_colwise_grouped", 2)
    g = check_offsets_arg(token_offsets, "quant_colwise_grouped")
    outs = _quant_outputs(x, rowwise, True, x.shape[0] // BLOCK + g)
    return (*outs, x.new_empty((g + 1,), dtype=torch.int32), x.new_empty((1,), dtype=torch.int32))


def _block_outputs(w: torch.Tensor):
    b, n, k = w.shape
    s = w.new_empty((b, ceil_div(n, BLOCK), ceil_div(k, BLOCK)), dtype=torch.float32)
    return w.new_empty((b, n, k), dtype=_FP8), s


@torch.library.custom_op("frugal_fp8::quant_per_block_128x128", mutates_args=(), device_types="cuda")
def quant_per_block_128x128(
    w: torch.Tensor, scale_format: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_quant_input(w, scale_format, "quant_per_block_128x128", 3)
    q, s = _block_outputs(w)
    flag = torch.zeros(1, dtype=torch.int32, device=w.device)
    w = w.contiguous()
    b, n, k = w.shape
    with torch.cuda.device(w.device):
        _ext().quant_per_block_128x128(
            w.data_ptr(), DTYPE_CODES[w.dtype], b, n, k, q.data_ptr(), s.data_ptr(), scale_format,
            flag.data_ptr(), stream_handle(w.device),
        )  # fmt: skip
    return q, s, flag


@quant_per_block_128x128.register_fake
def _(w, scale_format):
    _check_quant_input(w, scale_format, "quant_per_block_128x128", 3)
    return (*_block_outputs(w), w.new_empty((1,), dtype=torch.int32))


def _raise_if_nonfinite(flag: torch.Tensor, check_finite: bool, arg: str) -> None:
    if check_finite and bool(flag.item()):  # one sync; the kernel set the flag during its single pass
        raise ValueError(
            f"{arg} has non-finite values (NaN or inf); FP8 quantization needs finite input "
            "(check_finite=False skips this check)"
        )


def quantize_128x128_cuda(
    w: torch.Tensor, fmt: ScaleFormat, *, check_finite: bool = True, arg: str = "w"
) -> FP8Tensor:
    """fp8.quantize_128x128 of a CUDA tensor (..., N, K) by the kernel (bit-identical to the reference)."""
    *lead, n, k = w.shape
    q, s, flag = torch.ops.frugal_fp8.quant_per_block_128x128(w.reshape(-1, n, k), fmt.code)
    _raise_if_nonfinite(flag, check_finite, arg)
    return FP8Tensor(q.view(*lead, n, k), s.view(*lead, *s.shape[1:]), (BLOCK, BLOCK), fmt)


def _colwise_tensor(qt_col: torch.Tensor, s_col: torch.Tensor, t: int, fmt: ScaleFormat) -> FP8Tensor:
    return FP8Tensor(qt_col[:, :t].t(), s_col, (BLOCK, 1), fmt)  # logical (T, C), stored token-contiguous


def quantize_128x1_cuda(
    x: torch.Tensor, fmt: ScaleFormat, *, check_finite: bool = True, arg: str = "x"
) -> FP8Tensor:
    """fp8.quantize_128x1 of a CUDA tensor (..., T, C); 2-D data is a transposed view (module docstring)."""
    if x.dim() == 2:
        _, _, qt, s, flag = torch.ops.frugal_fp8.quant_rowwise_colwise(x, fmt.code, False, True)
        _raise_if_nonfinite(flag, check_finite, arg)
        return _colwise_tensor(qt, s, x.shape[0], fmt)
    parts = [quantize_128x1_cuda(xb, fmt, check_finite=check_finite, arg=arg) for xb in x.flatten(0, -3)]
    data = torch.stack([p.data for p in parts]).view(x.shape)  # batched inputs are rare: a plain copy
    scale = torch.stack([p.scale for p in parts]).view(*x.shape[:-2], *parts[0].scale.shape)
    return FP8Tensor(data, scale, (BLOCK, 1), fmt)


def quantize_1x128_128x1_cuda(
    x: torch.Tensor, fmt: ScaleFormat, *, check_finite: bool = True, arg: str = "x"
) -> tuple[FP8Tensor, FP8Tensor]:
    """Both quantizations of x (T, C) in one pass: 1x128 (GEMM operand) and 128x1 (weight-grad operand)."""
    q, s, qt, st, flag = torch.ops.frugal_fp8.quant_rowwise_colwise(x, fmt.code, True, True)
    _raise_if_nonfinite(flag, check_finite, arg)
    return FP8Tensor(q, s, (1, BLOCK), fmt), _colwise_tensor(qt, st, x.shape[0], fmt)


@dataclass
class GroupedTokenFP8:
    """Per-expert 128x1 quantization of several experts' rows (contiguous layout), for the grouped wgrad.

    Expert g's tokens ``x[off[g]:off[g+1]]`` are quantized per 128 tokens starting at its first token and
    stored transposed from column ``128 * block_offsets[g]`` of ``qt`` (C, ld_t) e4m3; ``scale``
    (T//128 + G, C) fp32 holds one row per 128-token block. An expert without tokens owns one all-zero block.
    """

    qt: torch.Tensor
    scale: torch.Tensor
    token_offsets: torch.Tensor  # (G+1,) int32 on the device
    block_offsets: torch.Tensor  # (G+1,) int32 on the device
    tokens: int
    scale_format: ScaleFormat

    def expert(self, g: int) -> FP8Tensor:
        """Expert g as an FP8Tensor (block (128, 1)), for tests and the reference (host syncs)."""
        lo, hi = int(self.token_offsets[g]), int(self.token_offsets[g + 1])
        b0 = int(self.block_offsets[g])
        data = self.qt[:, b0 * BLOCK : b0 * BLOCK + (hi - lo)].t()
        return FP8Tensor(data, self.scale[b0 : b0 + ceil_div(hi - lo, BLOCK)], (BLOCK, 1), self.scale_format)


def quantize_128x1_grouped_cuda(
    x: torch.Tensor, m_offsets: torch.Tensor, fmt: ScaleFormat, *, check_finite: bool = True, arg: str = "x"
) -> GroupedTokenFP8:
    """Per-expert 128x1 quantization of x (T, C) with the experts' rows at m_offsets (G+1,); no host sync
    (except the non-finite check, skipped with check_finite=False)."""
    offsets = m_offsets.to(device=x.device, dtype=torch.int32)
    _, _, qt, s, blk, flag = torch.ops.frugal_fp8.quant_colwise_grouped(x, offsets, fmt.code, False)
    _raise_if_nonfinite(flag, check_finite, arg)
    return GroupedTokenFP8(qt, s, offsets, blk, x.shape[0], fmt)
