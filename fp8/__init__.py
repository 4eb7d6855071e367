"""Fine-grained FP8 (E4M3) quantization, blockwise-scaled GEMMs and an FP8 Linear.

    xq = fp8.quantize_1x128(x)                 # FP8Tensor: data (M, K) e4m3, scale (M, ceil(K/128)) fp32
    y = fp8.gemm(x, w)                          # x @ w.T, x 1x128 / w 128x128, FP32 accumulation -> bf16
    model = fp8.convert_to_fp8(model)           # nn.Linear -> FP8Linear (head, embeddings, routers kept)

Numerics (the reference is the documentation): fp8/quant.py (scales), fp8/gemm.py (promotion of every
128-wide K slice into FP32), fp8/grouped.py (experts), fp8/linear.py (fprop/dgrad/wgrad). Backends per
call: "cuda" (csrc kernels) > "torch" (blockwise F.scaled_mm on Hopper) > "reference" (any device), see
fp8/backends.py. ``HAS_CUDA_EXT`` tells whether ``fp8._C`` was built and imports; it is evaluated on first
access (the extension is imported lazily).
"""

from __future__ import annotations

from fp8 import scaled_mm as _scaled_mm  # noqa: F401  (registers the "torch" backend's gemm)
from fp8._ext import has_extension
from fp8.backends import backend_report, register_impl, select_backend
from fp8.gemm import gemm, gemm_wgrad
from fp8.grouped import grouped_gemm_contiguous, grouped_gemm_masked
from fp8.linear import FP8Linear, convert_to_fp8, fp8_linear, is_high_precision_linear
from fp8.metrics import calc_diff
from fp8.quant import (
    AMAX_FLOOR,
    E4M3_MAX,
    FP8Tensor,
    ScaleFormat,
    pow2_ceil,
    quantize_1x128,
    quantize_128x1,
    quantize_128x128,
    quantize_blockwise,
    scale_from_ue8m0,
)

__all__ = [
    "AMAX_FLOOR",
    "E4M3_MAX",
    "FP8Linear",
    "FP8Tensor",
    "ScaleFormat",
    "backend_report",
    "calc_diff",
    "convert_to_fp8",
    "fp8_linear",
    "gemm",
    "gemm_wgrad",
    "grouped_gemm_contiguous",
    "grouped_gemm_masked",
    "is_high_precision_linear",
    "pow2_ceil",
    "quantize_128x1",
    "quantize_128x128",
    "quantize_1x128",
    "quantize_blockwise",
    "register_impl",
    "scale_from_ue8m0",
    "select_backend",
]


def __getattr__(name: str):
    if name == "HAS_CUDA_EXT":
        return has_extension("fp8")
    raise AttributeError(f"module 'fp8' has no attribute {name!r}")
