"""Lazy loading of the optional CUDA extensions (``fp8._C``, ``moe_comm._C``).

The extensions are plain pybind11 modules that take raw device pointers and a stream handle (they never
link libtorch), built only when ``FRUGAL_CUDA`` enabled them at install time. Nothing here imports them
at package import: the first call to :func:`load_extension` tries once and caches the outcome, so a
pure-Python install costs nothing and says why the fast path is missing when one is asked for.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# dtype codes understood by the kernels (csrc/common/dtypes.h DType).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.float8_e4m3fn: 3,
}

_cache: dict[str, tuple[ModuleType | None, str]] = {}


def load_extension(package: str) -> tuple[ModuleType | None, str]:
    """Import ``<package>._C`` once. Returns ``(module, "")`` or ``(None, reason)``."""
    if package not in _cache:
        try:
            mod: ModuleType | None = importlib.import_module(f"{package}._C")
            reason = ""
        except ImportError as e:  # not built (FRUGAL_CUDA=OFF / AUTO without CUDA torch) or broken
            mod = None
            reason = (
                f"the CUDA extension {package}._C is not available ({e}); reinstall with FRUGAL_CUDA=ON "
                "(pip install --no-build-isolation -e .) on a machine with nvcc and a CUDA-enabled torch"
            )
        _cache[package] = (mod, reason)
    return _cache[package]


def has_extension(package: str) -> bool:
    return load_extension(package)[0] is not None


def require_extension(package: str) -> ModuleType:
    """The extension module, or a RuntimeError that says why it is missing and how to build it."""
    mod, reason = load_extension(package)
    if mod is None:
        raise RuntimeError(reason)
    return mod


def stream_handle(device: torch.device) -> int:
    """The raw ``cudaStream_t`` of the current torch stream on ``device``, as the kernels take it."""
    return int(torch.cuda.current_stream(device).cuda_stream)
