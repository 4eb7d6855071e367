// CUTLASS 4.x type definitions and launch helpers shared by the sm90 blockwise-scaled FP8 GEMMs.
//
// Every GEMM here is "NT" in BLAS terms: D (M, N) = A (M, K) . B (N, K)^T with both operands K-major
// (rows of A and rows of B contiguous along K), as Hopper's FP8 WGMMA requires. The scales multiply the
// FP32 partial sum of every 128-wide K slice before it is added to the FP32 accumulator ("promotion"):
//
//   D[m, n] = sum_kb  sfa[m, kb] * sfb[n / gn, kb] * sum_{k in slice kb} A[m, k] * B[n, k]
//
// Two scale configurations cover DeepSeek-V3's recipe:
//   ScaleConfigNT     A: one scale per row per 128 K (1x128 activations), K-major in memory = the
//                     row-major (M, ceil(K/128)) scales of fp8.FP8Tensor, loaded with cp.async (no TMA
//                     alignment rule on M, so contiguous expert segments may start at any row);
//                     B: one scale per 128x128 block, row-major (ceil(N/128), ceil(K/128)).
//   ScaleConfigWgrad  both operands one scale per row per 128 along the contraction (= tokens); the scales
//                     are stored token-block-major, (ceil(T/128), rows) row-major, which is what
//                     fp8.quantize_128x1 produces for dY and X.
//
// One tile configuration per family (128x128x128, two consumer warpgroups, warp-specialized TMA
// producer, persistent), chosen so the whole CUDA build stays within CI's compile budget.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "common/check.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler_params.h"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/numeric_types.h"

namespace frugal::fp8::sm90 {

using namespace cute;

using ElementFP8 = cutlass::float_e4m3_t;  // same bits as torch.float8_e4m3fn
using ElementAcc = float;
using ElementScale = float;
constexpr int kAlignFP8 = 16;  // elements: TMA moves 16-byte aligned rows
using TileShape = Shape<_128, _128, _128>;

using ScaleConfigNT =
    cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>;
using ScaleConfigWgrad =
    cutlass::detail::Sm90BlockwiseScaleConfig<1, 1, 128, cute::GMMA::Major::MN, cute::GMMA::Major::MN>;

template <class T>
constexpr int align_of_output() {
  if constexpr (cute::is_void_v<T>) {
    return 8;
  } else {
    return 128 / cutlass::sizeof_bits<T>::value;
  }
}

// ------------------------------------------------------------------------------------ dense (one problem)
// D (M, N) row-major of ElementD; C (ElementC, void = no source) row-major, D = acc + beta * C.
template <class ElementD_, class ElementC_>
struct DenseGemmNT {
  using ElementD = ElementD_;
  using ElementC = ElementC_;
  using ScaleConfig = ScaleConfigNT;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
  // A pair of CTAs along N shares (multicasts) the A tile: halves A's L2->SM traffic.
  using ClusterShape = Shape<_1, _2, _1>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc, ElementC, cutlass::layout::RowMajor,
      align_of_output<ElementC>(), ElementD, cutlass::layout::RowMajor, align_of_output<ElementD>(),
      cutlass::epilogue::TmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAcc, ElementC, ElementAcc>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementFP8,
      cute::tuple<cutlass::layout::RowMajor, LayoutSFA>, kAlignFP8, ElementFP8,
      cute::tuple<cutlass::layout::ColumnMajor, LayoutSFB>, kAlignFP8, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;

  // Stream-K: small-M shapes (M = 64 or 128 tokens against N = 2112) have fewer output tiles than SMs; the
  // scheduler then splits K across SMs and reduces the partial tiles in a fixed order (deterministic mode).
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::StreamKScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;
};

// ------------------------------------------------------------------- grouped (pointer array, per group)
// Problem g: D_g (M_g, N_g) = A_g (M_g, K_g) . B_g (N_g, K_g)^T, shapes and pointers read from device memory
// (filled by a setup kernel from per-expert offsets, so no host sync is needed).
template <class ElementD_, class ElementC_, class ScaleConfig_>
struct GroupedGemmNT {
  using ElementD = ElementD_;
  using ElementC = ElementC_;
  using ScaleConfig = ScaleConfig_;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
  using ClusterShape = Shape<_1, _1, _1>;
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc, ElementC, cutlass::layout::RowMajor*,
      align_of_output<ElementC>(), ElementD, cutlass::layout::RowMajor*, align_of_output<ElementD>(),
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAcc, ElementC, ElementAcc>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementFP8,
      cute::tuple<cutlass::layout::RowMajor*, LayoutSFA*>, kAlignFP8, ElementFP8,
      cute::tuple<cutlass::layout::ColumnMajor*, LayoutSFB*>, kAlignFP8, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideC = typename Kernel::InternalStrideC;
  using StrideD = typename Kernel::InternalStrideD;
  using UnderlyingProblemShape = typename ProblemShape::UnderlyingProblemShape;
};

// Device-side argument arrays of a grouped GEMM, carved out of one workspace allocation.
template <class Cfg>
struct GroupedArgArrays {
  using ElementC = cute::conditional_t<cute::is_void_v<typename Cfg::ElementC>, typename Cfg::ElementD,
                                       typename Cfg::ElementC>;
  typename Cfg::UnderlyingProblemShape* problem_shapes;
  ElementFP8 const** ptr_a;
  ElementFP8 const** ptr_b;
  ElementScale const** ptr_sfa;
  ElementScale const** ptr_sfb;
  ElementC const** ptr_c;
  typename Cfg::ElementD** ptr_d;
  typename Cfg::StrideA* stride_a;
  typename Cfg::StrideB* stride_b;
  typename Cfg::StrideC* stride_c;
  typename Cfg::StrideD* stride_d;
  typename Cfg::LayoutSFA* layout_sfa;
  typename Cfg::LayoutSFB* layout_sfb;

