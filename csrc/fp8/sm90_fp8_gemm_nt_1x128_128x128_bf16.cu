// sm90 FP8 GEMM NT, A 1x128-scaled x B 128x128-scaled, BF16 out: the forward / input-grad GEMM of
// fp8.gemm. One CUTLASS instantiation per translation unit keeps the parallel build short.
#include "fp8/gemm.h"
#include "fp8/sm90_fp8_gemm_cutlass.cuh"

namespace frugal::fp8 {
namespace {
using Cfg = sm90::DenseGemmNT<cutlass::bfloat16_t, void>;
constexpr const char* kName = "sm90_fp8_gemm_nt_1x128_128x128_bf16";
}  // namespace

int64_t sm90_fp8_gemm_nt_1x128_128x128_bf16_workspace(int64_t M, int64_t N, int64_t K) {
  auto args = sm90::dense_arguments<Cfg>(0, 16 * ((K + 15) / 16), 0, 0, 16 * ((K + 15) / 16), 0, 0,
                                         8 * ((N + 7) / 8), 0.f, M, N, K, kName);
  return static_cast<int64_t>(Cfg::Gemm::get_workspace_size(args));
}

void sm90_fp8_gemm_nt_1x128_128x128_bf16(std::uintptr_t a, int64_t lda, std::uintptr_t sfa, std::uintptr_t b,
                                         int64_t ldb, std::uintptr_t sfb, std::uintptr_t d, int64_t ldd, int64_t M,
                                         int64_t N, int64_t K, std::uintptr_t workspace, int64_t workspace_bytes,
                                         std::uintptr_t stream) {
  FRUGAL_CHECK(M > 0 && N > 0 && K > 0, kName << ": M=" << M << ", N=" << N << ", K=" << K << " must be > 0");
  auto args = sm90::dense_arguments<Cfg>(a, lda, sfa, b, ldb, sfb, d, ldd, 0.f, M, N, K, kName);
  sm90::launch<Cfg::Gemm>(args, reinterpret_cast<void*>(workspace), workspace_bytes, as_stream(stream), kName);
}

}  // namespace frugal::fp8
