// Blockwise FP8 E4M3 quantization on 128x128 tiles: 1x128 (per token), 128x1 (per 128 tokens, written
// transposed), both in one pass, and 128x128 (weights). fp8/quant.py is the reference (see quant.h).
//
// One CTA of 256 threads quantizes one tile of 128 tokens x 128 channels. Warp w owns tokens 16w..16w+15;
// half-warp h of it owns 8 consecutive tokens (16w + 8h + i, i = 0..7) and lane j of the half owns 8
// consecutive channels (8j + q, q = 0..7). So every thread holds an 8x8 sub-tile in registers, a half-warp
// reads a 256-byte row segment per load (16-byte vectors for bf16/fp16, two for fp32), and:
//   rowwise (1x128)   amax of a token = max over the 16 lanes of its half-warp (4 shuffles);
//   colwise (128x1)   amax of a channel = max over the 16 tokens of the warp (1 shuffle), then over the 8
//                     warps through shared memory; the 8 quantized tokens of a channel are one 8-byte word,
//                     transposed through a 16 KB shared tile (XOR-swizzled by channel/8 so both the
//                     scattered writes and the row reads are bank-conflict free) and stored as 128-byte
//                     token-contiguous rows of qt_col;
//   block (128x128)   amax over the whole tile (warp shuffle + 8-way shared reduction).
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "common/check.h"
#include "common/dtypes.h"
#include "fp8/quant.h"

namespace frugal::fp8 {
namespace {

constexpr int kTile = 128;
constexpr int kThreads = 256;
constexpr int kModeRow = 1, kModeCol = 2, kModeBlock = 4;

struct TileParams {
  const void* x;
  int64_t T, C, x_row_stride, x_batch_stride;
  uint8_t* q_row;  // e4m3 bytes (T, C) per batch; block mode: (N, K)
  float* s_row;    // (T, ceil(C/128)); block mode: (ceil(N/128), ceil(K/128)) per batch
  int64_t q_batch_stride, s_batch_stride;
  uint8_t* qt_col;  // (C, ld_t)
  float* s_col;     // (n_blocks, C)
  int64_t ld_t;
  const int* token_offsets;  // (G+1,) or null (dense)
  const int* block_offsets;  // (G+1,)
  int G;
  int scale_format;
  int* nonfinite_flag;
  bool x_vec_ok;  // x base and row stride 16-byte aligned
};

__device__ __forceinline__ float pow2_ceil(float s) {
  unsigned bits = __float_as_uint(s);
  if (bits & 0x007fffffu) bits = (bits & 0x7f800000u) + 0x00800000u;
  return __uint_as_float(bits & 0x7f800000u);
}

__device__ __forceinline__ float make_scale(float amax, int scale_format) {
  float s = fmaxf(amax, kAmaxFloor) / kE4M3Max;  // true division, as the reference
  return scale_format != static_cast<int>(ScaleFormat::kFP32) ? pow2_ceil(s) : s;
}

// x / scale clamped to +-448 (NaN stays NaN, as torch.clamp), then RNE to e4m3, two at a time.
__device__ __forceinline__ uint16_t quant2(float a, float b, float scale) {
  float ra = a / scale, rb = b / scale;
  ra = ra > kE4M3Max ? kE4M3Max : (ra < -kE4M3Max ? -kE4M3Max : ra);
  rb = rb > kE4M3Max ? kE4M3Max : (rb < -kE4M3Max ? -kE4M3Max : rb);
  return __nv_cvt_float2_to_fp8x2(make_float2(ra, rb), __NV_SATFINITE, __NV_E4M3);
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}

// 8 consecutive elements as floats; n valid (0..8), the rest zero. Vector path: 16-byte loads.
template <typename T>
__device__ __forceinline__ void load8(const T* p, int n, bool vec, float (&v)[8]) {
  if (vec && n == 8) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p));
      const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (std::is_same_v<T, __nv_bfloat16>) {
          const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[k]));
          v[2 * k] = f.x, v[2 * k + 1] = f.y;
        } else {
          const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[k]));
          v[2 * k] = f.x, v[2 * k + 1] = f.y;
        }
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = k < n ? to_float(p[k]) : 0.f;
  }
}

// Stores 8 e4m3 bytes; one 8-byte store when all valid and aligned.
__device__ __forceinline__ void store8(uint8_t* p, const uint16_t (&pairs)[4], int n, bool vec) {
  if (vec && n == 8) {
    uint2 w;
    w.x = uint32_t(pairs[0]) | (uint32_t(pairs[1]) << 16);
    w.y = uint32_t(pairs[2]) | (uint32_t(pairs[3]) << 16);
    *reinterpret_cast<uint2*>(p) = w;
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (k < n) p[k] = static_cast<uint8_t>(pairs[k / 2] >> (8 * (k % 2)));
    }
  }
}

