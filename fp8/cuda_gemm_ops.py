"""The "cuda" backend of fp8: csrc/fp8's sm90 kernels as torch.library ops, wired into fp8's backend choice.

Ops (namespace ``frugal_fp8``; CUDA implementations through ``fp8._C`` with raw pointers and the current
stream; fake implementations, which also check the arguments, so they trace under torch.compile)::

    quant_rowwise_colwise(x (T, C), scale_format, rowwise, colwise) -> q_row (T, C) e4m3,
        s_row (T, ceil(C/128)), qt_col (C, ld_t) e4m3, s_col (ceil(T/128), C), nonfinite (1,) int32
    quant_colwise_grouped(x (T, C), token_offsets (G+1,) int32, scale_format, rowwise)
        -> q_row, s_row, qt_col (C, ld_t), s_col (T//128 + G, C), block_offsets (G+1,) int32, nonfinite
    quant_per_block_128x128(w (B, N, K), scale_format) -> q (B, N, K), s (B, N/128, K/128) (ceil), nonfinite
    gemm_nt(a, sfa, b, sfb, out_dtype) -> (M, N)                 a (M, K) 1x128, b (N, K) 128x128
    gemm_nt_out_(a, sfa, b, sfb, out, accumulate)                 out (M, N) bf16/fp32, (+)= in place
    m_grouped_gemm_nt_contiguous(a, sfa, b, sfb, m_offsets, out_dtype) -> (M_total, N)   b (G, N, K)
    m_grouped_gemm_nt_masked(a, sfa, b, sfb, masked_m, out_dtype) -> (G, M_max, N)      a (G, M_max, K)
    gemm_wgrad_out_(dyt, s_dy, xt, s_x, out, tokens, accumulate)   out (N, K) fp32 (+)= dy.T @ x
    m_grouped_gemm_wgrad_out_(dyt, s_dy, xt, s_x, token_offsets, block_offsets, out, accumulate)
                                                                   out (G, N, K) fp32, one dy_g.T @ x_g each

``qt_col`` is the 128x1 (per 128 tokens) quantization stored transposed, token-contiguous: the weight-grad
GEMM contracts over tokens and Hopper's FP8 tensor cores read both operands K-major. The FP8Tensor
(block (128, 1)) that :func:`quantize_128x1_cuda` returns keeps the logical (T, C) shape as the view
``qt_col[:, :T].t()``, so fp8's reference code reads it unchanged and the wgrad kernel uses it without a copy.

Kernel requirements the wrappers meet (by copies, so every shape works): e4m3 rows 16-byte aligned (else
copied into rows padded to a multiple of 16; grouped operands are zero-padded, which leaves ceil(K/128)
and the result unchanged), output rows 16-byte aligned (odd N computed into a padded buffer), scales
contiguous fp32. Half-precision outputs are computed in fp32 and cast. M, N, K tails need nothing: TMA
zero-fills loads and clips stores. Only sm_90 (Hopper) runs these kernels; fp8.backends checks that.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fp8._ext import DTYPE_CODES, require_extension, stream_handle
from fp8.backends import register_impl
from fp8.quant import BLOCK, INPUT_DTYPES, FP8Tensor, ScaleFormat, ceil_div

_FP8 = torch.float8_e4m3fn
_KERNEL_OUT = (torch.bfloat16, torch.float32)  # output dtypes the GEMM kernels write directly
_FORMATS = {f.code: f for f in ScaleFormat}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _ext():
    return require_extension("fp8")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)


@functools.lru_cache(maxsize=4096)
def _dense_workspace_bytes(device: int, out_dtype: torch.dtype, m: int, n: int, k: int, acc: bool) -> int:
    if out_dtype == torch.bfloat16:
        return _ext().sm90_fp8_gemm_nt_1x128_128x128_bf16_workspace(m, n, k)
    return _ext().sm90_fp8_gemm_nt_1x128_128x128_f32_workspace(m, n, k, acc)


@functools.lru_cache(maxsize=1024)
def _grouped_workspace_bytes(device: int, kind: str, groups: int, out_dtype: torch.dtype) -> int:
    if kind == "wgrad":
        return _ext().sm90_fp8_gemm_wgrad_128x1_workspace(groups)
    return _ext().sm90_m_grouped_fp8_gemm_nt_workspace(groups, DTYPE_CODES[out_dtype])


def _rows16(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(t', ld)``: a 2-D e4m3 tensor whose rows start 16-byte aligned (TMA), and its row stride.

    ``t`` itself when it already is; else a copy into a (R, round_up(K, 16)) buffer whose tail columns the
    kernels never read (TMA treats columns >= K as out of bounds and loads zeros)."""
    r, k = t.shape
    if t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.stride(0) >= k and t.data_ptr() % 16 == 0:
        return t, max(t.stride(0), 16)
    buf = torch.empty(r, _round_up(k, 16), dtype=t.dtype, device=t.device)
    buf[:, :k].copy_(t)
    return buf, buf.stride(0)


