// Error checks and launch helpers shared by every frugal-parallel CUDA module.
//
// Kernels never link libtorch: they take raw device pointers, sizes and a cudaStream_t passed from
// Python as an integer (torch.cuda.current_stream().cuda_stream). Errors surface as C++ exceptions,
// which pybind11 turns into Python RuntimeError with the message built here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace frugal {

[[noreturn]] inline void fail(const char* file, int line, const std::string& what) {
  std::ostringstream os;
  os << "frugal-parallel CUDA error at " << file << ":" << line << ": " << what;
  throw std::runtime_error(os.str());
}

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

template <typename T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace frugal

#define FRUGAL_CUDA_CHECK(expr)                                                         \
  do {                                                                                  \
    cudaError_t _frugal_err = (expr);                                                   \
    if (_frugal_err != cudaSuccess) {                                                   \
      ::frugal::fail(__FILE__, __LINE__, std::string(#expr) + " -> " +                  \
                                             cudaGetErrorString(_frugal_err));          \
    }                                                                                   \
  } while (0)

// Argument check with the value in the message, e.g. FRUGAL_CHECK(K > 0, "K=" << K << " must be > 0").
#define FRUGAL_CHECK(cond, msg)                        \
  do {                                                 \
    if (!(cond)) {                                     \
      std::ostringstream _frugal_os;                   \
      _frugal_os << msg;                               \
      ::frugal::fail(__FILE__, __LINE__, _frugal_os.str()); \
    }                                                  \
  } while (0)

// Check the launch itself (bad configuration); asynchronous faults surface at the next sync.
#define FRUGAL_CHECK_LAUNCH() FRUGAL_CUDA_CHECK(cudaGetLastError())
