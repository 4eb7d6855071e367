// sm90 FP8 weight-gradient GEMM: dW (N, K) (+)= dY^T (N, T) . X (T, K), both operands scaled per 128 tokens
// (128x1), accumulating into the FP32 weight gradient; dense (one group) and per-expert (grouped).
//
// The contraction runs over tokens, so both operands are read token-contiguous: dY^T and X^T as written
// transposed by quant_rowwise_colwise_128 (dyt (N, ld_t), xt (K, ld_t)), which makes this an NT GEMM with
// per-row scales on both sides (ScaleConfigWgrad). Its scales, (n_blocks, N) and (n_blocks, K) row-major,
// are the token-block-major layout CUTLASS reads directly.
//
// Per expert g the GEMM is (M = N, N = K, contraction T_g), starting at token column 128 * blk[g]; TMA
// zero-fills tokens past T_g. An expert without tokens would give CUTLASS a zero-length contraction (its
// mainloop needs at least one K tile), so it contracts over one token of its all-zero block instead:
// D_g = beta * D_g + 0 exactly.
#include "fp8/gemm.h"
#include "fp8/sm90_fp8_gemm_cutlass.cuh"

namespace frugal::fp8 {
namespace {

using Cfg = sm90::GroupedGemmNT<float, float, sm90::ScaleConfigWgrad>;
using Arrays = sm90::GroupedArgArrays<Cfg>;
constexpr int kBlk = 128;
constexpr const char* kName = "sm90_fp8_gemm_wgrad_128x1";

struct WgradSource {
  const sm90::ElementFP8* dyt;
  const float* s_dy;
  const sm90::ElementFP8* xt;
  const float* s_x;
  float* d;
  int64_t ldd, ld_t;
  const int* token_offsets;  // null: dense
  const int* block_offsets;
  int G, T, N, K;
};

__global__ void setup_wgrad_args(Arrays arr, WgradSource s) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= s.G) return;
  int tokens = s.T;
  int64_t blk = 0;
  if (s.token_offsets != nullptr) {
    tokens = max(s.token_offsets[g + 1] - s.token_offsets[g], 0);
    blk = s.block_offsets[g];
  }
  const int contraction = max(tokens, 1);  // empty expert: one zero token (see the file comment)
  arr.problem_shapes[g] = cute::make_shape(s.N, s.K, contraction);
  arr.ptr_a[g] = s.dyt + blk * kBlk;
  arr.ptr_b[g] = s.xt + blk * kBlk;
  arr.ptr_sfa[g] = s.s_dy + blk * s.N;
  arr.ptr_sfb[g] = s.s_x + blk * s.K;
  float* out = s.d + int64_t(g) * s.N * s.ldd;
  arr.ptr_c[g] = out;
  arr.ptr_d[g] = out;
  arr.stride_a[g] = cute::make_stride(int64_t(s.ld_t), cute::Int<1>{}, cute::Int<0>{});
  arr.stride_b[g] = cute::make_stride(int64_t(s.ld_t), cute::Int<1>{}, cute::Int<0>{});
  arr.stride_c[g] = cute::make_stride(int64_t(s.ldd), cute::Int<1>{}, cute::Int<0>{});
  arr.stride_d[g] = cute::make_stride(int64_t(s.ldd), cute::Int<1>{}, cute::Int<0>{});
  const auto problem = cute::make_shape(s.N, s.K, contraction, 1);
  arr.layout_sfa[g] = Cfg::ScaleConfig::tile_atom_to_shape_SFA(problem);
  arr.layout_sfb[g] = Cfg::ScaleConfig::tile_atom_to_shape_SFB(problem);
}

typename Cfg::Gemm::Arguments wgrad_arguments(const Arrays& arr, int G, float beta) {
  typename Cfg::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {G, arr.problem_shapes, nullptr},
      {arr.ptr_a, arr.stride_a, arr.ptr_b, arr.stride_b, arr.ptr_sfa, arr.layout_sfa, arr.ptr_sfb, arr.layout_sfb},
      {{}, arr.ptr_c, arr.stride_c, arr.ptr_d, arr.stride_d},
      sm90::hardware_info()};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = beta;
  return args;
}

}  // namespace

