// sm90 M-grouped FP8 GEMM NT (experts), FP32 out: the instantiation only (entry points in the _bf16 TU).
#include "fp8/sm90_m_grouped_fp8_gemm_nt.cuh"

namespace frugal::fp8::sm90 {
template int64_t grouped_nt_workspace<float>(int64_t);
template void run_grouped_nt<float>(GroupSource, int64_t, std::uintptr_t, int64_t, std::uintptr_t, const char*);
}  // namespace frugal::fp8::sm90
