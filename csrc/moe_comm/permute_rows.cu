// Row gather (the permutation of dispatch and combine) and the combine's fused FP32 weighted sum.
//
// gather_rows: one block per destination row; 16-byte loads/stores when everything is 16-aligned, else bytes.
// weighted_sum_rows: one thread per output element (t, h), looping over k in order; __fmul_rn / __fadd_rn keep
// the multiply and the add separately rounded, exactly like the CPU reference (acc = acc + w * float(y)).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/check.h"
#include "common/dtypes.h"
#include "moe_comm/permute.h"

namespace frugal::moe {
namespace {

constexpr int kThreads = 256;

__global__ void gather_rows_vec16_kernel(const char* __restrict__ src, int64_t src_stride,
                                         const int64_t* __restrict__ index, char* __restrict__ dst,
                                         int64_t dst_stride, int64_t row_bytes) {
  const int64_t i = blockIdx.x;
  const int64_t j = index[i];
  uint4* d = reinterpret_cast<uint4*>(dst + i * dst_stride);
  const int64_t n16 = row_bytes / 16;
  if (j < 0) {
    for (int64_t c = threadIdx.x; c < n16; c += blockDim.x) d[c] = make_uint4(0, 0, 0, 0);
    return;
  }
  const uint4* s = reinterpret_cast<const uint4*>(src + j * src_stride);
  for (int64_t c = threadIdx.x; c < n16; c += blockDim.x) d[c] = s[c];
}

__global__ void gather_rows_bytes_kernel(const char* __restrict__ src, int64_t src_stride,
                                         const int64_t* __restrict__ index, char* __restrict__ dst,
                                         int64_t dst_stride, int64_t row_bytes) {
  const int64_t i = blockIdx.x;
  const int64_t j = index[i];
  char* d = dst + i * dst_stride;
  for (int64_t c = threadIdx.x; c < row_bytes; c += blockDim.x) d[c] = j < 0 ? 0 : src[j * src_stride + c];
}

template <typename T>
__device__ __forceinline__ float load_float(const T* p) { return static_cast<float>(*p); }
template <>
__device__ __forceinline__ float load_float<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <>
__device__ __forceinline__ float load_float<__half>(const __half* p) { return __half2float(*p); }

template <typename T>
__device__ __forceinline__ void store_float(T* p, float v) { *p = static_cast<T>(v); }
template <>
__device__ __forceinline__ void store_float<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ void store_float<__half>(__half* p, float v) { *p = __float2half_rn(v); }

template <typename TIn, typename TOut>
__global__ void weighted_sum_rows_kernel(const TIn* __restrict__ rows, int64_t rows_stride,
                                         const int64_t* __restrict__ index, const float* __restrict__ weights,
                                         int64_t T, int64_t K, int64_t H, TOut* __restrict__ out) {
  const int64_t h = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (h >= H) return;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t j = index[t * K + k];
      const float v = j < 0 ? 0.f : load_float(rows + j * rows_stride + h);
      acc = __fadd_rn(acc, weights == nullptr ? v : __fmul_rn(v, weights[t * K + k]));
    }
    store_float(out + t * H + h, acc);
  }
}

template <typename TIn, typename TOut>
void launch_weighted_sum(std::uintptr_t rows, int64_t rows_stride, std::uintptr_t index, std::uintptr_t weights,
                         int64_t T, int64_t K, int64_t H, std::uintptr_t out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(H, kThreads)), static_cast<unsigned>(std::min<int64_t>(T, 65535)));
  weighted_sum_rows_kernel<TIn, TOut><<<grid, kThreads, 0, stream>>>(
      as_ptr<const TIn>(rows), rows_stride, as_ptr<const int64_t>(index), as_ptr<const float>(weights), T, K, H,
      as_ptr<TOut>(out));
}

