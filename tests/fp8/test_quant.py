"""Quantization: scales, rounding, tails, zero tiles, scale formats, round-trip bounds (fp8/quant.py)."""

from __future__ import annotations

import math

import pytest
import torch

import fp8
from fp8.quant import FP8Tensor, is_power_of_two

BLOCKS = {"1x128": (1, 128), "128x128": (128, 128), "128x1": (128, 1)}
QUANTIZERS = {(1, 128): fp8.quantize_1x128, (128, 128): fp8.quantize_128x128, (128, 1): fp8.quantize_128x1}


def _rand(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    # rows and columns of very different magnitudes, so that blocks get different scales
    x = (
        x
        * torch.exp(2 * torch.randn(shape[0], 1, generator=g))
        * torch.exp(torch.randn(1, shape[1], generator=g))
    )
    return x.to(dtype)


def _naive_scales(x: torch.Tensor, bm: int, bk: int, fmt: str) -> torch.Tensor:
    """An independent oracle: one Python iteration per block, float64 log2 for the power-of-two rounding."""
    m, k = x.shape
    out = torch.empty(math.ceil(m / bm), math.ceil(k / bk))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            amax = x[i * bm : (i + 1) * bm, j * bk : (j + 1) * bk].float().abs().max()
            s = torch.clamp(amax, min=fp8.AMAX_FLOOR) / 448.0  # float32 arithmetic, as specified
            if fmt != "fp32":
                s = torch.tensor(2.0 ** math.ceil(math.log2(float(s))), dtype=torch.float32)
            out[i, j] = s
    return out


@pytest.mark.parametrize("block", list(BLOCKS.values()), ids=list(BLOCKS))
@pytest.mark.parametrize("fmt", ["fp32", "pow2", "ue8m0"])
def test_scales_and_codes_match_the_formula(block, fmt):
    x = _rand((130, 300), seed=block[0] * 7 + block[1] + len(fmt))  # tails in both dims
    t = QUANTIZERS[block](x, scale_format=fmt)
    assert t.block == block and t.data.dtype == torch.float8_e4m3fn and t.data.shape == x.shape
    expected = _naive_scales(x, *block, fmt)
    assert torch.equal(t.scale, expected)
    # codes: e4m3(clamp(x / scale)) with true division, elementwise
    s = t.scale.repeat_interleave(block[0], 0)[: x.shape[0]].repeat_interleave(block[1], 1)[:, : x.shape[1]]
    codes = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(t.data.view(torch.uint8), codes.view(torch.uint8))


def test_round_to_nearest_even_and_saturation():
    # scale is 1 because the block's amax is 448; ties go to the even mantissa
    x = torch.tensor([[448.0, 1.0625, 1.1875, -1.0625, 0.5, 3.0, 1e-3]])
    t = fp8.quantize_1x128(x)
    assert float(t.scale) == 1.0
    assert t.data.float().tolist() == [[448.0, 1.0, 1.25, -1.0, 0.5, 3.0, 0.001953125]]
    # pow2: scale rounds up, so nothing exceeds 448 and the max maps into (224, 448]
    y = torch.tensor([[449.0, -300.0, 1.0]])
    t = fp8.quantize_1x128(y, scale_format="pow2")
    assert float(t.scale) == 2.0 and t.data.float().abs().max() <= 448


@pytest.mark.parametrize("block", list(BLOCKS.values()), ids=list(BLOCKS))
@pytest.mark.parametrize("fmt", ["fp32", "pow2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_error_bound_per_block(block, fmt, dtype):
    x = _rand((257, 390), seed=7, dtype=dtype)
    t = QUANTIZERS[block](x, scale_format=fmt)
    s = t.scale.repeat_interleave(block[0], 0)[: x.shape[0]].repeat_interleave(block[1], 1)[:, : x.shape[1]]
    err = (t.dequantize() - x.float()).abs()
    # e4m3 keeps 3 mantissa bits: half an ulp is |v|/16 for normal codes, 2^-10 * scale for subnormal ones
    bound = torch.maximum(x.float().abs() / 16, s * 2.0**-10) * (1 + 1e-6)
    assert bool((err <= bound).all()), float((err / bound).max())
    # fp32 scales use the full range: each block's largest code is 448 in magnitude
    if fmt == "fp32":
        amax_codes = t.data.float().abs()
        assert float(amax_codes.max()) == 448.0
    else:
        assert is_power_of_two(t.scale)


def test_tail_block_uses_only_valid_elements():
    x = torch.full((3, 130), 1000.0)
    x[:, 128:] = torch.tensor([2.0, -4.0])  # the tail block holds 2 valid columns
    t = fp8.quantize_1x128(x)
    assert t.scale.shape == (3, 2)
    assert torch.equal(t.scale[:, 1], torch.full((3,), 4.0 / 448.0))
    w = torch.randn(200, 3) * 0.01
    w[:128] *= 1e4
    tw = fp8.quantize_128x128(w)
    assert tw.scale.shape == (2, 1)
    assert torch.equal(tw.scale[1, 0], w[128:].abs().max() / 448.0)


@pytest.mark.parametrize("block", list(BLOCKS.values()), ids=list(BLOCKS))
@pytest.mark.parametrize("fmt", ["fp32", "pow2", "ue8m0"])
def test_all_zero_tiles_give_finite_scales_and_exact_zeros(block, fmt):
    x = torch.randn(256, 256)
    x[:128, :128] = 0.0
    t = QUANTIZERS[block](x, scale_format=fmt)
    assert bool(torch.isfinite(t.scale).all()) and bool((t.scale > 0).all())
    assert bool((t.data[:128, :128].float() == 0).all())
    assert bool((t.dequantize()[:128, :128] == 0).all())
    zero = QUANTIZERS[block](torch.zeros(5, 7), scale_format=fmt)
    assert bool((zero.dequantize() == 0).all()) and bool(torch.isfinite(zero.scale).all())


def test_pow2_scales_are_the_next_power_of_two():
    x = _rand((64, 1024), seed=3)
    f = fp8.quantize_1x128(x)
    p = fp8.quantize_1x128(x, scale_format="pow2")
    assert is_power_of_two(p.scale)
    assert bool((p.scale >= f.scale).all()) and bool((p.scale < 2 * f.scale).all())
    # bit-level pow2_ceil vs float64 arithmetic on arbitrary positive floats, exact powers included
    s = torch.cat(
        [torch.rand(1000) * 10.0 ** torch.randint(-12, 12, (1000,)), 2.0 ** torch.arange(-40.0, 40.0)]
    )
    expected = torch.tensor(
        [2.0 ** math.ceil(math.log2(v)) for v in s.double().tolist()], dtype=torch.float32
    )
    assert torch.equal(fp8.pow2_ceil(s), expected)


def test_ue8m0_bytes_round_trip():
    x = _rand((33, 500), seed=4)
    t = fp8.quantize_1x128(x, scale_format="ue8m0")
    e = t.scale_ue8m0()
    assert e.dtype == torch.uint8 and e.shape == t.scale.shape
    assert torch.equal(fp8.scale_from_ue8m0(e), t.scale)
    assert torch.equal(e.float() - 127, torch.log2(t.scale.double()).float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(bad):
    for quantize in QUANTIZERS.values():
        x = torch.randn(4, 200)
        x[2, 150] = bad
        with pytest.raises(ValueError, match=r"^(x|w) has 1 non-finite values"):
            quantize(x)
        quantize(x, check_finite=False)  # skipping the check is allowed


def test_shapes_dtypes_and_leading_dims():
    x = torch.randn(2, 3, 260, dtype=torch.bfloat16)
    t = fp8.quantize_1x128(x)
    assert t.shape == x.shape and t.scale.shape == (2, 3, 3)
    flat = fp8.quantize_1x128(x.reshape(6, 260))
    assert torch.equal(t.data.view(6, 260).view(torch.uint8), flat.data.view(torch.uint8))
    assert fp8.quantize_1x128(torch.randn(300)).scale.shape == (3,)
    assert fp8.quantize_1x128(torch.randn(0, 300)).scale.shape == (0, 3)
    h = fp8.quantize_128x128(torch.randn(3, 200, 129, dtype=torch.float16))
    assert h.scale.shape == (3, 2, 2)
    assert fp8.quantize_128x1(torch.randn(129, 5)).scale.shape == (2, 5)


def test_128x128_transpose_is_the_quantization_of_the_transpose():
    w = _rand((300, 200), seed=5)
    t = fp8.quantize_128x128(w).t()
    direct = fp8.quantize_128x128(w.t().contiguous())
    assert torch.equal(t.scale, direct.scale)
    assert torch.equal(t.data.view(torch.uint8), direct.data.view(torch.uint8))


def test_fp8tensor_validates_its_fields():
    q = torch.zeros(4, 200, dtype=torch.float8_e4m3fn)
    FP8Tensor(q, torch.ones(4, 2), (1, 128))
    with pytest.raises(ValueError, match="block"):
        FP8Tensor(q, torch.ones(4, 2), (1, 64))
    with pytest.raises(ValueError, match=r"scale.shape=\(4, 3\) must be \(4, 2\)"):
        FP8Tensor(q, torch.ones(4, 3), (1, 128))
    with pytest.raises(TypeError, match="data.dtype"):
        FP8Tensor(q.float(), torch.ones(4, 2), (1, 128))
    with pytest.raises(TypeError, match="scale.dtype"):
        FP8Tensor(q, torch.ones(4, 2, dtype=torch.float64), (1, 128))
    with pytest.raises(ValueError, match="scale_ue8m0"):
        FP8Tensor(q, torch.ones(4, 2), (1, 128)).scale_ue8m0()
