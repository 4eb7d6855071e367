// dtype codes shared by the Python wrappers and the kernels (keep in sync with fp8/_ext.py DTYPE_CODES).
#pragma once

namespace frugal {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat8E4M3 = 3 };

// Scale formats of fine-grained FP8 quantization (fp8/quant.py ScaleFormat):
//   kFP32  scale = amax / 448
//   kPow2  scale rounded up to a power of two (exact rescaling, as TransformerEngine's block scaling)
//   kUE8M0 as kPow2; stored as fp32 here, packable to an 8-bit biased exponent by the caller.
enum class ScaleFormat : int { kFP32 = 0, kPow2 = 1, kUE8M0 = 2 };

}  // namespace frugal