template <typename TIn>
void dispatch_out(int out_dtype, std::uintptr_t rows, int64_t rows_stride, std::uintptr_t index,
                  std::uintptr_t weights, int64_t T, int64_t K, int64_t H, std::uintptr_t out, cudaStream_t s) {
  switch (static_cast<DType>(out_dtype)) {
    case DType::kFloat32: launch_weighted_sum<TIn, float>(rows, rows_stride, index, weights, T, K, H, out, s); break;
    case DType::kBFloat16:
      launch_weighted_sum<TIn, __nv_bfloat16>(rows, rows_stride, index, weights, T, K, H, out, s);
      break;
    case DType::kFloat16: launch_weighted_sum<TIn, __half>(rows, rows_stride, index, weights, T, K, H, out, s); break;
    default: FRUGAL_CHECK(false, "weighted_sum_rows: out_dtype code " << out_dtype << " is not fp32/bf16/fp16");
  }
}

}  // namespace

void gather_rows(std::uintptr_t src, int64_t src_stride_bytes, std::uintptr_t index, int64_t n, int64_t row_bytes,
                 std::uintptr_t dst, int64_t dst_stride_bytes, std::uintptr_t stream) {
  FRUGAL_CHECK(n >= 0 && row_bytes >= 0, "gather_rows: n=" << n << ", row_bytes=" << row_bytes << " must be >= 0");
  FRUGAL_CHECK(src_stride_bytes >= row_bytes && dst_stride_bytes >= row_bytes,
               "gather_rows: strides (" << src_stride_bytes << ", " << dst_stride_bytes << ") must be >= row_bytes="
                                        << row_bytes);
  if (n == 0 || row_bytes == 0) return;
  FRUGAL_CHECK(n < (int64_t{1} << 31), "gather_rows: n=" << n << " rows exceed the grid limit 2^31 - 1");
  const bool vec = ((src | dst) % 16 == 0) && (src_stride_bytes % 16 == 0) && (dst_stride_bytes % 16 == 0) &&
                   (row_bytes % 16 == 0);
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, vec ? row_bytes / 16 : row_bytes));
  if (vec) {
    gather_rows_vec16_kernel<<<static_cast<unsigned>(n), threads, 0, as_stream(stream)>>>(
        as_ptr<const char>(src), src_stride_bytes, as_ptr<const int64_t>(index), as_ptr<char>(dst), dst_stride_bytes,
        row_bytes);
  } else {
    gather_rows_bytes_kernel<<<static_cast<unsigned>(n), threads, 0, as_stream(stream)>>>(
        as_ptr<const char>(src), src_stride_bytes, as_ptr<const int64_t>(index), as_ptr<char>(dst), dst_stride_bytes,
        row_bytes);
  }
  FRUGAL_CHECK_LAUNCH();
}

void weighted_sum_rows(std::uintptr_t rows, int rows_dtype, int64_t rows_stride, std::uintptr_t index,
                       std::uintptr_t weights, int64_t T, int64_t K, int64_t H, std::uintptr_t out, int out_dtype,
                       std::uintptr_t stream) {
  FRUGAL_CHECK(T >= 0 && K >= 1 && H >= 1, "weighted_sum_rows: T=" << T << ", K=" << K << ", H=" << H);
  FRUGAL_CHECK(rows_stride >= H, "weighted_sum_rows: rows_stride=" << rows_stride << " must be >= H=" << H);
  if (T == 0) return;
  const cudaStream_t s = as_stream(stream);
  switch (static_cast<DType>(rows_dtype)) {
    case DType::kFloat32: dispatch_out<float>(out_dtype, rows, rows_stride, index, weights, T, K, H, out, s); break;
    case DType::kBFloat16:
      dispatch_out<__nv_bfloat16>(out_dtype, rows, rows_stride, index, weights, T, K, H, out, s);
      break;
    case DType::kFloat16: dispatch_out<__half>(out_dtype, rows, rows_stride, index, weights, T, K, H, out, s); break;
    default: FRUGAL_CHECK(false, "weighted_sum_rows: rows_dtype code " << rows_dtype << " is not fp32/bf16/fp16");
  }
  FRUGAL_CHECK_LAUNCH();
}

}  // namespace frugal::moe
