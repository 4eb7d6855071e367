"""fp8.gemm / fp8.gemm_wgrad against FP32 GEMMs and an independent per-tile oracle; outliers; backends."""

from __future__ import annotations

import pytest
import torch

import fp8
from fp8 import backends
from fp8.quant import FP8Tensor, quantize_blockwise

# FP8 E4M3 keeps 3 mantissa bits: each operand carries ~2-4% relative rounding error, which averages to
# calc_diff ~4e-4..8e-4 against FP32 of the unquantized inputs. 1e-3 is DeepGEMM's bound (DESIGN.md).
FP8_GEMM_BOUND = 1e-3


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("m", [1, 7, 128, 300])
@pytest.mark.parametrize("n", [64, 257])
@pytest.mark.parametrize("k", [100, 128, 384, 1000])
def test_gemm_close_to_fp32(m, n, k):
    a, b = _randn(m, k, seed=m * 1000 + k), _randn(n, k, seed=n * 1000 + k + 1)
    y = fp8.gemm(a, b, out_dtype=torch.float32)
    assert y.shape == (m, n) and y.dtype == torch.float32
    diff = fp8.calc_diff(y, a @ b.T)
    assert 0 < diff < FP8_GEMM_BOUND, diff  # > 0: the operands really were quantized


@pytest.mark.parametrize("fmt", ["pow2", "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_scale_formats_and_dtypes(fmt, dtype):
    a, b = _randn(77, 640, seed=1).to(dtype), _randn(130, 640, seed=2).to(dtype)
    aq, bq = fp8.quantize_1x128(a, scale_format=fmt), fp8.quantize_128x128(b, scale_format=fmt)
    y = fp8.gemm(aq, bq)  # default out_dtype: bfloat16
    assert y.dtype == torch.bfloat16
    assert fp8.calc_diff(y.float(), a.float() @ b.float().T) < FP8_GEMM_BOUND


def test_gemm_matches_a_naive_per_tile_oracle():
    """A second, independent oracle: explicit loops over 128x128 output tiles and 128-wide K slices."""
    m, n, k = 150, 200, 300
    a, b = _randn(m, k, seed=11), _randn(n, k, seed=12) * 3
    aq, bq = fp8.quantize_1x128(a), fp8.quantize_128x128(b)
    af, bf = aq.data.float(), bq.data.float()
    oracle = torch.zeros(m, n, dtype=torch.float64)
    for m0 in range(0, m, 128):
        for n0 in range(0, n, 128):
            for kb, k0 in enumerate(range(0, k, 128)):
                rows, cols, ks = slice(m0, m0 + 128), slice(n0, n0 + 128), slice(k0, k0 + 128)
                partial = af[rows, ks].double() @ bf[cols, ks].double().T
                oracle[rows, cols] += (
                    partial * aq.scale[rows, kb : kb + 1].double() * float(bq.scale[n0 // 128, kb])
                )
    y = fp8.gemm(aq, bq, out_dtype=torch.float32)
    torch.testing.assert_close(y.double(), oracle, rtol=1e-5, atol=1e-4)
    # and the promotion never changes the math: equal to the dequantized operands' product
    torch.testing.assert_close(y, aq.dequantize() @ bq.dequantize().T, rtol=1e-4, atol=1e-3)


def test_gemm_out_and_accumulate():
    a, b = _randn(33, 300, seed=21), _randn(70, 300, seed=22)
    expected = fp8.gemm(a, b, out_dtype=torch.float32)
    out = torch.full((33, 70), float("nan"))
    assert fp8.gemm(a, b, out=out) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    base = _randn(33, 70, seed=23)
    acc = base.clone()
    fp8.gemm(a, b, out=acc, accumulate=True)
    torch.testing.assert_close(acc, base + expected, rtol=1e-6, atol=1e-5)
    out16 = torch.empty(33, 70, dtype=torch.bfloat16)
    fp8.gemm(a, b, out=out16)
    torch.testing.assert_close(out16, expected.bfloat16(), rtol=0, atol=0)


def test_gemm_accepts_prequantized_operands():
    a, b = _randn(10, 260, seed=31), _randn(129, 260, seed=32)
    direct = fp8.gemm(a, b)
    pre = fp8.gemm(fp8.quantize_1x128(a), fp8.quantize_128x128(b))
    assert torch.equal(direct, pre)


def test_outliers_fine_grained_scaling_beats_one_scale():
    """DESIGN.md, numerics: a few channels 1e5x larger. One per-tensor scale pushes every ordinary value
    into e4m3's subnormals (or to zero); 1x128 tiles do that only in the tiles holding an outlier. The error
    is measured on the ordinary channels' contribution, where the recipes differ."""
    m, n, k = 256, 256, 2048
    a, b = _randn(m, k, seed=41), _randn(n, k, seed=42)
    outliers = torch.tensor([5, 77, 1000, 1001])
    a[:, outliers] *= 1e5
    ordinary = torch.ones(k, dtype=torch.bool)
    ordinary[outliers] = False
    reference = (a * ordinary) @ b.T
    bq = fp8.quantize_128x128(b)

    def without_outliers(q):
        q = q.clone()
        q[:, outliers] = 0
        return q

    tiles = fp8.quantize_1x128(a)
    fine = fp8.gemm(
        FP8Tensor(without_outliers(tiles.data), tiles.scale, (1, 128)), bq, out_dtype=torch.float32
    )

    q, s = quantize_blockwise(a, m, k)  # one scale for the whole tensor, laid out as 1x128 scales
    per_tensor = FP8Tensor(without_outliers(q), s.expand(m, tiles.scale.shape[1]).contiguous(), (1, 128))
    coarse = fp8.gemm(per_tensor, bq, out_dtype=torch.float32)

    err_fine, err_coarse = fp8.calc_diff(fine, reference), fp8.calc_diff(coarse, reference)
    print(f"outliers 1e5x: calc_diff 1x128 tiles {err_fine:.2e}, per-tensor {err_coarse:.2e}")
    assert err_fine * 5 <= err_coarse, (err_fine, err_coarse)
    assert err_fine < 1e-2


@pytest.mark.parametrize("m", [1, 100, 300])
def test_gemm_wgrad_close_to_fp32(m):
    n, k = 257, 200
    dy, x = _randn(m, n, seed=51 + m), _randn(m, k, seed=52 + m)
    dw = fp8.gemm_wgrad(dy, x)
    assert dw.shape == (n, k) and dw.dtype == torch.float32
    assert fp8.calc_diff(dw, dy.T @ x) < FP8_GEMM_BOUND
    pre = fp8.gemm_wgrad(fp8.quantize_128x1(dy), fp8.quantize_128x1(x))
    assert torch.equal(dw, pre)


def test_gemm_wgrad_matches_per_token_slice_oracle_and_accumulates():
    m, n, k = 260, 70, 90
    dy, x = _randn(m, n, seed=61), _randn(m, k, seed=62)
    dyq, xq = fp8.quantize_128x1(dy), fp8.quantize_128x1(x)
    oracle = torch.zeros(n, k, dtype=torch.float64)
    for mb, m0 in enumerate(range(0, m, 128)):
        rows = slice(m0, m0 + 128)
        partial = dyq.data[rows].double().T @ xq.data[rows].double()
        oracle += partial * dyq.scale[mb].double()[:, None] * xq.scale[mb].double()[None, :]
    torch.testing.assert_close(fp8.gemm_wgrad(dyq, xq).double(), oracle, rtol=1e-5, atol=1e-4)
    grad = _randn(n, k, seed=63)  # an existing FP32 weight grad
    expected = grad + fp8.gemm_wgrad(dyq, xq)
    assert fp8.gemm_wgrad(dyq, xq, out=grad, accumulate=True) is grad
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_zero_rows_and_zero_operands():
    assert fp8.gemm(torch.zeros(0, 300), _randn(5, 300, seed=1)).shape == (0, 5)
    assert bool((fp8.gemm(torch.zeros(3, 300), _randn(5, 300, seed=1)) == 0).all())
    assert bool((fp8.gemm_wgrad(torch.zeros(0, 4), torch.zeros(0, 6)) == 0).all())


def test_backend_choice_on_cpu(monkeypatch):
    a, b = _randn(4, 128, seed=1), _randn(8, 128, seed=2)
    assert backends.select_backend("gemm", torch.device("cpu"))[0] == "reference"
    assert torch.equal(fp8.gemm(a, b, backend="reference"), fp8.gemm(a, b))
    for name in ("cuda", "torch"):
        with pytest.raises(
            RuntimeError, match=rf"backend='{name}' was asked for gemm on cpu but is unavailable: .*CUDA"
        ):
            fp8.gemm(a, b, backend=name)
    monkeypatch.setitem(backends._BACKENDS, "spy", backends.Backend("spy", -1, lambda d: (True, ""), "test"))
    with pytest.raises(RuntimeError, match="backend='spy' has no implementation of gemm_wgrad"):
        fp8.gemm_wgrad(a, a, backend="spy")
    with pytest.raises(ValueError, match="'tpu' is not an FP8 backend"):
        fp8.gemm(a, b, backend="tpu")
    monkeypatch.setenv("FRUGAL_FP8_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="FRUGAL_FP8_BACKEND='cuda'"):
        fp8.gemm(a, b)
    assert fp8.gemm(a, b, backend="auto") is not None  # an explicit argument wins over the environment


def test_registered_backend_is_preferred_by_priority(monkeypatch):
    calls = []

    def spy_gemm(a, b, *, out_dtype, out, accumulate):
        calls.append((tuple(a.shape), tuple(b.shape), out_dtype))
        return torch.zeros(a.shape[0], b.shape[0], dtype=out_dtype)

    monkeypatch.setitem(backends._BACKENDS, "spy", backends.Backend("spy", -1, lambda d: (True, ""), "test"))
    monkeypatch.setitem(backends._IMPLS, ("gemm", "spy"), spy_gemm)
    y = fp8.gemm(_randn(3, 130, seed=1), _randn(5, 130, seed=2))
    assert calls == [((3, 130), (5, 130), torch.bfloat16)] and bool((y == 0).all())
    assert "spy" in fp8.backend_report("cpu")


@pytest.mark.parametrize("m,n,k", [(128, 2112, 7168), (7, 257, 1000), (1, 64, 100)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_torch_backend_operand_layout_passes_torch_shape_checks(m, n, k, out_dtype):
    """On meta tensors F.scaled_mm runs only torch's own shape/stride checks (torch/_meta_registrations.py):
    the padding and scale layouts the "torch" backend builds must satisfy them."""
    from fp8.quant import ceil_div
    from fp8.scaled_mm import _gemm_scaled_mm

    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    a = FP8Tensor(meta(m, k, dtype=torch.float8_e4m3fn), meta(m, ceil_div(k, 128)), (1, 128))
    b = FP8Tensor(meta(n, k, dtype=torch.float8_e4m3fn), meta(ceil_div(n, 128), ceil_div(k, 128)), (128, 128))
    y = _gemm_scaled_mm(a, b, out_dtype=out_dtype, out=None, accumulate=False)
    assert y.shape == (m, n) and y.dtype == out_dtype


def _gpu_backend_ok(name):
    if not torch.cuda.is_available():
        return False
    return backends.backend_report("cuda")[name] == "ok"


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["torch", "cuda"])
@pytest.mark.parametrize("m,n,k", [(128, 2112, 7168), (7, 257, 1000), (300, 4096, 512)])
def test_gpu_backends_match_the_reference(name, m, n, k):
    if not _gpu_backend_ok(name):
        pytest.skip(f"backend {name!r} unavailable here")
    a, b = _randn(m, k, seed=71).cuda(), _randn(n, k, seed=72).cuda()
    aq, bq = fp8.quantize_1x128(a), fp8.quantize_128x128(b)
    ref = fp8.gemm(aq, bq, out_dtype=torch.float32, backend="reference")
    got = fp8.gemm(aq, bq, out_dtype=torch.float32, backend=name)
    assert fp8.calc_diff(got, ref) < 1e-6
    assert fp8.calc_diff(got, a @ b.T) < FP8_GEMM_BOUND


def test_reference_keeps_fp32_partials_under_autocast():
    """A caller's bf16 autocast must not turn the reference's FP32 partial products into bf16 ones."""
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(64, 300, generator=g), torch.randn(96, 300, generator=g)
    dy, x = torch.randn(200, 96, generator=g), torch.randn(200, 64, generator=g)
    plain = fp8.gemm(a, b, out_dtype=torch.float32, backend="reference")
    plain_w = fp8.gemm_wgrad(dy, x, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fp8.gemm(a, b, out_dtype=torch.float32, backend="reference")
        auto_w = fp8.gemm_wgrad(dy, x, backend="reference")
    assert torch.equal(plain, auto)
    assert torch.equal(plain_w, auto_w)
