"""The torch.library op frugal_fp8::quant_per_token_1x128: opcheck on CPU, fake shapes, CUDA parity."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fp8
from fp8.cuda_quant_ops import quant_per_token_1x128


def _x(m, k, dtype=torch.float32, seed=0):
    return (torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [0, 1, 2])
def test_opcheck_on_cpu(dtype, fmt):
    torch.library.opcheck(quant_per_token_1x128, (_x(7, 300, dtype), fmt))


def test_cpu_impl_is_the_reference():
    x = _x(9, 260, torch.bfloat16, seed=1)
    for fmt in fp8.ScaleFormat:
        q, s = torch.ops.frugal_fp8.quant_per_token_1x128(x, fmt.code)
        ref = fp8.quantize_1x128(x, scale_format=fmt)
        assert torch.equal(q.view(torch.uint8), ref.data.view(torch.uint8)) and torch.equal(s, ref.scale)


def test_fake_impl_shapes():
    with FakeTensorMode():
        x = torch.empty(5, 129, dtype=torch.bfloat16)
        q, s = torch.ops.frugal_fp8.quant_per_token_1x128(x, 1)
        assert q.shape == (5, 129) and q.dtype == torch.float8_e4m3fn
        assert s.shape == (5, 2) and s.dtype == torch.float32


def test_op_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale_format=3"):
        quant_per_token_1x128(_x(2, 128), 3)
    with pytest.raises(ValueError, match=r"must be 2-D \(M, K\)"):
        quant_per_token_1x128(torch.randn(2, 3, 128), 0)
    with pytest.raises(TypeError, match="x.dtype=torch.float64"):
        quant_per_token_1x128(torch.randn(2, 128, dtype=torch.float64), 0)


cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and fp8.HAS_CUDA_EXT),
    reason="needs a CUDA GPU and the built fp8._C extension",
)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["fp32", "pow2", "ue8m0"])
@pytest.mark.parametrize("shape", [(1, 128), (7, 300), (300, 1000), (4, 2, 7168)])
def test_cuda_kernel_bitwise_equals_reference(dtype, fmt, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[..., :128] *= 1e3  # blocks of different scales
    got = fp8.quantize_1x128(x.cuda(), scale_format=fmt)
    ref = fp8.quantize_1x128(x, scale_format=fmt)
    assert torch.equal(got.scale.cpu(), ref.scale)
    assert torch.equal(got.data.cpu().view(torch.uint8), ref.data.view(torch.uint8))


@pytest.mark.cuda
@cuda
def test_cuda_kernel_strided_rows_zero_tiles_and_non_finite():
    base = torch.randn(64, 512, device="cuda")
    base[:, 128:256] = 0
    x = base[:, :300]  # row stride 512 > K
    got = fp8.quantize_1x128(x)
    ref = fp8.quantize_1x128(x.cpu())
    assert torch.equal(got.scale.cpu(), ref.scale) and bool((got.data[:, 128:256].float() == 0).all())
    torch.library.opcheck(quant_per_token_1x128, (x.contiguous(), 1))
    x = x.clone()
    x[3, 7] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fp8.quantize_1x128(x)
