"""Similarity metric of GEMM results (DESIGN.md, Numerics conventions; DeepGEMM's metric)."""

from __future__ import annotations

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2 * sum(x * y) / sum(x * x + y * y)`` in float64: 0 for identical tensors, about the relative
    squared error ``|x - y|^2 / (2 |x|^2)`` for close ones, 1 for orthogonal ones. FP8 GEMMs must stay below
    1e-3 against an FP32 GEMM of the unquantized inputs. Two all-zero tensors give 0.
    """
    if x.shape != y.shape:
        raise ValueError(f"calc_diff: x.shape={tuple(x.shape)} and y.shape={tuple(y.shape)} must match")
    x, y = x.detach().double(), y.detach().double()
    denominator = (x * x + y * y).sum()
    if float(denominator) == 0.0:
        return 0.0
    return float(1.0 - 2.0 * (x * y).sum() / denominator)
