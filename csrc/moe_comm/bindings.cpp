// pybind11 module moe_comm._C: thin bindings over raw-pointer launchers (no libtorch). Pointers and the stream
// are integers from Python (moe_comm/cuda_ops.py); the launchers check sizes and raise RuntimeError with values.
#include <pybind11/pybind11.h>

#include "moe_comm/permute.h"

namespace py = pybind11;
namespace mo = frugal::moe;

PYBIND11_MODULE(_C, m) {
  m.doc() = "frugal-parallel expert-parallel permute/unpermute kernels. Raw device pointers and a cudaStream_t.";
  m.def("gather_rows", &mo::gather_rows, py::arg("src"), py::arg("src_stride_bytes"), py::arg("index"), py::arg("n"),
        py::arg("row_bytes"), py::arg("dst"), py::arg("dst_stride_bytes"), py::arg("stream"),
        "dst[i] = src[index[i]] (rows of row_bytes bytes); index < 0 writes a zero row.");
  m.def("weighted_sum_rows", &mo::weighted_sum_rows, py::arg("rows"), py::arg("rows_dtype"), py::arg("rows_stride"),
        py::arg("index"), py::arg("weights"), py::arg("T"), py::arg("K"), py::arg("H"), py::arg("out"),
        py::arg("out_dtype"), py::arg("stream"),
        "out[t] = sum_k w[t,k] * rows[index[t,k]] in FP32, k ascending, mul and add separately rounded.");
  m.def("pack_rows_fp8_1x128", &mo::pack_rows_fp8_1x128, py::arg("x"), py::arg("x_dtype"), py::arg("x_stride"),
        py::arg("index"), py::arg("n"), py::arg("H"), py::arg("packed"), py::arg("packed_row_bytes"),
        py::arg("scale_offset"), py::arg("scale_format"), py::arg("stream"),
        "Packed dispatch rows: x[index[i]] quantized 1x128 to e4m3 (H bytes) + fp32 scales at scale_offset.");
}
