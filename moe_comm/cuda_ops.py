"""torch.library ops over the permute/unpermute kernels of csrc/moe_comm (moe_comm._C).

    frugal_moe::gather_rows(Tensor src, Tensor index) -> Tensor
        out[i] = src[index[i]] (src's rows: its trailing dims, contiguous); index < 0 gives a zero row.
    frugal_moe::weighted_sum_rows(Tensor rows, Tensor index, Tensor? weights, ScalarType out_dtype) -> Tensor
        out[t] = sum over k ascending of weights[t, k] * float(rows[index[t, k]]), in FP32 from 0, each
        product and each sum rounded separately (the combine's fixed order); index < 0: a zero row.
    frugal_moe::pack_rows_fp8_1x128(Tensor x, Tensor index, int row_bytes, int scale_offset, int fmt)
        (n, row_bytes) uint8: row i = [e4m3 data of quantize_1x128(x[index[i]]) | zeros | fp32 scales at
        scale_offset | zeros] -- the dispatch's FP8 packing, fused with the quantization.

Each op has a CPU implementation (the reference, also the CPU path of the dispatcher), a CUDA
implementation (the kernel through moe_comm._C: raw pointers and the current stream, no libtorch), and a
fake implementation (shapes only, for torch.compile). The dispatcher calls them on CUDA tensors when the
extension is built (``moe_comm.HAS_CUDA_EXT``); checked against the CPU reference only where a GPU is.
"""

from __future__ import annotations

import torch

from fp8._ext import DTYPE_CODES, has_extension, require_extension, stream_handle

__all__ = ["gather_rows", "pack_rows_fp8_1x128", "use_kernels", "weighted_sum_rows"]

_TILE = 128


def use_kernels(t: torch.Tensor) -> bool:
    """Whether the CUDA kernels serve this tensor (on CUDA, extension built)."""
    return t.is_cuda and has_extension("moe_comm")


def _check_index(index: torch.Tensor, name: str, dims: int) -> None:
    if index.dtype != torch.int64 or index.dim() != dims:
        raise ValueError(
            f"{name}: index must be a {dims}-D int64 tensor, got {index.dtype} {tuple(index.shape)}"
        )


def _rows_contiguous(t: torch.Tensor) -> bool:
    return t.dim() >= 1 and (t.numel() == 0 or t[0].is_contiguous())


# ------------------------------------------------------------------------------------------------ gather
@torch.library.custom_op("frugal_moe::gather_rows", mutates_args=(), device_types="cpu")
def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _check_index(index, "gather_rows", 1)
    out = src.new_zeros((index.numel(), *src.shape[1:]))
    valid = index >= 0
    out[valid] = src.index_select(0, index[valid])
    return out


