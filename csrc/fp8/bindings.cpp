// pybind11 module fp8._C: thin bindings over raw-pointer launchers (no libtorch).
#include <pybind11/pybind11.h>

#include "fp8/quant.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "frugal-parallel FP8 CUDA kernels (sm_90a). Raw device pointers and a cudaStream_t as integers.";
  m.attr("E4M3_MAX") = frugal::fp8::kE4M3Max;
  m.attr("AMAX_FLOOR") = frugal::fp8::kAmaxFloor;
  m.def("quant_per_token_1x128", &frugal::fp8::quant_per_token_1x128, py::arg("x"), py::arg("x_dtype"),
        py::arg("q"), py::arg("scales"), py::arg("M"), py::arg("K"), py::arg("x_row_stride"),
        py::arg("scale_format"), py::arg("stream"),
        "Per-token 1x128 E4M3 quantization: x (M,K) -> q (M,K) e4m3, scales (M, ceil(K/128)) fp32.");
}
