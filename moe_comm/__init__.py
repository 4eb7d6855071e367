"""Expert-parallel dispatch/combine over all-to-all: node-limited routing, FP8 payloads, overlap.

``HAS_CUDA_EXT`` tells whether ``moe_comm._C`` (permute/unpermute kernels) was built; evaluated lazily.
"""

from __future__ import annotations

from fp8._ext import has_extension


def __getattr__(name: str):
    if name == "HAS_CUDA_EXT":
        return has_extension("moe_comm")
    raise AttributeError(f"module 'moe_comm' has no attribute {name!r}")
