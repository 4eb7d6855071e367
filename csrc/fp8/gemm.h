// Host entry points of the sm90 blockwise-scaled FP8 GEMMs (CUTLASS; see sm90_fp8_gemm_cutlass.cuh).
//
// All operands are raw device pointers passed from Python as integers, with a cudaStream_t and a workspace
// allocated by the caller (torch's caching allocator) of at least the bytes the *_workspace function
// returns. Requirements, checked here and in fp8/cuda_gemm_ops.py:
//   * e4m3 operand rows 16-byte aligned: lda, ldb (elements) multiples of 16, base pointers 16-byte aligned;
//   * output rows 16-byte aligned: ldd a multiple of 8 (bf16) or 4 (fp32);
//   * scales fp32, contiguous, in the layouts documented per function; M, N, K any positive sizes (tails are
//     zero-filled by TMA on load and clipped on store).
#pragma once

#include <cstdint>

namespace frugal::fp8 {

// D (M, N) = A (M, K) . B (N, K)^T; A e4m3 row-major (row stride lda) with sfa (M, ceil(K/128)) fp32
// row-major (1x128); B e4m3 row-major (row stride ldb) with sfb (ceil(N/128), ceil(K/128)) fp32 row-major
// (128x128). D row-major with row stride ldd. K must be a multiple of 16 and N of 8 (bf16) / 4 (fp32), as
// CUTLASS's can_implement requires of TMA operands: callers zero-pad (fp8/cuda_gemm_ops.py does).
//   out_bf16: D bf16 = bf16(acc).
//   out_f32:  D fp32 = acc (+ D when accumulate: D += A.B^T, one fp32 rounding per element).
int64_t sm90_fp8_gemm_nt_1x128_128x128_bf16_workspace(int64_t M, int64_t N, int64_t K);
void sm90_fp8_gemm_nt_1x128_128x128_bf16(std::uintptr_t a, int64_t lda, std::uintptr_t sfa, std::uintptr_t b,
                                         int64_t ldb, std::uintptr_t sfb, std::uintptr_t d, int64_t ldd, int64_t M,
                                         int64_t N, int64_t K, std::uintptr_t workspace, int64_t workspace_bytes,
                                         std::uintptr_t stream);
int64_t sm90_fp8_gemm_nt_1x128_128x128_f32_workspace(int64_t M, int64_t N, int64_t K, bool accumulate);
void sm90_fp8_gemm_nt_1x128_128x128_f32(std::uintptr_t a, int64_t lda, std::uintptr_t sfa, std::uintptr_t b,
                                        int64_t ldb, std::uintptr_t sfb, std::uintptr_t d, int64_t ldd,
                                        bool accumulate, int64_t M, int64_t N, int64_t K, std::uintptr_t workspace,
                                        int64_t workspace_bytes, std::uintptr_t stream);

// Expert (M-grouped) GEMMs, G experts sharing N and K; out_dtype: DType code of D, bf16 or fp32.
// B (G, N, K) e4m3 contiguous with sfb (G, ceil(N/128), ceil(K/128)); A and B rows contiguous with K a
// multiple of 16; D rows of stride ldd (multiple of 8 for bf16, 4 for fp32). No host sync: the per-expert
// sizes are read on the device.
//   contiguous: A (M_total, K) rows of all experts concatenated, expert g owns rows [off[g], off[g+1])
//               (m_offsets (G+1,) int32, non-decreasing, clamped to M_total); sfa (M_total, ceil(K/128));
//               D (M_total, N). Rows outside [off[0], off[G]) are written as zeros.
//   masked:     A (G, M_max, K), sfa (G, M_max, ceil(K/128)), D (G, M_max, N); expert g computes its first
//               min(masked_m[g], M_max) rows (masked_m (G,) int32); the other rows of D are written as zeros.
int64_t sm90_m_grouped_fp8_gemm_nt_workspace(int64_t G, int out_dtype);
void sm90_m_grouped_fp8_gemm_nt_contiguous(std::uintptr_t a, std::uintptr_t sfa, std::uintptr_t b,
                                           std::uintptr_t sfb, std::uintptr_t d, int64_t ldd, int out_dtype,
                                           std::uintptr_t m_offsets, int64_t G, int64_t M_total, int64_t N,
                                           int64_t K, std::uintptr_t workspace, int64_t workspace_bytes,
                                           std::uintptr_t stream);
void sm90_m_grouped_fp8_gemm_nt_masked(std::uintptr_t a, std::uintptr_t sfa, std::uintptr_t b, std::uintptr_t sfb,
                                       std::uintptr_t d, int64_t ldd, int out_dtype, std::uintptr_t masked_m,
                                       int64_t G, int64_t M_max, int64_t N, int64_t K, std::uintptr_t workspace,
                                       int64_t workspace_bytes, std::uintptr_t stream);

// Weight gradient, per expert g: D_g (N, K) fp32 (+)= dY_g^T . X_g over the expert's tokens, both operands
// quantized per 128 tokens (128x1) and stored TRANSPOSED, token-contiguous (quant_rowwise_colwise_128):
//   dyt (N, ld_t) e4m3, s_dy (n_blocks, N) fp32;  xt (K, ld_t) e4m3, s_x (n_blocks, K) fp32.
// Dense (token_offsets == 0, G == 1): tokens [0, T) in blocks of 128 from column 0.
// Grouped: expert g's T_g = off[g+1] - off[g] tokens start at column 128 * blk[g] (block_offsets, see
// token_block_offsets); an expert without tokens reads its all-zero block, so D_g = (D_g +) 0.
// D (G, N, K) fp32, row stride ldd (a multiple of 4), expert stride N * ldd.
int64_t sm90_fp8_gemm_wgrad_128x1_workspace(int64_t G);
void sm90_fp8_gemm_wgrad_128x1(std::uintptr_t dyt, std::uintptr_t s_dy, std::uintptr_t xt, std::uintptr_t s_x,
                               std::uintptr_t d, int64_t ldd, bool accumulate, std::uintptr_t token_offsets,
                               std::uintptr_t block_offsets, int64_t G, int64_t T, int64_t N, int64_t K, int64_t ld_t,
                               std::uintptr_t workspace, int64_t workspace_bytes, std::uintptr_t stream);

}  // namespace frugal::fp8