def _pad_k16(t: torch.Tensor) -> torch.Tensor:
    """Contiguous (..., K) e4m3 zero-padded to K % 16 == 0 (the grouped kernels take K as the row stride)."""
    k = t.shape[-1]
    if k % 16 == 0 and t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    buf = t.new_zeros(*t.shape[:-1], _round_up(k, 16))
    buf[..., :k].copy_(t)
    return buf


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()


def _out_pad(n: int, dtype: torch.dtype) -> int:
    return _round_up(n, 16 // torch.empty((), dtype=dtype).element_size())


# ---------------------------------------------------------------------------------------------- quantizers


def _check_quant_input(x: torch.Tensor, scale_format: int, op: str, dims: int) -> None:
    _check(x.dim() == dims, f"{op}: x must be {dims}-D, got shape {tuple(x.shape)}")
    _check(x.dtype in INPUT_DTYPES, f"{op}: x.dtype={x.dtype} must be one of {INPUT_DTYPES}")
    _check(x.shape[-1] >= 1, f"{op}: x.shape={tuple(x.shape)} needs a last dim >= 1")
    _check(scale_format in _FORMATS, f"{op}: {scale_format=} must be one of {sorted(_FORMATS)}")


def _check_offsets_arg(token_offsets: torch.Tensor, op: str) -> int:
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
    g = _check_offsets_arg(token_offsets, "quant_colwise_grouped")
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
    g = _check_offsets_arg(token_offsets, "quant_colwise_grouped")
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


# -------------------------------------------------------------------------------------------- dense GEMM


def _check_gemm_operands(a, sfa, b, sfb, op: str) -> tuple[int, int, int]:
    _check(a.dim() == 2 and b.dim() == 2, f"{op}: a, b must be 2-D, got {tuple(a.shape)}, {tuple(b.shape)}")
    _check(a.dtype == _FP8 and b.dtype == _FP8, f"{op}: a.dtype={a.dtype}, b.dtype={b.dtype} must be {_FP8}")
    m, k = a.shape
    n = b.shape[0]
    _check(
        b.shape[1] == k and k >= 1 and n >= 1, f"{op}: a (M, K)={tuple(a.shape)}, b (N, K)={tuple(b.shape)}"
    )
    kb, nb = ceil_div(k, BLOCK), ceil_div(n, BLOCK)
    _check(
        tuple(sfa.shape) == (m, kb), f"{op}: sfa.shape={tuple(sfa.shape)} must be (M, ceil(K/128))={(m, kb)}"
    )
    _check(
        tuple(sfb.shape) == (nb, kb), f"{op}: sfb.shape={tuple(sfb.shape)} must be (ceil(N/128), ceil(K/128))"
    )
    return m, n, k


def _dense_operand(t: torch.Tensor, rows: int, k16: int) -> torch.Tensor:
    """t (R, K) e4m3 as the dense kernel's can_implement accepts it: (rows, k16) with K and the row stride
    multiples of 16 and a 16-byte aligned base. ``t`` itself when it already is, else a zero-padded copy
    (zero codes add nothing; ceil(k16 / 128) == ceil(K / 128), so the scales are unchanged)."""
    r, k = t.shape
    if (rows, k16) == (r, k) and t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.stride(0) >= k:
        if t.data_ptr() % 16 == 0:
            return t
    buf = t.new_zeros(rows, k16)
    buf[:r, :k].copy_(t)
    return buf


def _launch_gemm_nt(a, sfa, b, sfb, out: torch.Tensor, accumulate: bool) -> None:
    """out (M, N_out) bf16/fp32, N_out >= N a multiple of 16 bytes, (+)= a @ b.T on the kernel (the rows of
    b past N are zero padding, so out[:, N:] is 0 or unchanged)."""
    m, k = a.shape
    n_out, k16 = out.shape[1], _round_up(k, 16)
    a, b = _dense_operand(a, m, k16), _dense_operand(b, n_out, k16)
    sfa, sfb = _f32(sfa), _f32(sfb)
    dev = a.device
    with torch.cuda.device(dev):
        ws = _workspace(_dense_workspace_bytes(dev.index, out.dtype, m, n_out, k16, accumulate), dev)
        ext, stream, lda, ldb, ldd = _ext(), stream_handle(dev), a.stride(0), b.stride(0), out.stride(0)
        if out.dtype == torch.bfloat16:
            ext.sm90_fp8_gemm_nt_1x128_128x128_bf16(
                a.data_ptr(), lda, sfa.data_ptr(), b.data_ptr(), ldb, sfb.data_ptr(), out.data_ptr(), ldd,
                m, n_out, k16, ws.data_ptr(), ws.numel(), stream,
            )  # fmt: skip
        else:
            ext.sm90_fp8_gemm_nt_1x128_128x128_f32(
                a.data_ptr(), lda, sfa.data_ptr(), b.data_ptr(), ldb, sfb.data_ptr(), out.data_ptr(), ldd,
                accumulate, m, n_out, k16, ws.data_ptr(), ws.numel(), stream,
            )  # fmt: skip


def _rows_aligned(out: torch.Tensor) -> bool:
    """CUTLASS's can_implement wants N and the row stride of D multiples of 16 bytes (TMA)."""
    align = 16 // out.element_size()
    aligned = out.shape[1] % align == 0 and out.stride(0) % align == 0 and out.data_ptr() % 16 == 0
    return out.stride(-1) == 1 and aligned


@torch.library.custom_op("frugal_fp8::gemm_nt", mutates_args=(), device_types="cuda")
def gemm_nt(
    a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    m, n, _ = _check_gemm_operands(a, sfa, b, sfb, "gemm_nt")
    _check(out_dtype in _KERNEL_OUT, f"gemm_nt: out_dtype={out_dtype} must be one of {_KERNEL_OUT}")
    n_pad = _out_pad(n, out_dtype)
    out = torch.empty(m, n_pad, dtype=out_dtype, device=a.device)
    if m > 0:
        _launch_gemm_nt(a, sfa, b, sfb, out, False)
    return out if n_pad == n else out[:, :n].contiguous()


@gemm_nt.register_fake
def _(a, sfa, b, sfb, out_dtype):
    m, n, _ = _check_gemm_operands(a, sfa, b, sfb, "gemm_nt")
    _check(out_dtype in _KERNEL_OUT, f"gemm_nt: out_dtype={out_dtype} must be one of {_KERNEL_OUT}")
    return a.new_empty((m, n), dtype=out_dtype)


def _check_gemm_out(a, sfa, b, sfb, out, accumulate) -> tuple[int, int]:
    m, n, _ = _check_gemm_operands(a, sfa, b, sfb, "gemm_nt_out_")
    _check(tuple(out.shape) == (m, n), f"gemm_nt_out_: out.shape={tuple(out.shape)} must be {(m, n)}")
    _check(out.dtype in _KERNEL_OUT, f"gemm_nt_out_: out.dtype={out.dtype} must be one of {_KERNEL_OUT}")
    _check(not accumulate or out.dtype == torch.float32, "gemm_nt_out_: accumulate=True needs a float32 out")
    return m, n


@torch.library.custom_op("frugal_fp8::gemm_nt_out_", mutates_args=("out",), device_types="cuda")
def gemm_nt_out_(
    a: torch.Tensor,
    sfa: torch.Tensor,
    b: torch.Tensor,
    sfb: torch.Tensor,
    out: torch.Tensor,
    accumulate: bool,
) -> None:
    m, n = _check_gemm_out(a, sfa, b, sfb, out, accumulate)
    if m == 0:
        return
    if _rows_aligned(out):
        _launch_gemm_nt(a, sfa, b, sfb, out, accumulate)
        return
    tmp = torch.empty(m, _out_pad(n, out.dtype), dtype=out.dtype, device=out.device)
    if accumulate:
        tmp[:, :n].copy_(out)
    _launch_gemm_nt(a, sfa, b, sfb, tmp, accumulate)
    out.copy_(tmp[:, :n])


@gemm_nt_out_.register_fake
def _(a, sfa, b, sfb, out, accumulate):
    _check_gemm_out(a, sfa, b, sfb, out, accumulate)


@register_impl("gemm", "cuda")
def _gemm_cuda(
    a: FP8Tensor, b: FP8Tensor, *, out_dtype: torch.dtype, out: torch.Tensor | None, accumulate: bool
) -> torch.Tensor:
    if out is not None and out.dtype in _KERNEL_OUT:
        torch.ops.frugal_fp8.gemm_nt_out_(a.data, a.scale, b.data, b.scale, out, accumulate)
        return out
    kernel_dtype = out_dtype if out_dtype in _KERNEL_OUT else torch.float32  # fp16: fp32, then one rounding
    y = torch.ops.frugal_fp8.gemm_nt(a.data, a.scale, b.data, b.scale, kernel_dtype)
    if out is not None:
        return out.copy_(y)
    return y if kernel_dtype == out_dtype else y.to(out_dtype)


# ------------------------------------------------------------------------------------------ grouped GEMM


def _check_grouped(a, sfa, b, sfb, index, out_dtype, kind: str) -> tuple[int, int, int]:
    op = f"m_grouped_gemm_nt_{kind}"
    _check(
        b.dim() == 3 and b.dtype == _FP8, f"{op}: b must be (G, N, K) e4m3, got {b.dtype} {tuple(b.shape)}"
    )
    g, n, k = b.shape
    kb, nb = ceil_div(k, BLOCK), ceil_div(n, BLOCK)
    rows_dims, index_len = (2, g + 1) if kind == "contiguous" else (3, g)
    a_ok = a.dtype == _FP8 and a.dim() == rows_dims and a.shape[-1] == k
    layout = "(M_total, K)" if rows_dims == 2 else "(G, M_max, K)"
    _check(a_ok and (rows_dims == 2 or a.shape[0] == g),
           f"{op}: a must be e4m3 {layout} with K={k}, G={g}; got {a.dtype} {tuple(a.shape)}")  # fmt: skip
    _check(
        tuple(sfa.shape) == (*a.shape[:-1], kb),
        f"{op}: sfa.shape={tuple(sfa.shape)} must be {(*a.shape[:-1], kb)}",
    )
    _check(tuple(sfb.shape) == (g, nb, kb), f"{op}: sfb.shape={tuple(sfb.shape)} must be {(g, nb, kb)}")
    _check(
        tuple(index.shape) == (index_len,), f"{op}: index.shape={tuple(index.shape)} must be ({index_len},)"
    )
    _check(out_dtype in _KERNEL_OUT, f"{op}: out_dtype={out_dtype} must be one of {_KERNEL_OUT}")
    return g, n, k


def _run_grouped(kind: str, a, sfa, b, sfb, index: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    g, n, _ = _check_grouped(a, sfa, b, sfb, index, out_dtype, kind)
    n_pad = _out_pad(n, out_dtype)
    out = torch.empty(*a.shape[:-1], n_pad, dtype=out_dtype, device=a.device)
    if out.numel() > 0:
        a, b = _pad_k16(a), _pad_k16(b)
        sfa, sfb = _f32(sfa), _f32(sfb)
        index = index.to(device=a.device, dtype=torch.int32).contiguous()
        rows = a.shape[0] if kind == "contiguous" else a.shape[1]
        dev = a.device
        with torch.cuda.device(dev):
            ws = _workspace(_grouped_workspace_bytes(dev.index, "nt", g, out_dtype), dev)
            ext = _ext()
            run = ext.sm90_m_grouped_fp8_gemm_nt_contiguous if kind == "contiguous" else None
            run = run or ext.sm90_m_grouped_fp8_gemm_nt_masked
            run(
                a.data_ptr(), sfa.data_ptr(), b.data_ptr(), sfb.data_ptr(), out.data_ptr(), n_pad,
                DTYPE_CODES[out_dtype], index.data_ptr(), g, rows, n, a.shape[-1], ws.data_ptr(), ws.numel(),
                stream_handle(dev),
            )  # fmt: skip
    return out if n_pad == n else out[..., :n].contiguous()


@torch.library.custom_op("frugal_fp8::m_grouped_gemm_nt_contiguous", mutates_args=(), device_types="cuda")
def m_grouped_gemm_nt_contiguous(
    a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, m_offsets: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    return _run_grouped("contiguous", a, sfa, b, sfb, m_offsets, out_dtype)


@m_grouped_gemm_nt_contiguous.register_fake
def _(a, sfa, b, sfb, m_offsets, out_dtype):
    _, n, _ = _check_grouped(a, sfa, b, sfb, m_offsets, out_dtype, "contiguous")
    return a.new_empty((a.shape[0], n), dtype=out_dtype)


@torch.library.custom_op("frugal_fp8::m_grouped_gemm_nt_masked", mutates_args=(), device_types="cuda")
def m_grouped_gemm_nt_masked(
    a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, masked_m: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    return _run_grouped("masked", a, sfa, b, sfb, masked_m, out_dtype)


@m_grouped_gemm_nt_masked.register_fake
def _(a, sfa, b, sfb, masked_m, out_dtype):
    _, n, _ = _check_grouped(a, sfa, b, sfb, masked_m, out_dtype, "masked")
    return a.new_empty((a.shape[0], a.shape[1], n), dtype=out_dtype)


def _grouped_impl(kind: str):
    def impl(a: FP8Tensor, b: FP8Tensor, index: torch.Tensor, host_index: torch.Tensor, *, out_dtype, out):
        op = getattr(torch.ops.frugal_fp8, f"m_grouped_gemm_nt_{kind}")
        kernel_dtype = out_dtype if out_dtype in _KERNEL_OUT else torch.float32  # fp16: fp32, then cast
        y = op(a.data, a.scale, b.data, b.scale, index, kernel_dtype)  # the device copy of the index: no sync
        if out is not None:
            return out.copy_(y)
        return y if kernel_dtype == out_dtype else y.to(out_dtype)

    return impl


register_impl("grouped_gemm_contiguous", "cuda")(_grouped_impl("contiguous"))
register_impl("grouped_gemm_masked", "cuda")(_grouped_impl("masked"))


# ---------------------------------------------------------------------------------------- weight gradient


def _check_wgrad(dyt, s_dy, xt, s_x, out, op: str, groups: int | None = None) -> tuple[int, int]:
    _check(dyt.dim() == 2 and xt.dim() == 2, f"{op}: dyt (N, T) and xt (K, T) must be 2-D")
    _check(
        dyt.dtype == _FP8 and xt.dtype == _FP8,
        f"{op}: dyt.dtype={dyt.dtype}, xt.dtype={xt.dtype} must be e4m3",
    )
    n, k = dyt.shape[0], xt.shape[0]
    _check(
        s_dy.dim() == 2 and s_dy.shape[1] == n,
        f"{op}: s_dy.shape={tuple(s_dy.shape)} must be (blocks, N={n})",
    )
    _check(
        s_x.dim() == 2 and s_x.shape[1] == k, f"{op}: s_x.shape={tuple(s_x.shape)} must be (blocks, K={k})"
    )
    want = (n, k) if groups is None else (groups, n, k)
    _check(tuple(out.shape) == want and out.dtype == torch.float32,
           f"{op}: out must be float32 {want}, got {out.dtype} {tuple(out.shape)}")  # fmt: skip
    return n, k


def _check_dense_wgrad(dyt, s_dy, xt, s_x, out, tokens: int) -> None:
    _check_wgrad(dyt, s_dy, xt, s_x, out, "gemm_wgrad_out_")
    _check(
        dyt.shape[1] == tokens and xt.shape[1] == tokens, f"gemm_wgrad_out_: dyt, xt need T={tokens} columns"
    )
    nb = ceil_div(tokens, BLOCK)
    _check(s_dy.shape[0] == nb and s_x.shape[0] == nb, f"gemm_wgrad_out_: scales need ceil(T/128)={nb} rows")


def _launch_wgrad(dyt, ld_t, s_dy, xt, s_x, out, accumulate, offsets, blk, groups, tokens) -> None:
    n, k = dyt.shape[0], xt.shape[0]
    dev = dyt.device
    with torch.cuda.device(dev):
        ws = _workspace(_grouped_workspace_bytes(dev.index, "wgrad", groups, torch.float32), dev)
        _ext().sm90_fp8_gemm_wgrad_128x1(
            dyt.data_ptr(), s_dy.data_ptr(), xt.data_ptr(), s_x.data_ptr(), out.data_ptr(), out.stride(-2),
            accumulate, _ptr(offsets), _ptr(blk), groups, tokens, n, k, ld_t, ws.data_ptr(), ws.numel(),
            stream_handle(dev),
        )  # fmt: skip


def _wgrad_into(out: torch.Tensor, accumulate: bool, run) -> None:
    """``run(target)`` on ``out`` when its rows are TMA-aligned, else through an aligned fp32 copy."""
    if out.is_contiguous() and out.shape[-1] % 4 == 0 and out.data_ptr() % 16 == 0:
        run(out)
        return
    tmp = torch.empty(*out.shape[:-1], _round_up(out.shape[-1], 4), dtype=torch.float32, device=out.device)
    if accumulate:
        tmp[..., : out.shape[-1]].copy_(out)
    run(tmp)
    out.copy_(tmp[..., : out.shape[-1]])


@torch.library.custom_op("frugal_fp8::gemm_wgrad_out_", mutates_args=("out",), device_types="cuda")
def gemm_wgrad_out_(
    dyt: torch.Tensor, s_dy: torch.Tensor, xt: torch.Tensor, s_x: torch.Tensor, out: torch.Tensor,
    tokens: int, accumulate: bool,
) -> None:  # fmt: skip
    """out (N, K) fp32 (+)= dy.T @ x; dyt (N, T) and xt (K, T) are the token-contiguous 128x1 operands."""
    _check_dense_wgrad(dyt, s_dy, xt, s_x, out, tokens)
    if tokens == 0:
        if not accumulate:
            out.zero_()
        return
    dyt, ld_dy = _rows16(dyt)
    xt, ld_x = _rows16(xt)
    if ld_dy != ld_x:  # the kernel takes one token stride for both operands
        xt, ld_x = _rows16(
            torch.empty(xt.shape[0], ld_dy, dtype=_FP8, device=xt.device)[:, :tokens].copy_(xt)
        )
    s_dy, s_x = _f32(s_dy), _f32(s_x)
    _wgrad_into(
        out,
        accumulate,
        lambda o: _launch_wgrad(dyt, ld_dy, s_dy, xt, s_x, o, accumulate, None, None, 1, tokens),
    )


@gemm_wgrad_out_.register_fake
def _(dyt, s_dy, xt, s_x, out, tokens, accumulate):
    _check_dense_wgrad(dyt, s_dy, xt, s_x, out, tokens)


def _check_grouped_wgrad(dyt, s_dy, xt, s_x, token_offsets, block_offsets, out) -> int:
    op = "m_grouped_gemm_wgrad_out_"
    g = _check_offsets_arg(token_offsets, op)
    _check_wgrad(dyt, s_dy, xt, s_x, out, op, groups=g)
    _check(tuple(block_offsets.shape) == (g + 1,), f"{op}: block_offsets.shape must be ({g + 1},)")
    same = dyt.shape[1] == xt.shape[1] and dyt.shape[1] % BLOCK == 0 and s_dy.shape[0] == s_x.shape[0]
    _check(same, f"{op}: dyt, xt must be the (C, ld_t) buffers of quant_colwise_grouped (same ld_t, blocks)")
    return g


@torch.library.custom_op("frugal_fp8::m_grouped_gemm_wgrad_out_", mutates_args=("out",), device_types="cuda")
def m_grouped_gemm_wgrad_out_(
    dyt: torch.Tensor, s_dy: torch.Tensor, xt: torch.Tensor, s_x: torch.Tensor, token_offsets: torch.Tensor,
    block_offsets: torch.Tensor, out: torch.Tensor, accumulate: bool,
) -> None:  # fmt: skip
    """out[g] (N, K) fp32 (+)= dy_g.T @ x_g per expert, operands as quant_colwise_grouped writes them."""
    g = _check_grouped_wgrad(dyt, s_dy, xt, s_x, token_offsets, block_offsets, out)
    dyt, xt = dyt.contiguous(), xt.contiguous()
    offsets = token_offsets.to(dyt.device).contiguous()
    blk = block_offsets.to(device=dyt.device, dtype=torch.int32).contiguous()
    s_dy, s_x = _f32(s_dy), _f32(s_x)
    ld_t = dyt.stride(0)
    _wgrad_into(
        out, accumulate, lambda o: _launch_wgrad(dyt, ld_t, s_dy, xt, s_x, o, accumulate, offsets, blk, g, 0)
    )


@m_grouped_gemm_wgrad_out_.register_fake
def _(dyt, s_dy, xt, s_x, token_offsets, block_offsets, out, accumulate):
    _check_grouped_wgrad(dyt, s_dy, xt, s_x, token_offsets, block_offsets, out)


@register_impl("gemm_wgrad", "cuda")
def _gemm_wgrad_cuda(
    dy: FP8Tensor, x: FP8Tensor, *, out: torch.Tensor | None, accumulate: bool
) -> torch.Tensor:
    t, n = dy.shape
    if out is None:
        out = torch.empty(n, x.shape[1], dtype=torch.float32, device=dy.device)
    # dy.data / x.data from quantize_128x1_cuda are transposed views: .t() is then token-contiguous, no copy.
    torch.ops.frugal_fp8.gemm_wgrad_out_(dy.data.t(), dy.scale, x.data.t(), x.scale, out, t, accumulate)
    return out


def grouped_gemm_wgrad_contiguous(
    dy: torch.Tensor | GroupedTokenFP8,
    x: torch.Tensor | GroupedTokenFP8,
    m_offsets: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    scale_format: ScaleFormat | str = ScaleFormat.FP32,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-expert weight grads ``out[g] = dy[rows_g].T @ x[rows_g]``, rows_g = m_offsets[g]:m_offsets[g+1].

    dy: (T, N) and x: (T, K) rows of G experts in the contiguous layout: float tensors (quantized here per
    expert, 128x1 from each expert's first row) or GroupedTokenFP8 from :func:`quantize_128x1_grouped_cuda`.
    m_offsets: (G+1,) integer tensor. out: optional (G, N, K) float32; ``accumulate=True`` adds into it.
    backend: None (the CUDA kernels for CUDA tensors on Hopper with the extension, else the reference: one
    fp8.gemm_wgrad per expert), "cuda" (raises with the reason if unavailable) or "reference".
    Returns (G, N, K) float32.
    """
    fmt = ScaleFormat.parse(scale_format)
    g = m_offsets.numel() - 1
    _check(
        m_offsets.dim() == 1 and g >= 1, f"m_offsets.shape={tuple(m_offsets.shape)} must be (G+1,), G >= 1"
    )
    dev = dy.qt.device if isinstance(dy, GroupedTokenFP8) else dy.device
    n = dy.qt.shape[0] if isinstance(dy, GroupedTokenFP8) else dy.shape[1]
    k = x.qt.shape[0] if isinstance(x, GroupedTokenFP8) else x.shape[1]
    if out is None:
        _check(not accumulate, "accumulate=True needs out= (the float32 (G, N, K) weight grads)")
        out = torch.empty(g, n, k, dtype=torch.float32, device=dev)
    if not _cuda_ok(dev, backend):
        from fp8.gemm import gemm_wgrad

        bounds = m_offsets.to("cpu", torch.int64).tolist()
        for e in range(g):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                if not accumulate:
                    out[e].zero_()
                continue
            dye = dy.expert(e) if isinstance(dy, GroupedTokenFP8) else dy[lo:hi]
            xe = x.expert(e) if isinstance(x, GroupedTokenFP8) else x[lo:hi]
            gemm_wgrad(dye, xe, out=out[e], accumulate=accumulate, backend="reference")
        return out
    dyq = dy if isinstance(dy, GroupedTokenFP8) else quantize_128x1_grouped_cuda(dy, m_offsets, fmt, arg="dy")
    xq = x if isinstance(x, GroupedTokenFP8) else quantize_128x1_grouped_cuda(x, m_offsets, fmt, arg="x")
    torch.ops.frugal_fp8.m_grouped_gemm_wgrad_out_(
        dyq.qt, dyq.scale, xq.qt, xq.scale, dyq.token_offsets, dyq.block_offsets, out, accumulate
    )
    return out


def _cuda_ok(device: torch.device, backend: str | None) -> bool:
    """Whether the CUDA kernels run here; backend="cuda" raises with the reason when they cannot."""
    from fp8.backends import backend_report

    if backend not in (None, "auto", "cuda", "reference"):
        raise ValueError(f"backend={backend!r} must be None, 'auto', 'cuda' or 'reference' here")
    if backend == "reference":
        return False
    reason = backend_report(device)["cuda"]
    if backend == "cuda" and reason != "ok":
        raise RuntimeError(
            f"backend='cuda' was asked for grouped_gemm_wgrad_contiguous but is unavailable: {reason}"
        )
    return reason == "ok"