int64_t sm90_fp8_gemm_wgrad_128x1_workspace(int64_t G) {
  FRUGAL_CHECK(G >= 1, kName << ": G=" << G << " must be >= 1");
  Arrays arr{};
  auto args = wgrad_arguments(arr, static_cast<int>(G), 1.f);
  return static_cast<int64_t>(Arrays::bytes(G) + Cfg::Gemm::get_workspace_size(args));
}

void sm90_fp8_gemm_wgrad_128x1(std::uintptr_t dyt, std::uintptr_t s_dy, std::uintptr_t xt, std::uintptr_t s_x,
                               std::uintptr_t d, int64_t ldd, bool accumulate, std::uintptr_t token_offsets,
                               std::uintptr_t block_offsets, int64_t G, int64_t T, int64_t N, int64_t K, int64_t ld_t,
                               std::uintptr_t workspace, int64_t workspace_bytes, std::uintptr_t stream) {
  WgradSource s;
  s.dyt = as_ptr<const sm90::ElementFP8>(dyt);
  s.s_dy = as_ptr<const float>(s_dy);
  s.xt = as_ptr<const sm90::ElementFP8>(xt);
  s.s_x = as_ptr<const float>(s_x);
  s.d = as_ptr<float>(d);
  s.ldd = ldd;
  s.ld_t = ld_t;
  s.token_offsets = as_ptr<const int>(token_offsets);
  s.block_offsets = as_ptr<const int>(block_offsets);
  s.G = sm90::checked_int(G, "G", kName);
  s.T = sm90::checked_int(T, "T", kName);
  s.N = sm90::checked_int(N, "N", kName);
  s.K = sm90::checked_int(K, "K", kName);
  const bool grouped = token_offsets != 0;
  FRUGAL_CHECK(s.G >= 1 && s.N > 0 && s.K > 0, kName << ": G=" << G << ", N=" << N << ", K=" << K);
  FRUGAL_CHECK(grouped ? block_offsets != 0 : (G == 1 && T >= 1),
               kName << ": dense needs G == 1 and T >= 1 (G=" << G << ", T=" << T
                     << "); grouped needs block_offsets");
  FRUGAL_CHECK(ld_t % 16 == 0 && ld_t > 0 && dyt % 16 == 0 && xt % 16 == 0,
               kName << ": ld_t=" << ld_t << " must be a positive multiple of 16, dyt/xt 16-byte aligned (TMA)");
  FRUGAL_CHECK(grouped || ld_t >= T, kName << ": ld_t=" << ld_t << " < T=" << T);
  FRUGAL_CHECK(ldd >= K && ldd % 4 == 0 && d % 16 == 0,
               kName << ": ldd=" << ldd << " must be >= K=" << K << ", a multiple of 4, D 16-byte aligned");
  FRUGAL_CHECK(workspace % Arrays::kAlign == 0, kName << ": workspace must be " << Arrays::kAlign << "-byte aligned");
  const size_t arrays_bytes = Arrays::bytes(G);
  FRUGAL_CHECK(static_cast<size_t>(workspace_bytes) >= arrays_bytes,
               kName << ": workspace_bytes=" << workspace_bytes << " < " << arrays_bytes);
  auto st = as_stream(stream);
  Arrays arr = Arrays::carve(reinterpret_cast<void*>(workspace), G);
  setup_wgrad_args<<<(s.G + 127) / 128, 128, 0, st>>>(arr, s);
  FRUGAL_CHECK_LAUNCH();
  auto args = wgrad_arguments(arr, s.G, accumulate ? 1.f : 0.f);
  sm90::launch<Cfg::Gemm>(args, reinterpret_cast<char*>(workspace) + arrays_bytes,
                          workspace_bytes - static_cast<int64_t>(arrays_bytes), st, kName);
}

}  // namespace frugal::fp8