  static constexpr size_t kAlign = 256;
  static size_t round_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

  // Bytes for G groups (the arrays only; CUTLASS's own workspace is placed after them).
  static size_t bytes(int64_t G) {
    size_t g = static_cast<size_t>(G);
    return round_up(g * sizeof(typename Cfg::UnderlyingProblemShape)) + 6 * round_up(g * sizeof(void*)) +
           round_up(g * sizeof(typename Cfg::StrideA)) + round_up(g * sizeof(typename Cfg::StrideB)) +
           round_up(g * sizeof(typename Cfg::StrideC)) + round_up(g * sizeof(typename Cfg::StrideD)) +
           round_up(g * sizeof(typename Cfg::LayoutSFA)) + round_up(g * sizeof(typename Cfg::LayoutSFB));
  }

  static GroupedArgArrays carve(void* base, int64_t G) {
    size_t g = static_cast<size_t>(G);
    char* p = static_cast<char*>(base);
    auto take = [&](size_t n) {
      char* q = p;
      p += round_up(n);
      return q;
    };
    GroupedArgArrays a;
    a.problem_shapes = reinterpret_cast<typename Cfg::UnderlyingProblemShape*>(
        take(g * sizeof(typename Cfg::UnderlyingProblemShape)));
    a.ptr_a = reinterpret_cast<ElementFP8 const**>(take(g * sizeof(void*)));
    a.ptr_b = reinterpret_cast<ElementFP8 const**>(take(g * sizeof(void*)));
    a.ptr_sfa = reinterpret_cast<ElementScale const**>(take(g * sizeof(void*)));
    a.ptr_sfb = reinterpret_cast<ElementScale const**>(take(g * sizeof(void*)));
    a.ptr_c = reinterpret_cast<ElementC const**>(take(g * sizeof(void*)));
    a.ptr_d = reinterpret_cast<typename Cfg::ElementD**>(take(g * sizeof(void*)));
    a.stride_a = reinterpret_cast<typename Cfg::StrideA*>(take(g * sizeof(typename Cfg::StrideA)));
    a.stride_b = reinterpret_cast<typename Cfg::StrideB*>(take(g * sizeof(typename Cfg::StrideB)));
    a.stride_c = reinterpret_cast<typename Cfg::StrideC*>(take(g * sizeof(typename Cfg::StrideC)));
    a.stride_d = reinterpret_cast<typename Cfg::StrideD*>(take(g * sizeof(typename Cfg::StrideD)));
    a.layout_sfa = reinterpret_cast<typename Cfg::LayoutSFA*>(take(g * sizeof(typename Cfg::LayoutSFA)));
    a.layout_sfb = reinterpret_cast<typename Cfg::LayoutSFB*>(take(g * sizeof(typename Cfg::LayoutSFB)));
    return a;
  }
};

// ------------------------------------------------------------------------------------------ host helpers

// SM count of the current device, queried once per device (CUTLASS's persistent schedulers size the grid).
inline cutlass::KernelHardwareInfo hardware_info() {
  constexpr int kMaxDevices = 64;
  static int sm_counts[kMaxDevices] = {};
  int device = 0;
  FRUGAL_CUDA_CHECK(cudaGetDevice(&device));
  FRUGAL_CHECK(device >= 0 && device < kMaxDevices, "device index " << device << " >= " << kMaxDevices);
  if (sm_counts[device] == 0) {
    FRUGAL_CUDA_CHECK(cudaDeviceGetAttribute(&sm_counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_counts[device];
  return hw;
}

#define FRUGAL_CUTLASS_CHECK(expr, name)                                                                    \
  do {                                                                                                      \
    cutlass::Status _frugal_status = (expr);                                                                \
    FRUGAL_CHECK(_frugal_status == cutlass::Status::kSuccess,                                               \
                 name << ": " << #expr << " -> " << cutlassGetStatusString(_frugal_status));                 \
  } while (0)

// can_implement -> workspace check -> initialize -> launch, all on `stream`.
template <class Gemm>
void launch(typename Gemm::Arguments const& args, void* workspace, int64_t workspace_bytes, cudaStream_t stream,
            const char* name) {
  Gemm gemm;
  FRUGAL_CUTLASS_CHECK(gemm.can_implement(args), name);
  const size_t need = Gemm::get_workspace_size(args);
  FRUGAL_CHECK(static_cast<size_t>(workspace_bytes) >= need,
               name << ": workspace_bytes=" << workspace_bytes << " < " << need << " needed");
  FRUGAL_CUTLASS_CHECK(gemm.initialize(args, need ? workspace : nullptr, stream), name);
  FRUGAL_CUTLASS_CHECK(gemm.run(stream), name);
  FRUGAL_CHECK_LAUNCH();
}


// ------------------------------------------------------------------------------------ dense arguments

inline int checked_int(int64_t v, const char* what, const char* name) {
  FRUGAL_CHECK(v >= 0 && v <= INT32_MAX, name << ": " << what << "=" << v << " must be in [0, 2^31)");
  return static_cast<int>(v);
}

// Arguments of DenseGemmNT<...> for D (M, N) = A (M, K) . B (N, K)^T (+ beta * C, C = D when beta != 0).
template <class Cfg>
typename Cfg::Gemm::Arguments dense_arguments(std::uintptr_t a, int64_t lda, std::uintptr_t sfa, std::uintptr_t b,
                                              int64_t ldb, std::uintptr_t sfb, std::uintptr_t d, int64_t ldd,
                                              float beta, int64_t M64, int64_t N64, int64_t K64, const char* name) {
  const int M = checked_int(M64, "M", name), N = checked_int(N64, "N", name), K = checked_int(K64, "K", name);
  FRUGAL_CHECK(lda >= K && ldb >= K && ldd >= N,
               name << ": lda=" << lda << ", ldb=" << ldb << " must be >= K=" << K << " and ldd=" << ldd
                    << " >= N=" << N);
  FRUGAL_CHECK(lda % kAlignFP8 == 0 && ldb % kAlignFP8 == 0 && a % 16 == 0 && b % 16 == 0,
               name << ": lda=" << lda << ", ldb=" << ldb
                    << " must be multiples of 16 and A, B 16-byte aligned (TMA)");
  constexpr int kAlignD = align_of_output<typename Cfg::ElementD>();
  FRUGAL_CHECK(ldd % kAlignD == 0 && d % 16 == 0,
               name << ": ldd=" << ldd << " must be a multiple of " << kAlignD << " and D 16-byte aligned (TMA)");
  // CUTLASS's can_implement also wants the contiguous extents aligned (the wrappers zero-pad K and N).
  FRUGAL_CHECK(K % kAlignFP8 == 0 && N % kAlignD == 0,
               name << ": K=" << K << " must be a multiple of 16 and N=" << N << " of " << kAlignD
                    << " (zero-pad the operands: padding adds nothing)");
  using Gemm = typename Cfg::Gemm;
  using ElementD = typename Cfg::ElementD;
  typename Cfg::StrideA stride_a = cute::make_stride(lda, cute::Int<1>{}, int64_t(M) * lda);
  typename Cfg::StrideB stride_b = cute::make_stride(ldb, cute::Int<1>{}, int64_t(N) * ldb);
  typename Cfg::StrideD stride_d = cute::make_stride(ldd, cute::Int<1>{}, int64_t(M) * ldd);
  auto problem = cute::make_shape(M, N, K, 1);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {reinterpret_cast<ElementFP8 const*>(a), stride_a, reinterpret_cast<ElementFP8 const*>(b), stride_b,
       reinterpret_cast<ElementScale const*>(sfa), Cfg::ScaleConfig::tile_atom_to_shape_SFA(problem),
       reinterpret_cast<ElementScale const*>(sfb), Cfg::ScaleConfig::tile_atom_to_shape_SFB(problem)},
      {{}, nullptr, {}, reinterpret_cast<ElementD*>(d), stride_d},
      hardware_info()};
  if constexpr (!cute::is_void_v<typename Cfg::ElementC>) {
    args.epilogue.ptr_C = reinterpret_cast<typename Cfg::ElementC const*>(d);  // in place: C = D
    args.epilogue.dC = cute::make_stride(ldd, cute::Int<1>{}, int64_t(M) * ldd);
  }
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = beta;
  return args;
}

}  // namespace frugal::fp8::sm90
