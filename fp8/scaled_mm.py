"""The "torch" backend: torch's blockwise ``F.scaled_mm`` (cuBLASLt, Hopper, CUDA >= 12.9) for fp8.gemm.

torch 2.13's ``F.scaled_mm(mat_a, mat_b, scale_a, ScalingType.BlockWise1x128, scale_b,
ScalingType.BlockWise128x128, output_dtype=...)`` computes ``mat_a @ mat_b`` with, per its shape checks
(torch/_meta_registrations.py, ``_check_scaled_mm_sizes_v2``):

* mat_a (M, K) e4m3 row-major; mat_b (K, N) e4m3 column-major (our ``b.data.t()``); K % 16 == 0;
* scale_a float32 of shape (M, K // 128) with strides (1, M): M-major ("column-major") 1x128 scales;
* scale_b float32 of shape (L4, N // 128) with strides (1, L4), ``L4 = round_up(K / 128, 4)``: our
  (ceil(N/128), ceil(K/128)) block scales, padded along K blocks to a multiple of 4 and K-major.

Those checks use ``K // 128`` and ``N // 128``, so this wrapper zero-pads K and N to multiples of 128
(zero FP8 data contributes nothing whatever the padded scales are) and crops the result. M is not
padded. Not verified on a GPU in this repository yet: bench/bench_fp8.py times it when one is present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp8.backends import register_impl
from fp8.gemm import write_out
from fp8.quant import BLOCK, FP8Tensor, ceil_div


def _pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    if t.shape[1] == cols:
        return t
    padded = torch.zeros(t.shape[0], cols, dtype=t.dtype, device=t.device)
    padded[:, : t.shape[1]] = t
    return padded


@register_impl("gemm", "torch")
def _gemm_scaled_mm(
    a: FP8Tensor, b: FP8Tensor, *, out_dtype: torch.dtype, out: torch.Tensor | None, accumulate: bool
) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    kb, nb = ceil_div(k, BLOCK), ceil_div(n, BLOCK)
    kp, np_ = kb * BLOCK, nb * BLOCK
    a_data = _pad_cols(a.data, kp)
    b_data = _pad_cols(b.data, kp)
    if np_ != n:
        b_data = torch.cat([b_data, b_data.new_zeros(np_ - n, kp)])
    l4 = ceil_div(kb, 4) * 4
    scale_a = a.scale.t().contiguous().t()  # (M, kb), strides (1, M)
    scale_b = _pad_cols(b.scale, l4).t()  # (l4, nb), strides (1, l4)
    mm_dtype = torch.float32 if (accumulate or out_dtype == torch.float32) else out_dtype
    result = F.scaled_mm(
        a_data,
        b_data.t(),
        scale_a,
        F.ScalingType.BlockWise1x128,
        scale_b,
        F.ScalingType.BlockWise128x128,
        output_dtype=mm_dtype,
    )
    if np_ != n:
        result = result[:, :n].contiguous()
    if out is None:
        return result if result.dtype == out_dtype else result.to(out_dtype)
    return write_out(result, out_dtype, out, accumulate)
