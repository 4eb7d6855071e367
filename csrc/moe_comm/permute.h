// Expert-parallel permute / unpermute kernels (host side). Pointers and the stream are integers from Python
// (moe_comm/cuda_ops.py); the kernels never link libtorch. The references are moe_comm/cuda_ops.py's CPU
// implementations, which the dispatcher also uses on the CPU.
#pragma once

#include <cstdint>

namespace frugal::moe {

// dst[i, :] = src[index[i], :] for i < n, rows of row_bytes bytes; index[i] < 0 writes a zero row.
// Row strides in bytes. 16-byte vector copies when pointers, strides and row_bytes allow it.
void gather_rows(std::uintptr_t src, int64_t src_stride_bytes, std::uintptr_t index, int64_t n, int64_t row_bytes,
                 std::uintptr_t dst, int64_t dst_stride_bytes, std::uintptr_t stream);

// out[t, h] = cast(sum_{k=0..K-1} w[t,k] * float(rows[index[t,k], h])), the sum in FP32 from 0 in k order, each
// step a rounded multiply then a rounded add (no FMA: bit-identical to the CPU reference). index < 0: the row
// is zero. weights == 0 (null): w = 1 and no multiply. rows: (N, H) of rows_dtype with row stride (elements);
// index (T, K) int64; weights (T, K) fp32; out (T, H) contiguous of out_dtype (common/dtypes.h codes).
void weighted_sum_rows(std::uintptr_t rows, int rows_dtype, int64_t rows_stride, std::uintptr_t index,
                       std::uintptr_t weights, int64_t T, int64_t K, int64_t H, std::uintptr_t out, int out_dtype,
                       std::uintptr_t stream);

// Permute fused with 1x128 E4M3 quantization into packed dispatch rows: for i < n, row x[index[i]] (H values of
// x_dtype, row stride x_stride elements) is quantized per 128-wide tile (scale = max(amax, AMAX_FLOOR) / 448,
// pow2/ue8m0 rounded up) and written to packed + i * packed_row_bytes: H e4m3 bytes at offset 0 and
// ceil(H/128) fp32 scales at scale_offset (a multiple of 4). Bit-identical to fp8.quantize_1x128.
void pack_rows_fp8_1x128(std::uintptr_t x, int x_dtype, int64_t x_stride, std::uintptr_t index, int64_t n,
                         int64_t H, std::uintptr_t packed, int64_t packed_row_bytes, int64_t scale_offset,
                         int scale_format, std::uintptr_t stream);

}  // namespace frugal::moe
