// Per-token 1x128 FP8 E4M3 quantization (activations; fp8/quant.py quantize_1x128 is the reference).
//
// For every row m and every 128-wide tile t along K:
//   amax  = max |x[m, 128t : 128t+128]|          (tail tile: only the valid columns)
//   scale = max(amax, AMAX_FLOOR) / 448          (kPow2 / kUE8M0: rounded up to a power of two)
//   q     = sat_e4m3(x / scale)                   (round to nearest even, saturating to +-448)
// Outputs: q (M, K) row-major e4m3, scales (M, ceil(K/128)) row-major fp32.
//
// One warp per tile: lane l owns columns 128t + l + 32j, j = 0..3, so every load is coalesced.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "common/check.h"
#include "common/dtypes.h"
#include "fp8/quant.h"

namespace frugal::fp8 {
namespace {

constexpr int kTile = 128;
constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

// Smallest power of two >= s, for a positive normal float: bump the exponent when any mantissa bit is set.
__device__ __forceinline__ float pow2_ceil(float s) {
  unsigned bits = __float_as_uint(s);
  if (bits & 0x007fffffu) bits = (bits & 0x7f800000u) + 0x00800000u;
  return __uint_as_float(bits & 0x7f800000u);
}

template <typename T>
__global__ void quant_per_token_1x128_kernel(const T* __restrict__ x, __nv_fp8_e4m3* __restrict__ q,
                                             float* __restrict__ scales, int64_t M, int64_t K,
                                             int64_t x_row_stride, int scale_format) {
  const int lane = threadIdx.x % 32;
  const int64_t num_tiles = (K + kTile - 1) / kTile;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (tile >= M * num_tiles) return;
  const int64_t m = tile / num_tiles;
  const int64_t k0 = (tile % num_tiles) * kTile;

  float v[4];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + lane + 32 * j;
    v[j] = k < K ? to_float(x[m * x_row_stride + k]) : 0.f;
    amax = fmaxf(amax, fabsf(v[j]));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));

  float scale = fmaxf(amax, kAmaxFloor) / kE4M3Max;
  if (scale_format != static_cast<int>(ScaleFormat::kFP32)) scale = pow2_ceil(scale);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + lane + 32 * j;
    if (k < K) {
      const float r = fminf(fmaxf(v[j] / scale, -kE4M3Max), kE4M3Max);
      q[m * K + k] = __nv_fp8_e4m3(r);  // round to nearest even
    }
  }
  if (lane == 0) scales[m * num_tiles + k0 / kTile] = scale;
}

}  // namespace

void quant_per_token_1x128(std::uintptr_t x, int x_dtype, std::uintptr_t q, std::uintptr_t scales, int64_t M,
                           int64_t K, int64_t x_row_stride, int scale_format, std::uintptr_t stream) {
  FRUGAL_CHECK(M >= 0 && K > 0, "quant_per_token_1x128: M=" << M << ", K=" << K << " must be M >= 0, K > 0");
  FRUGAL_CHECK(x_row_stride >= K, "quant_per_token_1x128: x_row_stride=" << x_row_stride << " must be >= K=" << K);
  FRUGAL_CHECK(scale_format >= 0 && scale_format <= 2, "quant_per_token_1x128: scale_format=" << scale_format);
  if (M == 0) return;
  const int64_t tiles = M * ceil_div(K, kTile);
  const dim3 grid(static_cast<unsigned>(ceil_div(tiles, kWarpsPerBlock)));
  const dim3 block(32 * kWarpsPerBlock);
  auto* qp = as_ptr<__nv_fp8_e4m3>(q);
  auto* sp = as_ptr<float>(scales);
  switch (static_cast<DType>(x_dtype)) {
    case DType::kFloat32:
      quant_per_token_1x128_kernel<float><<<grid, block, 0, as_stream(stream)>>>(
          as_ptr<const float>(x), qp, sp, M, K, x_row_stride, scale_format);
      break;
    case DType::kBFloat16:
      quant_per_token_1x128_kernel<__nv_bfloat16><<<grid, block, 0, as_stream(stream)>>>(
          as_ptr<const __nv_bfloat16>(x), qp, sp, M, K, x_row_stride, scale_format);
      break;
    case DType::kFloat16:
      quant_per_token_1x128_kernel<__half><<<grid, block, 0, as_stream(stream)>>>(
          as_ptr<const __half>(x), qp, sp, M, K, x_row_stride, scale_format);
      break;
    default:
      FRUGAL_CHECK(false, "quant_per_token_1x128: x_dtype code " << x_dtype << " is not fp32/bf16/fp16");
  }
  FRUGAL_CHECK_LAUNCH();
}

}  // namespace frugal::fp8
