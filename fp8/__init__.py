"""Fine-grained FP8 (E4M3) quantization, blockwise-scaled GEMMs and an FP8 Linear.

``HAS_CUDA_EXT`` tells whether the CUDA extension ``fp8._C`` was built and imports; it is evaluated on
first access (the extension is imported lazily). Every op runs its PyTorch reference on the CPU or when
the extension is absent.
"""

from __future__ import annotations

from fp8._ext import has_extension


def __getattr__(name: str):
    if name == "HAS_CUDA_EXT":
        return has_extension("fp8")
    raise AttributeError(f"module 'fp8' has no attribute {name!r}")
