// FP8 quantization entry points (host side). Pointers and the stream are passed as integers from Python.
#pragma once

#include <cstdint>

namespace frugal::fp8 {

constexpr float kE4M3Max = 448.0f;
// Tiles whose amax is below this get scale AMAX_FLOOR/448: finite scales and exact zeros for all-zero tiles.
// Must equal fp8/quant.py AMAX_FLOOR.
constexpr float kAmaxFloor = 1e-12f;

// x (M, K) with row stride x_row_stride (elements), dtype code x_dtype (common/dtypes.h);
// q (M, K) e4m3 contiguous; scales (M, ceil(K/128)) fp32 contiguous.
void quant_per_token_1x128(std::uintptr_t x, int x_dtype, std::uintptr_t q, std::uintptr_t scales, int64_t M,
                           int64_t K, int64_t x_row_stride, int scale_format, std::uintptr_t stream);

}  // namespace frugal::fp8
