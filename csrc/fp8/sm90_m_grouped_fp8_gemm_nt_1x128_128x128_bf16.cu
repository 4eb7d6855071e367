// sm90 M-grouped FP8 GEMM NT (experts), BF16 out: the instantiation, and the host entry points that pick
// the output type (the FP32 instantiation is in sm90_m_grouped_fp8_gemm_nt_1x128_128x128_f32.cu).
#include "common/dtypes.h"
#include "fp8/sm90_m_grouped_fp8_gemm_nt.cuh"

namespace frugal::fp8 {
namespace sm90 {
template int64_t grouped_nt_workspace<cutlass::bfloat16_t>(int64_t);
template void run_grouped_nt<cutlass::bfloat16_t>(GroupSource, int64_t, std::uintptr_t, int64_t, std::uintptr_t,
                                                  const char*);
}  // namespace sm90

int64_t sm90_m_grouped_fp8_gemm_nt_workspace(int64_t G, int out_dtype) {
  return out_dtype == static_cast<int>(DType::kFloat32) ? sm90::grouped_nt_workspace<float>(G)
                                                        : sm90::grouped_nt_workspace<cutlass::bfloat16_t>(G);
}

namespace {
void dispatch(int out_dtype, sm90::GroupSource s, int64_t rows, std::uintptr_t ws, int64_t ws_bytes,
              std::uintptr_t stream, const char* name) {
  if (out_dtype == static_cast<int>(DType::kFloat32)) {
    sm90::run_grouped_nt<float>(s, rows, ws, ws_bytes, stream, name);
  } else {
    FRUGAL_CHECK(out_dtype == static_cast<int>(DType::kBFloat16),
                 name << ": out_dtype code " << out_dtype << " must be bf16 (1) or fp32 (0)");
    sm90::run_grouped_nt<cutlass::bfloat16_t>(s, rows, ws, ws_bytes, stream, name);
  }
}
}  // namespace

void sm90_m_grouped_fp8_gemm_nt_contiguous(std::uintptr_t a, std::uintptr_t sfa, std::uintptr_t b,
                                           std::uintptr_t sfb, std::uintptr_t d, int64_t ldd, int out_dtype,
                                           std::uintptr_t m_offsets, int64_t G, int64_t M_total, int64_t N,
                                           int64_t K, std::uintptr_t workspace, int64_t workspace_bytes,
                                           std::uintptr_t stream) {
  constexpr const char* kName = "sm90_m_grouped_fp8_gemm_nt_contiguous";
  auto s = sm90::make_group_source(a, sfa, b, sfb, d, ldd, m_offsets, G, M_total, N, K, false, kName);
  dispatch(out_dtype, s, M_total, workspace, workspace_bytes, stream, kName);
}

void sm90_m_grouped_fp8_gemm_nt_masked(std::uintptr_t a, std::uintptr_t sfa, std::uintptr_t b, std::uintptr_t sfb,
                                       std::uintptr_t d, int64_t ldd, int out_dtype, std::uintptr_t masked_m,
                                       int64_t G, int64_t M_max, int64_t N, int64_t K, std::uintptr_t workspace,
                                       int64_t workspace_bytes, std::uintptr_t stream) {
  constexpr const char* kName = "sm90_m_grouped_fp8_gemm_nt_masked";
  auto s = sm90::make_group_source(a, sfa, b, sfb, d, ldd, masked_m, G, M_max, N, K, true, kName);
  dispatch(out_dtype, s, G * M_max, workspace, workspace_bytes, stream, kName);
}

}  // namespace frugal::fp8
