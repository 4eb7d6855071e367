// sm90 M-grouped FP8 GEMM NT for MoE experts (A 1x128, B 128x128 per expert), contiguous and masked
// layouts, on CUTLASS's pointer-array grouped kernel. Shared by the BF16-out and FP32-out translation units.
//
// Nothing is read back to the host: a one-thread-per-expert setup kernel turns the device-resident
// offsets (contiguous) or valid counts (masked) into CUTLASS's per-group problem shapes, pointers and
// strides in the caller's workspace, then the persistent grouped kernel (one CTA per SM, host problem
// shapes absent) walks the groups' tiles from those arrays. An expert with no rows has no tiles. Output rows
// that no expert computes (masked padding, rows outside the contiguous offsets) are written as exact zeros
// by a separate row kernel; the two kernels touch disjoint rows.
#pragma once

#include "fp8/gemm.h"
#include "fp8/sm90_fp8_gemm_cutlass.cuh"

namespace frugal::fp8::sm90 {

constexpr int kGroupBlk = 128;

struct GroupSource {
  const ElementFP8* a;
  const float* sfa;
  const ElementFP8* b;
  const float* sfb;
  void* d;
  int64_t ldd;
  const int* index;  // m_offsets (G+1,) or masked_m (G,)
  int G, M_rows, N, K;
  bool masked;  // masked: M_rows = M_max per expert; contiguous: M_rows = M_total
};

// Rows [first, first + M_g) of expert g: contiguous -> clamp(off[g]..off[g+1]); masked -> g * M_max, count.
__device__ __forceinline__ void group_rows(const GroupSource& s, int g, int64_t& first, int& count) {
  if (s.masked) {
    first = int64_t(g) * s.M_rows;
    count = min(max(s.index[g], 0), s.M_rows);
  } else {
    const int lo = min(max(s.index[g], 0), s.M_rows);
    const int hi = min(max(s.index[g + 1], lo), s.M_rows);
    first = lo;
    count = hi - lo;
  }
}

template <class Cfg>
__global__ void setup_grouped_args(GroupedArgArrays<Cfg> arr, GroupSource s) {
  using ElementD = typename Cfg::ElementD;
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= s.G) return;
  int64_t first;
  int count;
  group_rows(s, g, first, count);
  const int64_t Kb = (s.K + kGroupBlk - 1) / kGroupBlk, Nb = (s.N + kGroupBlk - 1) / kGroupBlk;
  arr.problem_shapes[g] = cute::make_shape(count, s.N, s.K);
  arr.ptr_a[g] = s.a + first * s.K;
  arr.ptr_sfa[g] = s.sfa + first * Kb;
  arr.ptr_b[g] = s.b + int64_t(g) * s.N * s.K;
  arr.ptr_sfb[g] = s.sfb + int64_t(g) * Nb * Kb;
  arr.ptr_c[g] = nullptr;
  arr.ptr_d[g] = static_cast<ElementD*>(s.d) + first * s.ldd;
  arr.stride_a[g] = cute::make_stride(int64_t(s.K), cute::Int<1>{}, cute::Int<0>{});
  arr.stride_b[g] = cute::make_stride(int64_t(s.K), cute::Int<1>{}, cute::Int<0>{});
  arr.stride_c[g] = cute::make_stride(int64_t(s.ldd), cute::Int<1>{}, cute::Int<0>{});
  arr.stride_d[g] = cute::make_stride(int64_t(s.ldd), cute::Int<1>{}, cute::Int<0>{});
  const auto problem = cute::make_shape(count, s.N, s.K, 1);
  arr.layout_sfa[g] = Cfg::ScaleConfig::tile_atom_to_shape_SFA(problem);
  arr.layout_sfb[g] = Cfg::ScaleConfig::tile_atom_to_shape_SFB(problem);
}

// One warp per output row: rows that no expert computes become exact zeros (16-byte stores when aligned).
template <class ElementD>
__global__ void zero_uncomputed_rows(GroupSource s, int64_t total_rows) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= total_rows) return;
  bool computed;
  if (s.masked) {
    const int g = static_cast<int>(row / s.M_rows);
    computed = (row % s.M_rows) < min(max(s.index[g], 0), s.M_rows);
  } else {
    const int lo = min(max(s.index[0], 0), s.M_rows);
    const int hi = min(max(s.index[s.G], lo), s.M_rows);
    computed = row >= lo && row < hi;
  }
  if (computed) return;
  ElementD* out = static_cast<ElementD*>(s.d) + row * s.ldd;
  constexpr int kVec = 16 / sizeof(ElementD);  // rows are 16-byte aligned (checked on the host)
  if (s.ldd % kVec == 0) {
    const int64_t vecs = s.N / kVec;
    for (int64_t v = lane; v < vecs; v += 32) reinterpret_cast<uint4*>(out)[v] = make_uint4(0, 0, 0, 0);
    for (int64_t c = vecs * kVec + lane; c < s.N; c += 32) out[c] = ElementD(0.f);
  } else {
    for (int64_t c = lane; c < s.N; c += 32) out[c] = ElementD(0.f);
  }
}

