// pybind11 module fp8._C: thin bindings over raw-pointer launchers (no libtorch). Every pointer, the stream
// and the workspace are integers from Python (fp8/_ext.py, fp8/cuda_gemm_ops.py); the launchers check sizes
// and alignment and raise RuntimeError with the values.
#include <pybind11/pybind11.h>

#include "fp8/gemm.h"
#include "fp8/quant.h"

namespace py = pybind11;
namespace f8 = frugal::fp8;

PYBIND11_MODULE(_C, m) {
  m.doc() = "frugal-parallel FP8 CUDA kernels (sm_90a). Raw device pointers and a cudaStream_t as integers.";
  m.attr("E4M3_MAX") = f8::kE4M3Max;
  m.attr("AMAX_FLOOR") = f8::kAmaxFloor;

  // ----------------------------------------------------------------------------------- quantization
  m.def("quant_per_token_1x128", &f8::quant_per_token_1x128, py::arg("x"), py::arg("x_dtype"), py::arg("q"),
        py::arg("scales"), py::arg("M"), py::arg("K"), py::arg("x_row_stride"), py::arg("scale_format"),
        py::arg("stream"),
        "Per-token 1x128 E4M3 quantization: x (M,K) -> q (M,K) e4m3, scales (M, ceil(K/128)) fp32.");
  m.def("quant_rowwise_colwise_128", &f8::quant_rowwise_colwise_128, py::arg("x"), py::arg("x_dtype"), py::arg("T"),
        py::arg("C"), py::arg("x_row_stride"), py::arg("q_row"), py::arg("s_row"), py::arg("qt_col"),
        py::arg("s_col"), py::arg("ld_t"), py::arg("n_blocks"), py::arg("token_offsets"), py::arg("block_offsets"),
        py::arg("G"), py::arg("scale_format"), py::arg("nonfinite_flag"), py::arg("stream"),
        "One pass over x (T, C): 1x128 rowwise (q_row, s_row) and/or 128x1 colwise transposed (qt_col (C, ld_t), "
        "s_col (n_blocks, C)); dense or per-expert token blocks.");
  m.def("quant_per_block_128x128", &f8::quant_per_block_128x128, py::arg("w"), py::arg("w_dtype"), py::arg("B"),
        py::arg("N"), py::arg("K"), py::arg("q"), py::arg("scales"), py::arg("scale_format"),
        py::arg("nonfinite_flag"), py::arg("stream"),
        "Per-block 128x128 E4M3 quantization: w (B,N,K) -> q (B,N,K), scales (B, ceil(N/128), ceil(K/128)).");
  m.def("token_block_offsets", &f8::token_block_offsets, py::arg("token_offsets"), py::arg("G"),
        py::arg("block_offsets"), py::arg("stream"),
        "blk[g] = sum_{h<g} max(1, ceil(T_h/128)) from token offsets (G+1,) int32, on the device.");

  // ------------------------------------------------------------------------------------------ GEMMs
  m.def("sm90_fp8_gemm_nt_1x128_128x128_bf16_workspace", &f8::sm90_fp8_gemm_nt_1x128_128x128_bf16_workspace,
        py::arg("M"), py::arg("N"), py::arg("K"));
  m.def("sm90_fp8_gemm_nt_1x128_128x128_bf16", &f8::sm90_fp8_gemm_nt_1x128_128x128_bf16, py::arg("a"),
        py::arg("lda"), py::arg("sfa"), py::arg("b"), py::arg("ldb"), py::arg("sfb"), py::arg("d"), py::arg("ldd"),
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("stream"), "D (M,N) bf16 = A (M,K) e4m3 [1x128] . B (N,K)^T e4m3 [128x128].");
  m.def("sm90_fp8_gemm_nt_1x128_128x128_f32_workspace", &f8::sm90_fp8_gemm_nt_1x128_128x128_f32_workspace,
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("accumulate"));
  m.def("sm90_fp8_gemm_nt_1x128_128x128_f32", &f8::sm90_fp8_gemm_nt_1x128_128x128_f32, py::arg("a"),
        py::arg("lda"), py::arg("sfa"), py::arg("b"), py::arg("ldb"), py::arg("sfb"), py::arg("d"), py::arg("ldd"),
        py::arg("accumulate"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"),
        "D (M,N) fp32 (+)= A (M,K) e4m3 [1x128] . B (N,K)^T e4m3 [128x128].");
  m.def("sm90_m_grouped_fp8_gemm_nt_workspace", &f8::sm90_m_grouped_fp8_gemm_nt_workspace, py::arg("G"),
        py::arg("out_dtype"));
  m.def("sm90_m_grouped_fp8_gemm_nt_contiguous", &f8::sm90_m_grouped_fp8_gemm_nt_contiguous, py::arg("a"),
        py::arg("sfa"), py::arg("b"), py::arg("sfb"), py::arg("d"), py::arg("ldd"), py::arg("out_dtype"),
        py::arg("m_offsets"), py::arg("G"), py::arg("M_total"), py::arg("N"), py::arg("K"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"),
        "Experts, contiguous rows: D[off[g]:off[g+1]] (bf16/fp32) = A[off[g]:off[g+1]] . B[g]^T.");
  m.def("sm90_m_grouped_fp8_gemm_nt_masked", &f8::sm90_m_grouped_fp8_gemm_nt_masked, py::arg("a"), py::arg("sfa"),
        py::arg("b"), py::arg("sfb"), py::arg("d"), py::arg("ldd"), py::arg("out_dtype"), py::arg("masked_m"),
        py::arg("G"), py::arg("M_max"), py::arg("N"), py::arg("K"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("stream"), "Experts, padded batch: D[g, :masked_m[g]] = A[g, :masked_m[g]] . B[g]^T; other rows 0.");
  m.def("sm90_fp8_gemm_wgrad_128x1_workspace", &f8::sm90_fp8_gemm_wgrad_128x1_workspace, py::arg("G"));
  m.def("sm90_fp8_gemm_wgrad_128x1", &f8::sm90_fp8_gemm_wgrad_128x1, py::arg("dyt"), py::arg("s_dy"),
        py::arg("xt"), py::arg("s_x"), py::arg("d"), py::arg("ldd"), py::arg("accumulate"),
        py::arg("token_offsets"), py::arg("block_offsets"), py::arg("G"), py::arg("T"), py::arg("N"), py::arg("K"),
        py::arg("ld_t"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        "Weight grad: D[g] (N,K) fp32 (+)= dY_g^T . X_g over tokens, operands 128x1-scaled and token-contiguous.");
}
