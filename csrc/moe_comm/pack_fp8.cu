// Dispatch packing fused with 1x128 FP8 quantization: the permutation of the send buffer and the quantizer
// in one pass (the reference is fp8.quantize_1x128 followed by the byte gather of moe_comm's packing).
//
// For each packed row i and 128-wide tile t of source row index[i]:
//   amax  = max |x| over the tile (tail tile: only the valid columns)
//   scale = max(amax, AMAX_FLOOR) / 448          (pow2 / ue8m0: rounded up to a power of two)
//   q     = e4m3(clamp(x / scale, -448, 448))     (round to nearest even)
// written as packed[i, 128t : 128t + 128] (bytes) and packed[i, scale_offset + 4t] (fp32).
// One warp per (row, tile): lane l owns columns 128t + l + 32j, j = 0..3, so every load is coalesced.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "common/check.h"
#include "common/dtypes.h"
#include "fp8/quant.h"
#include "moe_comm/permute.h"

namespace frugal::moe {
namespace {

constexpr int kTile = 128;
constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ __forceinline__ float as_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float as_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float as_float<__half>(__half v) { return __half2float(v); }

__device__ __forceinline__ float pow2_ceil(float s) {
  unsigned bits = __float_as_uint(s);
  if (bits & 0x007fffffu) bits = (bits & 0x7f800000u) + 0x00800000u;
  return __uint_as_float(bits & 0x7f800000u);
}

template <typename T>
__global__ void pack_rows_fp8_kernel(const T* __restrict__ x, int64_t x_stride, const int64_t* __restrict__ index,
                                     int64_t n, int64_t H, uint8_t* __restrict__ packed, int64_t row_bytes,
                                     int64_t scale_offset, int scale_format) {
  const int lane = threadIdx.x % 32;
  const int64_t tiles = (H + kTile - 1) / kTile;
  const int64_t job = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (job >= n * tiles) return;
  const int64_t i = job / tiles;
  const int64_t k0 = (job % tiles) * kTile;
  const T* src = x + index[i] * x_stride;
  float v[4];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + lane + 32 * j;
    v[j] = k < H ? as_float(src[k]) : 0.f;
    amax = fmaxf(amax, fabsf(v[j]));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  float scale = fmaxf(amax, frugal::fp8::kAmaxFloor) / frugal::fp8::kE4M3Max;  // true division, as the reference
  if (scale_format != static_cast<int>(ScaleFormat::kFP32)) scale = pow2_ceil(scale);
  uint8_t* row = packed + i * row_bytes;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + lane + 32 * j;
    if (k < H) {
      const float r = fminf(fmaxf(v[j] / scale, -frugal::fp8::kE4M3Max), frugal::fp8::kE4M3Max);
      row[k] = __nv_fp8_e4m3(r).__x;  // round to nearest even
    }
  }
  if (lane == 0) reinterpret_cast<float*>(row + scale_offset)[k0 / kTile] = scale;
}

}  // namespace

void pack_rows_fp8_1x128(std::uintptr_t x, int x_dtype, int64_t x_stride, std::uintptr_t index, int64_t n,
                         int64_t H, std::uintptr_t packed, int64_t packed_row_bytes, int64_t scale_offset,
                         int scale_format, std::uintptr_t stream) {
  FRUGAL_CHECK(n >= 0 && H >= 1, "pack_rows_fp8_1x128: n=" << n << ", H=" << H);
  FRUGAL_CHECK(x_stride >= H, "pack_rows_fp8_1x128: x_stride=" << x_stride << " must be >= H=" << H);
  FRUGAL_CHECK(scale_offset >= H && scale_offset % 4 == 0 && packed_row_bytes % 4 == 0 &&
                   scale_offset + 4 * ceil_div(H, kTile) <= packed_row_bytes,
               "pack_rows_fp8_1x128: scale_offset=" << scale_offset << " and packed_row_bytes=" << packed_row_bytes
                                                    << " must be multiples of 4 holding H=" << H
                                                    << " bytes then the scales");
  FRUGAL_CHECK(packed % 4 == 0, "pack_rows_fp8_1x128: the packed buffer must be 4-byte aligned");
  FRUGAL_CHECK(scale_format >= 0 && scale_format <= 2, "pack_rows_fp8_1x128: scale_format=" << scale_format);
  if (n == 0) return;
  const int64_t jobs = n * ceil_div(H, kTile);
  const dim3 grid(static_cast<unsigned>(ceil_div(jobs, kWarpsPerBlock)));
  const dim3 block(32 * kWarpsPerBlock);
  auto* out = as_ptr<uint8_t>(packed);
  const auto* idx = as_ptr<const int64_t>(index);
  const cudaStream_t s = as_stream(stream);
  switch (static_cast<DType>(x_dtype)) {
    case DType::kFloat32:
      pack_rows_fp8_kernel<float><<<grid, block, 0, s>>>(as_ptr<const float>(x), x_stride, idx, n, H, out,
                                                         packed_row_bytes, scale_offset, scale_format);
      break;
    case DType::kBFloat16:
      pack_rows_fp8_kernel<__nv_bfloat16><<<grid, block, 0, s>>>(
          as_ptr<const __nv_bfloat16>(x), x_stride, idx, n, H, out, packed_row_bytes, scale_offset, scale_format);
      break;
    case DType::kFloat16:
      pack_rows_fp8_kernel<__half><<<grid, block, 0, s>>>(as_ptr<const __half>(x), x_stride, idx, n, H, out,
                                                          packed_row_bytes, scale_offset, scale_format);
      break;
    default:
      FRUGAL_CHECK(false, "pack_rows_fp8_1x128: x_dtype code " << x_dtype << " is not fp32/bf16/fp16");
  }
  FRUGAL_CHECK_LAUNCH();
}

}  // namespace frugal::moe
