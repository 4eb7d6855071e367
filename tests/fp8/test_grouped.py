"""Grouped FP8 GEMMs for experts: contiguous and masked layouts vs per-expert fp8.gemm and FP32."""

from __future__ import annotations

import pytest
import torch

import fp8


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sizes", [[0, 1, 127, 130, 0, 257], [5], [0, 0, 3]])
@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64])
def test_contiguous_equals_per_group_gemm(sizes, offset_dtype):
    g, n, k = len(sizes), 136, 200
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=offset_dtype)
    a, b = _randn(sum(sizes), k, seed=1), _randn(g, n, k, seed=2)
    y = fp8.grouped_gemm_contiguous(a, b, offsets, out_dtype=torch.float32)
    assert y.shape == (sum(sizes), n)
    for e in range(g):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi > lo:  # bitwise the same as one gemm per expert (same quantization, same reference)
            assert torch.equal(y[lo:hi], fp8.gemm(a[lo:hi], b[e], out_dtype=torch.float32))
    reference = torch.cat([a[offsets[e] : offsets[e + 1]] @ b[e].T for e in range(g)])
    if sum(sizes) > 50:
        assert fp8.calc_diff(y, reference) < 1e-3


def test_contiguous_prequantized_and_out():
    sizes = [3, 0, 140]
    offsets = torch.tensor([0, 3, 3, 143])
    a, b = _randn(143, 300, seed=3), _randn(3, 64, 300, seed=4)
    out = torch.full((143, 64), float("nan"), dtype=torch.bfloat16)
    y = fp8.grouped_gemm_contiguous(fp8.quantize_1x128(a), fp8.quantize_128x128(b), offsets, out=out)
    assert y is out and bool(torch.isfinite(out.float()).all())
    assert torch.equal(out, fp8.grouped_gemm_contiguous(a, b, offsets))
    assert sum(sizes) == 143


def test_masked_equals_per_group_gemm_and_zero_padding():
    g, m_max, n, k = 4, 140, 72, 260
    masked_m = torch.tensor([0, 5, 140, 1], dtype=torch.int32)
    a, b = _randn(g, m_max, k, seed=5), _randn(g, n, k, seed=6)
    for e, m in enumerate(masked_m.tolist()):  # padding rows hold garbage: NaN and huge values
        a[e, m:] = float("nan") if e % 2 else 1e30
    out = torch.full((g, m_max, n), float("nan"))
    y = fp8.grouped_gemm_masked(a, b, masked_m, out=out)
    assert y is out
    for e, m in enumerate(masked_m.tolist()):
        assert bool((y[e, m:] == 0).all()), f"padding rows of expert {e} must be exact zeros"
        if m:
            assert torch.equal(y[e, :m], fp8.gemm(a[e, :m], b[e], out_dtype=torch.float32))
    valid = torch.cat([y[e, :m] for e, m in enumerate(masked_m.tolist())])
    reference = torch.cat([a[e, :m] @ b[e].T for e, m in enumerate(masked_m.tolist())])
    assert fp8.calc_diff(valid, reference) < 1e-3


def test_masked_prequantized_default_dtype():
    g, m_max, k = 2, 9, 128
    a, b = _randn(g, m_max, k, seed=7), _randn(g, 130, k, seed=8)
    masked_m = torch.tensor([9, 4])
    y = fp8.grouped_gemm_masked(fp8.quantize_1x128(a), fp8.quantize_128x128(b), masked_m)
    assert y.dtype == torch.bfloat16 and y.shape == (g, m_max, 130)
    assert bool((y[1, 4:] == 0).all())
    assert torch.equal(y[1, :4], fp8.gemm(a[1, :4], b[1]))
