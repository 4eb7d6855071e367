"""torch.library registration of the FP8 quantization kernel (csrc/fp8/quant_per_token_1x128.cu).

``frugal_fp8::quant_per_token_1x128(Tensor x, int scale_format) -> (Tensor q, Tensor scales)``

    x:      (M, K) float32 / bfloat16 / float16, last dim contiguous (row stride may be larger than K)
    q:      (M, K) float8_e4m3fn, contiguous
    scales: (M, ceil(K/128)) float32, contiguous
    scale_format: ScaleFormat.code (0 fp32, 1 pow2, 2 ue8m0)

Implementations: CPU = the reference (fp8.quant.quantize_blockwise with 1x128 blocks), CUDA = the kernel
through fp8._C (raw pointers + the current stream; the extension never links libtorch), and a fake
implementation (shapes only) so the op traces under torch.compile. The op does not check finiteness;
:func:`quant_per_token_1x128_cuda` does that on request before launching.
"""

from __future__ import annotations

import torch

from fp8._ext import DTYPE_CODES, require_extension, stream_handle
from fp8.quant import BLOCK, INPUT_DTYPES, FP8Tensor, ScaleFormat, ceil_div, quantize_blockwise

_FORMATS = {f.code: f for f in ScaleFormat}


def _check(x: torch.Tensor, scale_format: int) -> None:
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
    _check(x, scale_format)
    q, scale = quantize_blockwise(x, 1, BLOCK, scale_format=_FORMATS[scale_format], check_finite=False)
    return q, scale


@quant_per_token_1x128.register_kernel("cuda")
def _quant_per_token_1x128_cuda(x: torch.Tensor, scale_format: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, scale_format)
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