@gather_rows.register_kernel("cuda")
def _gather_rows_cuda(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _check_index(index, "gather_rows", 1)
    if not _rows_contiguous(src):
        src = src.contiguous()
    out = src.new_empty((index.numel(), *src.shape[1:]))
    row_bytes = out[0].numel() * out.element_size() if out.numel() else 0
    if index.numel() and row_bytes:
        require_extension("moe_comm").gather_rows(
            src.data_ptr(), src.stride(0) * src.element_size(), index.contiguous().data_ptr(), index.numel(),
            row_bytes, out.data_ptr(), row_bytes, stream_handle(src.device),
        )  # fmt: skip
    return out


@gather_rows.register_fake
def _gather_rows_fake(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return src.new_empty((index.shape[0], *src.shape[1:]))


# -------------------------------------------------------------------------------------- weighted sum
@torch.library.custom_op("frugal_moe::weighted_sum_rows", mutates_args=(), device_types="cpu")
def weighted_sum_rows(
    rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    _check_index(index, "weighted_sum_rows", 2)
    T, K = index.shape
    acc = torch.zeros(T, *rows.shape[1:], dtype=torch.float32, device=rows.device)
    for k in range(K):
        j = index[:, k]
        term = torch.zeros_like(acc)
        valid = j >= 0
        term[valid] = rows.index_select(0, j[valid]).float()
        if weights is not None:
            term = term * weights[:, k : k + 1]
        acc = acc + term
    return acc.to(out_dtype)


@weighted_sum_rows.register_kernel("cuda")
def _weighted_sum_rows_cuda(
    rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    _check_index(index, "weighted_sum_rows", 2)
    if rows.dim() != 2 or rows.stride(1) != 1:
        rows = rows.reshape(rows.shape[0], -1).contiguous()
    T, K = index.shape
    H = rows.shape[1]
    out = torch.empty(T, H, dtype=out_dtype, device=rows.device)
    w = weights.float().contiguous() if weights is not None else None
    if T and H:
        require_extension("moe_comm").weighted_sum_rows(
            rows.data_ptr(), DTYPE_CODES[rows.dtype], rows.stride(0), index.contiguous().data_ptr(),
            0 if w is None else w.data_ptr(), T, K, H, out.data_ptr(), DTYPE_CODES[out_dtype],
            stream_handle(rows.device),
        )  # fmt: skip
    return out


@weighted_sum_rows.register_fake
def _weighted_sum_rows_fake(rows, index, weights, out_dtype):
    return rows.new_empty((index.shape[0], *rows.shape[1:]), dtype=out_dtype)


# ------------------------------------------------------------------------------------- FP8 packing
@torch.library.custom_op("frugal_moe::pack_rows_fp8_1x128", mutates_args=(), device_types="cpu")
def pack_rows_fp8_1x128(
    x: torch.Tensor, index: torch.Tensor, row_bytes: int, scale_offset: int, scale_format: int
) -> torch.Tensor:
    from fp8 import ScaleFormat, quantize_1x128

    _check_pack(x, index, row_bytes, scale_offset)
    H = x.shape[1]
    fmt = next(f for f in ScaleFormat if f.code == scale_format)
    q = quantize_1x128(x.index_select(0, index), scale_format=fmt, check_finite=False)
    out = torch.zeros(index.numel(), row_bytes, dtype=torch.uint8, device=x.device)
    out[:, :H] = q.data.view(torch.uint8)
    out[:, scale_offset : scale_offset + 4 * q.scale.shape[1]] = q.scale.contiguous().view(torch.uint8)
    return out


def _check_pack(x: torch.Tensor, index: torch.Tensor, row_bytes: int, scale_offset: int) -> None:
    _check_index(index, "pack_rows_fp8_1x128", 1)
    if x.dim() != 2:
        raise ValueError(f"pack_rows_fp8_1x128: x must be 2-D (T, H), got {tuple(x.shape)}")
    H = x.shape[1]
    need = scale_offset + 4 * ((H + _TILE - 1) // _TILE)
    if scale_offset < H or scale_offset % 4 or row_bytes % 4 or row_bytes < need:
        raise ValueError(
            f"pack_rows_fp8_1x128: {scale_offset=} and {row_bytes=} must be multiples of 4 with "
            f"scale_offset >= H={H} and row_bytes >= {need}"
        )


@pack_rows_fp8_1x128.register_kernel("cuda")
def _pack_rows_fp8_cuda(x, index, row_bytes, scale_offset, scale_format):
    _check_pack(x, index, row_bytes, scale_offset)
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.zeros(index.numel(), row_bytes, dtype=torch.uint8, device=x.device)
    if index.numel():
        require_extension("moe_comm").pack_rows_fp8_1x128(
            x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), index.contiguous().data_ptr(), index.numel(),
            x.shape[1], out.data_ptr(), row_bytes, scale_offset, scale_format, stream_handle(x.device),
        )  # fmt: skip
    return out


@pack_rows_fp8_1x128.register_fake
def _pack_rows_fp8_fake(x, index, row_bytes, scale_offset, scale_format):
    return x.new_empty((index.shape[0], row_bytes), dtype=torch.uint8)
