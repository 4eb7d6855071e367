"""Every documented error: bad dims, dtypes, disagreeing shapes, unavailable backends, non-finite input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fp8


def _r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_quantize_errors():
    with pytest.raises(TypeError, match=r"x.dtype=torch.int64 must be one of"):
        fp8.quantize_1x128(torch.ones(2, 128, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"w.dtype=torch.float8_e4m3fn"):
        fp8.quantize_128x128(torch.zeros(2, 128).to(torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        fp8.quantize_1x128([1.0, 2.0])
    with pytest.raises(ValueError, match=r"x.dim\(\)=0 must be >= 1"):
        fp8.quantize_1x128(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"x.dim\(\)=1 must be >= 2"):
        fp8.quantize_128x1(_r(5))
    with pytest.raises(ValueError, match=r"the last dim \(K\) must be >= 1"):
        fp8.quantize_1x128(torch.zeros(3, 0))
    with pytest.raises(ValueError, match=r"scale_format='e5m2' is not a scale format"):
        fp8.quantize_1x128(_r(2, 128), scale_format="e5m2")
    with pytest.raises(ValueError, match=r"block_m=0"):
        fp8.quantize_blockwise(_r(2, 128), 0, 128)


def test_non_finite_names_the_operand():
    a, b = _r(4, 256), _r(8, 256)
    a[1, 3] = float("inf")
    with pytest.raises(ValueError, match="^a has 1 non-finite values"):
        fp8.gemm(a, b)
    b[0, 0] = float("nan")
    with pytest.raises(ValueError, match="^b has 1 non-finite values"):
        fp8.gemm(_r(4, 256), b)
    with pytest.raises(ValueError, match="^dy has 1 non-finite values"):
        fp8.gemm_wgrad(a, _r(4, 7))
    layer = fp8.FP8Linear(256, 8, check_finite=True)
    with pytest.raises(ValueError, match="non-finite"):
        layer(a)
    assert bool(torch.isnan(fp8.FP8Linear(256, 8)(a)[1]).all())  # default: propagates like nn.Linear


def test_gemm_errors():
    a, b = _r(4, 256), _r(8, 256)
    with pytest.raises(ValueError, match=r"a.shape=\(4, 256\) and b.shape=\(8, 200\) need the same K"):
        fp8.gemm(a, _r(8, 200))
    with pytest.raises(ValueError, match="a must be 2-D"):
        fp8.gemm(_r(2, 4, 256), b)
    with pytest.raises(ValueError, match=r"b.block=\(1, 128\) must be \(128, 128\)"):
        fp8.gemm(a, fp8.quantize_1x128(b))
    with pytest.raises(TypeError, match="b must be a torch.Tensor or an FP8Tensor, got ndarray"):
        fp8.gemm(a, b.numpy())
    with pytest.raises(ValueError, match=r"out.shape=\(4, 7\) must be \(4, 8\)"):
        fp8.gemm(a, b, out=torch.empty(4, 7))
    with pytest.raises(ValueError, match="out_dtype=torch.float32 disagrees with out.dtype=torch.bfloat16"):
        fp8.gemm(a, b, out=torch.empty(4, 8, dtype=torch.bfloat16), out_dtype=torch.float32)
    with pytest.raises(ValueError, match="accumulate=True needs out="):
        fp8.gemm(a, b, accumulate=True)
    with pytest.raises(ValueError, match="accumulate=True needs a float32 out"):
        fp8.gemm(a, b, out=torch.empty(4, 8, dtype=torch.bfloat16), accumulate=True)
    with pytest.raises(ValueError, match=r"out_dtype=torch.int32 must be one of"):
        fp8.gemm(a, b, out_dtype=torch.int32)


def test_gemm_wgrad_errors():
    with pytest.raises(ValueError, match=r"same number of tokens M"):
        fp8.gemm_wgrad(_r(5, 8), _r(6, 8))
    with pytest.raises(ValueError, match=r"out.dtype=torch.bfloat16 must be torch.float32"):
        fp8.gemm_wgrad(_r(5, 8), _r(5, 9), out=torch.empty(8, 9, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"out.shape=\(9, 8\) must be \(8, 9\)"):
        fp8.gemm_wgrad(_r(5, 8), _r(5, 9), out=torch.empty(9, 8))
    with pytest.raises(ValueError, match=r"dy.block=\(1, 128\) must be \(128, 1\)"):
        fp8.gemm_wgrad(fp8.quantize_1x128(_r(5, 8)), _r(5, 9))


def test_grouped_errors():
    a, b = _r(10, 128), _r(3, 16, 128)
    good = torch.tensor([0, 4, 4, 10])
    with pytest.raises(ValueError, match=r"m_offsets.shape=\(3,\) must be \(4,\)"):
        fp8.grouped_gemm_contiguous(a, b, good[:3])
    with pytest.raises(TypeError, match="m_offsets.dtype=torch.float32 must be torch.int32 or torch.int64"):
        fp8.grouped_gemm_contiguous(a, b, good.float())
    with pytest.raises(ValueError, match=r"m_offsets=\[0, 5, 4, 10\] must start at 0, never decrease"):
        fp8.grouped_gemm_contiguous(a, b, torch.tensor([0, 5, 4, 10]))
    with pytest.raises(ValueError, match=r"end at a.shape\[0\]=10"):
        fp8.grouped_gemm_contiguous(a, b, torch.tensor([0, 4, 4, 9]))
    with pytest.raises(ValueError, match="b must be 3-D"):
        fp8.grouped_gemm_contiguous(a, b[0], good)
    with pytest.raises(ValueError, match="need the same K"):
        fp8.grouped_gemm_contiguous(_r(10, 100), b, good)
    am = _r(3, 6, 128)
    with pytest.raises(ValueError, match=r"masked_m=\[1, 7, 0\] must be within \[0, M_max=6\]"):
        fp8.grouped_gemm_masked(am, b, torch.tensor([1, 7, 0]))
    with pytest.raises(ValueError, match=r"masked_m=\[-1, 0, 0\]"):
        fp8.grouped_gemm_masked(am, b, torch.tensor([-1, 0, 0]))
    with pytest.raises(ValueError, match=r"masked_m.shape=\(2,\) must be \(3,\)"):
        fp8.grouped_gemm_masked(am, b, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"a must be \(G=3, M_max, K\)"):
        fp8.grouped_gemm_masked(_r(2, 6, 128), b, torch.tensor([1, 1]))


def test_backend_errors():
    a, b = _r(4, 128), _r(8, 128)
    with pytest.raises(RuntimeError, match="backend='cuda' was asked for gemm on cpu but is unavailable"):
        fp8.gemm(a, b, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='torch' was asked for grouped_gemm_masked on cpu"):
        fp8.grouped_gemm_masked(_r(3, 4, 128), _r(3, 8, 128), torch.tensor([1, 2, 3]), backend="torch")
    with pytest.raises(ValueError, match="'fast' is not an FP8 backend"):
        fp8.gemm_wgrad(a, a, backend="fast")
    with pytest.raises(ValueError, match="op='conv' is not an FP8 op"):
        fp8.select_backend("conv", torch.device("cpu"))


def test_linear_errors():
    with pytest.raises(ValueError, match=r"last dim must equal in_features=128"):
        fp8.FP8Linear(128, 4)(_r(3, 100))
    with pytest.raises(TypeError, match="from_linear expects an nn.Linear, got Conv1d"):
        fp8.FP8Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="scale_format='bf16' is not a scale format"):
        fp8.FP8Linear(128, 4, scale_format="bf16")


def test_calc_diff_shape_mismatch():
    with pytest.raises(ValueError, match=r"x.shape=\(2,\) and y.shape=\(3,\) must match"):
        fp8.calc_diff(torch.ones(2), torch.ones(3))
    assert fp8.calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