template <typename T, int kMode>
__global__ void __launch_bounds__(kThreads) quant_tile_128x128_kernel(const TileParams p) {
  constexpr bool kRow = kMode & kModeRow, kCol = kMode & kModeCol, kBlock = kMode & kModeBlock;
  __shared__ float s_amax[kThreads / 32][kTile];                 // colwise: per-warp channel amax
  __shared__ __align__(16) uint64_t s_tile[kCol ? kTile : 1][16];  // colwise: [channel][8-token chunk]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int h = lane / 16, j = lane % 16;
  const int64_t b = blockIdx.x;                 // token block (block mode: row block of N)
  const int64_t c0 = int64_t(blockIdx.y) * kTile + 8 * j;  // first channel of this thread
  const int tl0 = 16 * warp + 8 * h;            // first local token of this thread

  // Token range of this block: dense blocks of 128, or one expert's slice (grouped colwise).
  int64_t t_base = b * kTile, t_end = p.T;
  if (p.token_offsets != nullptr) {
    if (b >= p.block_offsets[p.G]) return;  // capacity slack past the last expert
    int lo = 0, hi = p.G - 1;               // last g with block_offsets[g] <= b
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.block_offsets[mid] <= b) lo = mid; else hi = mid - 1;
    }
    const int64_t start = p.token_offsets[lo];
    t_base = start + (b - p.block_offsets[lo]) * kTile;
    const int64_t stop = p.token_offsets[lo + 1];
    t_end = stop < start ? start : (stop > p.T ? p.T : stop);
  }

  const T* x = static_cast<const T*>(p.x) + int64_t(blockIdx.z) * p.x_batch_stride;
  const int64_t c_left = p.C - c0;
  const int n_c = c_left <= 0 ? 0 : (c_left >= 8 ? 8 : static_cast<int>(c_left));
  float v[8][8];
  bool finite = true;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t t = t_base + tl0 + i;
    if (t < t_end && n_c > 0) {
      load8(x + t * p.x_row_stride + c0, n_c, p.x_vec_ok, v[i]);
    } else {
#pragma unroll
      for (int q = 0; q < 8; ++q) v[i][q] = 0.f;
    }
#pragma unroll
    for (int q = 0; q < 8; ++q) finite &= isfinite(v[i][q]);
  }
  if (!finite && p.nonfinite_flag != nullptr) atomicExch(p.nonfinite_flag, 1);

  const int64_t Cb = (p.C + kTile - 1) / kTile;
  const bool q_vec = (p.C % 8) == 0;

  if constexpr (kRow) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float a = 0.f;
#pragma unroll
      for (int q = 0; q < 8; ++q) a = fmaxf(a, fabsf(v[i][q]));
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, off));
      const float s = make_scale(a, p.scale_format);
      const int64_t t = t_base + tl0 + i;
      if (t < t_end) {
        uint16_t pairs[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) pairs[k] = quant2(v[i][2 * k], v[i][2 * k + 1], s);
        if (n_c > 0) store8(p.q_row + t * p.C + c0, pairs, n_c, q_vec);
        if (j == 0) p.s_row[t * Cb + blockIdx.y] = s;
      }
    }
  }

  if constexpr (kCol) {
    // Channel amax over this warp's 16 tokens, then over the 8 warps.
    float a[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      a[q] = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) a[q] = fmaxf(a[q], fabsf(v[i][q]));
      a[q] = fmaxf(a[q], __shfl_xor_sync(0xffffffffu, a[q], 16));
      if (h == 0) s_amax[warp][8 * j + q] = a[q];
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      float m = 0.f;
#pragma unroll
      for (int w = 0; w < kThreads / 32; ++w) m = fmaxf(m, s_amax[w][8 * j + q]);
      const float s = make_scale(m, p.scale_format);
      if (warp == 0 && h == 0 && q < n_c) p.s_col[b * p.C + c0 + q] = s;
      // The 8 tokens of channel 8j+q held by this thread -> one 8-byte word of the transposed tile.
      uint64_t word = 0;
#pragma unroll
      for (int i = 0; i < 8; i += 2) word |= uint64_t(quant2(v[i][q], v[i + 1][q], s)) << (8 * i);
      const int row = 8 * j + q, chunk = (tl0 / 8) ^ j;  // swizzle: chunk ^ (row / 8)
      s_tile[row][chunk] = word;
    }
    __syncthreads();
    // 128 channel rows x 16 chunks of 8 bytes; 16 consecutive threads store one 128-byte row.
