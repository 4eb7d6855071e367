"""Test-side references for the CUDA backend (fp8/cuda_gemm_ops.py), in plain PyTorch on any device."""

from __future__ import annotations

import torch

import fp8
from fp8.quant import BLOCK, ceil_div


def grouped_colwise_reference(
    x: torch.Tensor, offsets: list[int], fmt: fp8.ScaleFormat = fp8.ScaleFormat.FP32
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The layout quant_colwise_grouped must write, built from fp8.quantize_128x1 one expert at a time.

    Returns (qt (C, ld_t) e4m3, scale (T//128 + G, C) fp32, block_offsets (G+1) as a list). Expert g's tokens
    are quantized per 128 from its first token and stored transposed from column 128 * blk[g]; an expert
    without tokens owns one block of zeros (scale of an all-zero block). Blocks past blk[G] stay zero here
    (the kernel leaves them untouched: compare only [:blk[G]]).
    """
    t, c = x.shape
    g = len(offsets) - 1
    counts = [max(0, offsets[e + 1] - offsets[e]) for e in range(g)]
    blk = [0]
    for n in counts:
        blk.append(blk[-1] + max(1, ceil_div(n, BLOCK)))
    n_blocks = t // BLOCK + g
    qt = torch.zeros(c, n_blocks * BLOCK, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.zeros(n_blocks, c, dtype=torch.float32, device=x.device)
    for e in range(g):
        lo, n = offsets[e], counts[e]
        q = fp8.quantize_128x1(x[lo : lo + n] if n else torch.zeros(1, c, dtype=x.dtype, device=x.device),
                               scale_format=fmt)  # fmt: skip
        qt[:, blk[e] * BLOCK : blk[e] * BLOCK + n] = q.data.t()[:, :n]
        scale[blk[e] : blk[e] + q.scale.shape[0]] = q.scale
    return qt, scale, blk


def grouped_wgrad_fp32(dy: torch.Tensor, x: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """(G, N, K) = per-expert dy[rows].T @ x[rows] in float32 of the unquantized inputs."""
    g = len(offsets) - 1
    out = torch.zeros(g, dy.shape[1], x.shape[1], dtype=torch.float32, device=dy.device)
    for e in range(g):
        lo, hi = offsets[e], offsets[e + 1]
        out[e] = dy[lo:hi].float().t() @ x[lo:hi].float()
    return out