template <class Cfg>
typename Cfg::Gemm::Arguments grouped_arguments(const GroupedArgArrays<Cfg>& arr, int G) {
  return typename Cfg::Gemm::Arguments{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {G, arr.problem_shapes, nullptr},
      {arr.ptr_a, arr.stride_a, arr.ptr_b, arr.stride_b, arr.ptr_sfa, arr.layout_sfa, arr.ptr_sfb, arr.layout_sfb},
      {{}, nullptr, arr.stride_c, arr.ptr_d, arr.stride_d},
      hardware_info()};
}

template <class ElementD>
int64_t grouped_nt_workspace(int64_t G) {
  using Cfg = GroupedGemmNT<ElementD, void, ScaleConfigNT>;
  FRUGAL_CHECK(G >= 1, "sm90_m_grouped_fp8_gemm_nt_workspace: G=" << G << " must be >= 1");
  GroupedArgArrays<Cfg> arr{};
  auto args = grouped_arguments<Cfg>(arr, static_cast<int>(G));
  return static_cast<int64_t>(GroupedArgArrays<Cfg>::bytes(G) + Cfg::Gemm::get_workspace_size(args));
}

template <class ElementD>
void run_grouped_nt(GroupSource s, int64_t total_rows, std::uintptr_t workspace, int64_t workspace_bytes,
                    std::uintptr_t stream, const char* name) {
  FRUGAL_CHECK(s.G >= 1 && s.N > 0 && s.K > 0, name << ": G=" << s.G << ", N=" << s.N << ", K=" << s.K);
  FRUGAL_CHECK(s.K % kAlignFP8 == 0, name << ": K=" << s.K << " must be a multiple of 16 (TMA rows)");
  using Cfg = GroupedGemmNT<ElementD, void, ScaleConfigNT>;
  constexpr int kAlignD = align_of_output<ElementD>();
  FRUGAL_CHECK(s.ldd >= s.N && s.ldd % kAlignD == 0,
               name << ": ldd=" << s.ldd << " must be >= N=" << s.N << " and a multiple of " << kAlignD << " (TMA)");
  using Arrays = GroupedArgArrays<Cfg>;
  const uintptr_t base[3] = {reinterpret_cast<uintptr_t>(s.a), reinterpret_cast<uintptr_t>(s.b),
                             reinterpret_cast<uintptr_t>(s.d)};
  FRUGAL_CHECK(base[0] % 16 == 0 && base[1] % 16 == 0 && base[2] % 16 == 0,
               name << ": A, B and D must be 16-byte aligned");
  FRUGAL_CHECK(workspace % Arrays::kAlign == 0,
               name << ": workspace must be " << Arrays::kAlign << "-byte aligned");
  const size_t arrays_bytes = Arrays::bytes(s.G);
  FRUGAL_CHECK(static_cast<size_t>(workspace_bytes) >= arrays_bytes,
               name << ": workspace_bytes=" << workspace_bytes << " < " << arrays_bytes);
  auto st = as_stream(stream);
  Arrays arr = Arrays::carve(reinterpret_cast<void*>(workspace), s.G);
  setup_grouped_args<Cfg><<<(s.G + 127) / 128, 128, 0, st>>>(arr, s);
  FRUGAL_CHECK_LAUNCH();
  if (total_rows > 0) {
    const int64_t blocks = (total_rows + 7) / 8;
    FRUGAL_CHECK(blocks < (int64_t(1) << 31), name << ": too many rows " << total_rows);
    zero_uncomputed_rows<ElementD><<<static_cast<unsigned>(blocks), 256, 0, st>>>(s, total_rows);
    FRUGAL_CHECK_LAUNCH();
  }
  auto args = grouped_arguments<Cfg>(arr, s.G);
  launch<typename Cfg::Gemm>(args, reinterpret_cast<char*>(workspace) + arrays_bytes,
                             workspace_bytes - static_cast<int64_t>(arrays_bytes), st, name);
}

inline GroupSource make_group_source(std::uintptr_t a, std::uintptr_t sfa, std::uintptr_t b, std::uintptr_t sfb,
                                     std::uintptr_t d, int64_t ldd, std::uintptr_t index, int64_t G, int64_t M_rows,
                                     int64_t N, int64_t K, bool masked, const char* name) {
  GroupSource s;
  s.a = as_ptr<const ElementFP8>(a);
  s.sfa = as_ptr<const float>(sfa);
  s.b = as_ptr<const ElementFP8>(b);
  s.sfb = as_ptr<const float>(sfb);
  s.d = reinterpret_cast<void*>(d);
  s.ldd = ldd;
  s.index = as_ptr<const int>(index);
  s.G = checked_int(G, "G", name);
  s.M_rows = checked_int(M_rows, masked ? "M_max" : "M_total", name);
  s.N = checked_int(N, "N", name);
  s.K = checked_int(K, "K", name);
  s.masked = masked;
  return s;
}

// The two output types live in their own translation units (parallel build).
extern template int64_t grouped_nt_workspace<cutlass::bfloat16_t>(int64_t);
extern template int64_t grouped_nt_workspace<float>(int64_t);
extern template void run_grouped_nt<cutlass::bfloat16_t>(GroupSource, int64_t, std::uintptr_t, int64_t,
                                                         std::uintptr_t, const char*);
extern template void run_grouped_nt<float>(GroupSource, int64_t, std::uintptr_t, int64_t, std::uintptr_t,
                                           const char*);

}  // namespace frugal::fp8::sm90
