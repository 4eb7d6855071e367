"""Per-call backend choice for the FP8 GEMMs: "cuda" > "torch" > "reference".

A backend has an ``available(device) -> (ok, reason)`` check and one implementation per op it supports.
``select_backend(op, device)`` returns the first backend (by priority) that is available on the device
and implements the op; ``backend="name"`` (or the ``FRUGAL_FP8_BACKEND`` environment variable) forces one
and raises ``RuntimeError`` with the reason when it cannot run: the choice is never silently different
from what was asked for.

Backends and what they implement:

* ``cuda``      the csrc/fp8 kernels (fp8._C). Its op implementations live in ``fp8/cuda_gemm_ops.py``,
                imported the first time a CUDA device is checked; that module calls
                ``register_impl(op, "cuda")(fn)`` for each op it provides.
* ``torch``     torch's blockwise ``F.scaled_mm`` (1x128 x 128x128, Hopper with cuBLASLt >= 12.9): gemm only.
* ``reference`` plain PyTorch (fp8/gemm.py, fp8/grouped.py), any device: the CPU path and the test oracle.

Every implementation takes already-quantized, validated operands (quantization is chosen by device in
fp8/quant.py); the signatures are

    gemm(a, b, *, out_dtype, out, accumulate) -> (M, N)            a FP8Tensor (1,128), b FP8Tensor (128,128)
    gemm_wgrad(dy, x, *, out, accumulate) -> (N, K) float32         dy, x FP8Tensor (128,1)
    grouped_gemm_contiguous(a, b, m_offsets, host_offsets, *, out_dtype, out) -> (sum M_g, N)
    grouped_gemm_masked(a, b, masked_m, host_masked_m, *, out_dtype, out) -> (G, M_max, N)

where ``host_*`` is the same index tensor when the caller passed it on the CPU, else None (read the
device tensor: no host sync).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

OPS = ("gemm", "gemm_wgrad", "grouped_gemm_contiguous", "grouped_gemm_masked")
ENV_BACKEND = "FRUGAL_FP8_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int  # lower is tried first
    available: Callable[[torch.device], tuple[bool, str]]
    description: str


_BACKENDS: dict[str, Backend] = {}
_IMPLS: dict[tuple[str, str], Callable] = {}


def register_backend(
    name: str, *, priority: int, available: Callable[[torch.device], tuple[bool, str]], description: str = ""
) -> Backend:
    """Add (or replace) a backend. ``available(device)`` must be cheap: it runs on every call."""
    backend = Backend(name, priority, available, description)
    _BACKENDS[name] = backend
    return backend


def register_impl(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` (one of OPS) for ``backend``."""
    if op not in OPS:
        raise ValueError(f"{op=} is not an FP8 op; known ops: {OPS}")

    def deco(fn: Callable) -> Callable:
        _IMPLS[(op, backend)] = fn
        return fn

    return deco


def backends() -> list[Backend]:
    return sorted(_BACKENDS.values(), key=lambda b: b.priority)


def select_backend(op: str, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """``(name, implementation)`` of the backend that runs ``op`` on ``device``.

    backend: None (or "auto") picks the best available; a name forces that backend and raises
    RuntimeError with the reason if it is unavailable on ``device`` or lacks ``op``.
    """
    if op not in OPS:
        raise ValueError(f"{op=} is not an FP8 op; known ops: {OPS}")
    forced = backend if backend is not None else os.environ.get(ENV_BACKEND) or None
    if forced is not None and forced != "auto":
        source = "backend" if backend is not None else ENV_BACKEND
        if forced not in _BACKENDS:
            raise ValueError(
                f"{source}={forced!r} is not an FP8 backend; use one of {list(_BACKENDS)} or 'auto'"
            )
        ok, reason = _BACKENDS[forced].available(device)
        if not ok:
            raise RuntimeError(
                f"{source}={forced!r} was asked for {op} on {device} but is unavailable: {reason}"
            )
        impl = _IMPLS.get((op, forced))
        if impl is None:
            raise RuntimeError(f"{source}={forced!r} has no implementation of {op}")
        return forced, impl
    for b in backends():  # availability first: the cuda check imports the module that registers its impls
        ok, _ = b.available(device)
        if ok and (op, b.name) in _IMPLS:
            return b.name, _IMPLS[(op, b.name)]
    raise RuntimeError(f"no FP8 backend implements {op} on {device}")  # unreachable: reference runs anywhere


def backend_report(device: torch.device | str) -> dict[str, str]:
    """For each backend: "ok" or why it is unavailable on ``device`` (for logs and benchmarks)."""
    device = torch.device(device)
    report = {}
    for b in backends():
        ok, reason = b.available(device)
        report[b.name] = "ok" if ok else reason
    return report


# --- availability of the built-in backends -----------------------------------------------------------------


def _on_cuda(device: torch.device, name: str) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"the {name} backend needs CUDA tensors; the operands are on {device}"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, ""


def _is_hopper(device: torch.device) -> tuple[bool, str]:
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return False, f"needs a Hopper GPU (sm_90); {device} is sm_{major}{minor}"
    return True, ""


_CUDA_PLUGIN = "fp8.cuda_gemm_ops"
_cuda_plugin_reason: str | None = None


def _cuda_available(device: torch.device) -> tuple[bool, str]:
    global _cuda_plugin_reason
    ok, reason = _on_cuda(device, "cuda")
    if not ok:
        return ok, reason
    from fp8._ext import load_extension

    mod, reason = load_extension("fp8")
    if mod is None:
        return False, reason
    if _cuda_plugin_reason is None:  # import the op wrappers once; they register their implementations
        try:
            importlib.import_module(_CUDA_PLUGIN)
            _cuda_plugin_reason = ""
        except ModuleNotFoundError as e:
            if e.name != _CUDA_PLUGIN:
                raise
            _cuda_plugin_reason = f"{_CUDA_PLUGIN} (the CUDA GEMM wrappers) is not present in this install"
    if _cuda_plugin_reason:
        return False, _cuda_plugin_reason
    return _is_hopper(device)


def _torch_available(device: torch.device) -> tuple[bool, str]:
    ok, reason = _on_cuda(device, "torch")
    if not ok:
        return ok, reason
    import torch.nn.functional as F

    if not hasattr(F, "scaled_mm") or not hasattr(F.ScalingType, "BlockWise1x128"):
        return False, f"torch {torch.__version__} has no blockwise F.scaled_mm (ScalingType.BlockWise1x128)"
    if torch.version.hip is not None:
        return False, "blockwise 1x128 x 128x128 scaled_mm is a cuBLASLt (CUDA) feature; this is a ROCm torch"
    cuda = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    if cuda < (12, 9):
        return (
            False,
            f"blockwise scaled_mm needs cuBLASLt from CUDA >= 12.9; torch is built with {torch.version.cuda}",
        )
    return _is_hopper(device)


register_backend(
    "cuda", priority=0, available=_cuda_available, description="csrc/fp8 CUTLASS kernels (fp8._C), sm_90a"
)
register_backend(
    "torch", priority=1, available=_torch_available, description="torch F.scaled_mm BlockWise1x128 x 128x128"
)
register_backend(
    "reference", priority=2, available=lambda device: (True, ""), description="plain PyTorch, any device"
)
