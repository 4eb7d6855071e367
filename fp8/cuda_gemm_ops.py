"""The "cuda" backend of fp8's GEMMs: csrc/fp8's sm90 GEMM kernels as torch.library ops, wired into fp8's
backend choice (the quantizer ops live in fp8/cuda_quant_ops.py).

Ops (namespace ``frugal_fp8``; CUDA implementations through ``fp8._C`` with raw pointers and the current
stream; fake implementations, which also check the arguments, so they trace under torch.compile)::

    gemm_nt(a, sfa, b, sfb, out_dtype) -> (M, N)                 a (M, K) 1x128, b (N, K) 128x128
    gemm_nt_out_(a, sfa, b, sfb, out, accumulate)                 out (M, N) bf16/fp32, (+)= in place
    m_grouped_gemm_nt_contiguous(a, sfa, b, sfb, m_offsets, out_dtype) -> (M_total, N)   b (G, N, K)
    m_grouped_gemm_nt_masked(a, sfa, b, sfb, masked_m, out_dtype) -> (G, M_max, N)      a (G, M_max, K)
    gemm_wgrad_out_(dyt, s_dy, xt, s_x, out, tokens, accumulate)   out (N, K) fp32 (+)= dy.T @ x
    m_grouped_gemm_wgrad_out_(dyt, s_dy, xt, s_x, token_offsets, block_offsets, out, accumulate)
                                                                   out (G, N, K) fp32, one dy_g.T @ x_g each

The weight-grad operands are the 128x1 quantizations stored transposed, token-contiguous (``qt_col`` of
fp8/cuda_quant_ops.py): the weight-grad GEMM contracts over tokens and Hopper's FP8 tensor cores read both
operands K-major.

Kernel requirements the wrappers meet (by copies, so every shape works): e4m3 rows 16-byte aligned (else
copied into rows padded to a multiple of 16; grouped operands are zero-padded, which leaves ceil(K/128)
and the result unchanged), output rows 16-byte aligned (odd N computed into a padded buffer), scales
contiguous fp32. Half-precision outputs are computed in fp32 and cast. M, N, K tails need nothing: TMA
zero-fills loads and clips stores. Only sm_90 (Hopper) runs these kernels; fp8.backends checks that.
"""

from __future__ import annotations

import functools

import torch

from fp8._cuda_util import FP8_DTYPE as _FP8
from fp8._cuda_util import check as _check
from fp8._cuda_util import ext as _ext
from fp8._cuda_util import ptr as _ptr
from fp8._cuda_util import round_up as _round_up
from fp8._ext import DTYPE_CODES, stream_handle
from fp8.backends import register_impl
from fp8.cuda_quant_ops import (
    GroupedTokenFP8,
    quantize_128x1_grouped_cuda,
)
from fp8.cuda_quant_ops import (
    check_offsets_arg as _check_offsets_arg,
)
from fp8.quant import BLOCK, FP8Tensor, ScaleFormat, ceil_div

_KERNEL_OUT = (torch.bfloat16, torch.float32)  # output dtypes the GEMM kernels write directly


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