#pragma unroll
    for (int k = 0; k < (kTile * 16) / kThreads; ++k) {
      const int idx = k * kThreads + tid, row = idx / 16, pchunk = idx % 16;
      const int64_t c = int64_t(blockIdx.y) * kTile + row;
      if (c < p.C) {
        const int lchunk = pchunk ^ (row / 8);
        *reinterpret_cast<uint64_t*>(p.qt_col + c * p.ld_t + b * kTile + 8 * lchunk) = s_tile[row][pchunk];
      }
    }
  }

  if constexpr (kBlock) {
    float a = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int q = 0; q < 8; ++q) a = fmaxf(a, fabsf(v[i][q]));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, off));
    if (lane == 0) s_amax[warp][0] = a;
    __syncthreads();
    float m = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) m = fmaxf(m, s_amax[w][0]);
    const float s = make_scale(m, p.scale_format);
    uint8_t* q_out = p.q_row + int64_t(blockIdx.z) * p.q_batch_stride;
    if (tid == 0) p.s_row[int64_t(blockIdx.z) * p.s_batch_stride + b * Cb + blockIdx.y] = s;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t t = t_base + tl0 + i;
      if (t < t_end && n_c > 0) {
        uint16_t pairs[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) pairs[k] = quant2(v[i][2 * k], v[i][2 * k + 1], s);
        store8(q_out + t * p.C + c0, pairs, n_c, q_vec);
      }
    }
  }
}

template <int kMode>
void launch_tile_kernel(const TileParams& p, int dtype, dim3 grid, cudaStream_t stream, const char* name) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      quant_tile_128x128_kernel<float, kMode><<<grid, kThreads, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      quant_tile_128x128_kernel<__nv_bfloat16, kMode><<<grid, kThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      quant_tile_128x128_kernel<__half, kMode><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      FRUGAL_CHECK(false, name << ": dtype code " << dtype << " is not fp32/bf16/fp16");
  }
  FRUGAL_CHECK_LAUNCH();
}

int dtype_bytes(int dtype) { return static_cast<DType>(dtype) == DType::kFloat32 ? 4 : 2; }

bool aligned16(std::uintptr_t ptr, int64_t row_stride, int dtype) {
  return ptr % 16 == 0 && (row_stride * dtype_bytes(dtype)) % 16 == 0;
}

__global__ void token_block_offsets_kernel(const int* __restrict__ off, int G, int* __restrict__ blk) {
  using Scan = cub::BlockScan<int, 1024>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < G; base += 1024) {
    const int g = base + threadIdx.x;
    int n = 0;
    if (g < G) n = max(1, (max(off[g + 1] - off[g], 0) + kTile - 1) / kTile);
    int excl = 0, total = 0;
    Scan(tmp).ExclusiveSum(n, excl, total);
    if (g < G) blk[g] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) blk[G] = carry;
}

}  // namespace

void quant_per_token_1x128(std::uintptr_t x, int x_dtype, std::uintptr_t q, std::uintptr_t scales, int64_t M,
                           int64_t K, int64_t x_row_stride, int scale_format, std::uintptr_t stream) {
  quant_rowwise_colwise_128(x, x_dtype, M, K, x_row_stride, q, scales, 0, 0, 0, 0, 0, 0, 0, scale_format, 0, stream);
}

