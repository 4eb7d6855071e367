// FP8 E4M3 quantization entry points (host side). Pointers and the stream are passed as integers from
// Python (fp8/_ext.py); fp8/quant.py is the reference these kernels match bit for bit on finite input:
//
//   amax  = max |x| over the block (tail blocks: only valid elements)
//   scale = max(amax, kAmaxFloor) / 448            (kPow2 / kUE8M0: rounded up to a power of two)
//   q     = e4m3(clamp(x / scale, -448, 448))      (true division, round to nearest even)
//
// Non-finite input: the kernels set *nonfinite_flag (when given) and their output is unspecified; the
// Python wrappers raise on the flag, as the reference does.
#pragma once

#include <cstdint>

namespace frugal::fp8 {

constexpr float kE4M3Max = 448.0f;
// Tiles whose amax is below this get scale AMAX_FLOOR/448: finite scales and exact zeros for all-zero tiles.
// Must equal fp8/quant.py AMAX_FLOOR.
constexpr float kAmaxFloor = 1e-12f;

// Per-token 1x128: x (M, K) with row stride x_row_stride (elements), dtype code x_dtype (common/dtypes.h);
// q (M, K) e4m3 contiguous; scales (M, ceil(K/128)) fp32 contiguous. (Signature kept for fp8/cuda_ops.py.)
void quant_per_token_1x128(std::uintptr_t x, int x_dtype, std::uintptr_t q, std::uintptr_t scales, int64_t M,
                           int64_t K, int64_t x_row_stride, int scale_format, std::uintptr_t stream);

// One pass over x (T tokens, C channels; row stride x_row_stride) writing either or both of
//   rowwise   q_row (T, C) e4m3 + s_row (T, ceil(C/128)) fp32      1x128, the GEMM's A operand
//   colwise   qt_col (C, ld_t) e4m3 TRANSPOSED + s_col (n_blocks, C) fp32
//             one scale per 128 tokens per channel (128x1), stored token-contiguous for the weight-grad
//             GEMM, whose contraction runs over tokens.
// Token blocks: dense (token_offsets == 0): block b holds tokens [128b, 128b+128), n_blocks = ceil(T/128).
// Grouped (token_offsets (G+1,) int32 and block_offsets (G+1,) int32 on the device, see
// token_block_offsets): group g's tokens [off[g], off[g+1]) fill blocks [blk[g], blk[g+1]), padded with
// zeros to whole blocks (an empty group still owns one all-zero block), so a block never mixes experts.
// n_blocks is then the capacity floor(T/128) + G; blocks past blk[G] are left untouched.
// ld_t >= 128 * n_blocks, a multiple of 16. Pass 0 for the outputs that are not wanted.
void quant_rowwise_colwise_128(std::uintptr_t x, int x_dtype, int64_t T, int64_t C, int64_t x_row_stride,
                               std::uintptr_t q_row, std::uintptr_t s_row, std::uintptr_t qt_col,
                               std::uintptr_t s_col, int64_t ld_t, int64_t n_blocks, std::uintptr_t token_offsets,
                               std::uintptr_t block_offsets, int64_t G, int scale_format,
                               std::uintptr_t nonfinite_flag, std::uintptr_t stream);

// Per-block 128x128 (weights): w (B, N, K) contiguous -> q (B, N, K) e4m3, scales (B, ceil(N/128), ceil(K/128)).
void quant_per_block_128x128(std::uintptr_t w, int w_dtype, int64_t B, int64_t N, int64_t K, std::uintptr_t q,
                             std::uintptr_t scales, int scale_format, std::uintptr_t nonfinite_flag,
                             std::uintptr_t stream);

// blk[g] = sum_{h<g} max(1, ceil((off[h+1] - off[h]) / 128)) for g = 0..G, from token offsets (G+1,)
// int32 on the device (a single-block scan; no host sync). Offsets are clamped to be non-decreasing.
void token_block_offsets(std::uintptr_t token_offsets, int64_t G, std::uintptr_t block_offsets,
                         std::uintptr_t stream);

}  // namespace frugal::fp8
