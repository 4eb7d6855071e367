"""Small helpers shared by fp8's CUDA op wrappers (cuda_quant_ops.py, cuda_gemm_ops.py)."""

from __future__ import annotations

import torch

from fp8._ext import require_extension
from fp8.quant import ScaleFormat

FP8_DTYPE = torch.float8_e4m3fn
FORMATS = {f.code: f for f in ScaleFormat}


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def ext():
    """The built fp8._C module, or a RuntimeError saying how to build it."""
    return require_extension("fp8")


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)