void quant_rowwise_colwise_128(std::uintptr_t x, int x_dtype, int64_t T, int64_t C, int64_t x_row_stride,
                               std::uintptr_t q_row, std::uintptr_t s_row, std::uintptr_t qt_col,
                               std::uintptr_t s_col, int64_t ld_t, int64_t n_blocks, std::uintptr_t token_offsets,
                               std::uintptr_t block_offsets, int64_t G, int scale_format,
                               std::uintptr_t nonfinite_flag, std::uintptr_t stream) {
  const char* name = "quant_rowwise_colwise_128";
  FRUGAL_CHECK(T >= 0 && C > 0, name << ": T=" << T << ", C=" << C << " must be T >= 0, C > 0");
  FRUGAL_CHECK(x_row_stride >= C, name << ": x_row_stride=" << x_row_stride << " must be >= C=" << C);
  FRUGAL_CHECK(scale_format >= 0 && scale_format <= 2, name << ": scale_format=" << scale_format);
  const bool row = q_row != 0, col = qt_col != 0;
  FRUGAL_CHECK(row || col, name << ": neither the rowwise nor the colwise output was given");
  FRUGAL_CHECK(!row || s_row != 0, name << ": q_row given without s_row");
  FRUGAL_CHECK(!col || s_col != 0, name << ": qt_col given without s_col");
  const bool grouped = token_offsets != 0;
  FRUGAL_CHECK(!grouped || (col && block_offsets != 0 && G >= 1),
               name << ": grouped token blocks need the colwise output, block_offsets and G >= 1 (G=" << G << ")");
  const int64_t dense_blocks = (T + kTile - 1) / kTile;
  if (!grouped) n_blocks = dense_blocks;
  FRUGAL_CHECK(!grouped || n_blocks >= T / kTile + G,
               name << ": n_blocks=" << n_blocks << " must be >= T/128 + G = " << T / kTile + G);
  FRUGAL_CHECK(!col || (ld_t >= n_blocks * kTile && ld_t % 16 == 0 && qt_col % 16 == 0),
               name << ": ld_t=" << ld_t << " must be >= 128 * n_blocks = " << n_blocks * kTile
                    << ", a multiple of 16, and qt_col 16-byte aligned");
  if (n_blocks == 0) return;
  FRUGAL_CHECK((C + kTile - 1) / kTile <= 65535, name << ": C=" << C << " too large (> 65535 * 128)");

  TileParams p{};
  p.x = reinterpret_cast<const void*>(x);
  p.T = T, p.C = C, p.x_row_stride = x_row_stride, p.x_batch_stride = 0;
  p.q_row = as_ptr<uint8_t>(q_row), p.s_row = as_ptr<float>(s_row);
  p.qt_col = as_ptr<uint8_t>(qt_col), p.s_col = as_ptr<float>(s_col), p.ld_t = ld_t;
  p.token_offsets = as_ptr<const int>(token_offsets), p.block_offsets = as_ptr<const int>(block_offsets);
  p.G = static_cast<int>(G);
  p.scale_format = scale_format;
  p.nonfinite_flag = as_ptr<int>(nonfinite_flag);
  p.x_vec_ok = aligned16(x, x_row_stride, x_dtype);
  const dim3 grid(static_cast<unsigned>(n_blocks), static_cast<unsigned>((C + kTile - 1) / kTile), 1);
  auto st = as_stream(stream);
  // A rowwise output with grouped blocks is fine: every valid token lies in exactly one block.
  if (row && col) {
    launch_tile_kernel<kModeRow | kModeCol>(p, x_dtype, grid, st, name);
  } else if (row) {
    launch_tile_kernel<kModeRow>(p, x_dtype, grid, st, name);
  } else {
    launch_tile_kernel<kModeCol>(p, x_dtype, grid, st, name);
  }
}

void quant_per_block_128x128(std::uintptr_t w, int w_dtype, int64_t B, int64_t N, int64_t K, std::uintptr_t q,
                             std::uintptr_t scales, int scale_format, std::uintptr_t nonfinite_flag,
                             std::uintptr_t stream) {
  const char* name = "quant_per_block_128x128";
  FRUGAL_CHECK(B >= 0 && N >= 0 && K > 0, name << ": B=" << B << ", N=" << N << ", K=" << K);
  FRUGAL_CHECK(scale_format >= 0 && scale_format <= 2, name << ": scale_format=" << scale_format);
  FRUGAL_CHECK(B <= 65535, name << ": B=" << B << " > 65535");
  if (B == 0 || N == 0) return;
  const int64_t Nb = (N + kTile - 1) / kTile, Kb = (K + kTile - 1) / kTile;
  TileParams p{};
  p.x = reinterpret_cast<const void*>(w);
  p.T = N, p.C = K, p.x_row_stride = K, p.x_batch_stride = N * K;
  p.q_row = as_ptr<uint8_t>(q), p.s_row = as_ptr<float>(scales);
  p.q_batch_stride = N * K, p.s_batch_stride = Nb * Kb;
  p.scale_format = scale_format;
  p.nonfinite_flag = as_ptr<int>(nonfinite_flag);
  p.x_vec_ok = aligned16(w, K, w_dtype);
  const dim3 grid(static_cast<unsigned>(Nb), static_cast<unsigned>(Kb), static_cast<unsigned>(B));
  launch_tile_kernel<kModeBlock>(p, w_dtype, grid, as_stream(stream), name);
}

void token_block_offsets(std::uintptr_t token_offsets, int64_t G, std::uintptr_t block_offsets,
                         std::uintptr_t stream) {
  FRUGAL_CHECK(G >= 1 && G <= (1 << 20), "token_block_offsets: G=" << G << " must be in [1, 2^20]");
  token_block_offsets_kernel<<<1, 1024, 0, as_stream(stream)>>>(as_ptr<const int>(token_offsets),
                                                                static_cast<int>(G), as_ptr<int>(block_offsets));
  FRUGAL_CHECK_LAUNCH();
}

}  // namespace frugal::fp8
