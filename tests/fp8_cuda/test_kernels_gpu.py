"""GPU tests of the sm90 FP8 kernels (csrc/fp8 through fp8/cuda_gemm_ops.py); skipped without a Hopper GPU
and the built extension. Run with ``python -m pytest -q tests/fp8_cuda -m cuda``.

* quantizers bit-identical to fp8/quant.py (1x128, 128x1 transposed, fused, 128x128, per-expert 128x1),
  and non-finite input raises;
* GEMMs: calc_diff < 1e-3 against FP32 of the unquantized inputs on DeepSeek-V3 and odd shapes, agreement
  with the reference backend, bitwise-identical repeated runs, poisoned (NaN) outputs fully overwritten,
  accumulation into FP32, grouped padding rows exactly zero, empty experts;
* torch.library.opcheck of every op; FP8Linear forward/backward on the CUDA backend vs the reference.
"""

from __future__ import annotations

import pytest
import torch

import fp8
from fp8.quant import BLOCK

from .reference import grouped_colwise_reference, grouped_wgrad_fp32


def _hopper_with_ext() -> bool:
    return torch.cuda.is_available() and fp8.HAS_CUDA_EXT and torch.cuda.get_device_capability() == (9, 0)


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _hopper_with_ext(), reason="needs a Hopper (sm_90) GPU and the built fp8._C"),
]

if _hopper_with_ext():
    import fp8.cuda_gemm_ops as ops
    import fp8.cuda_quant_ops as qops

FMTS = list(fp8.ScaleFormat)
V3 = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
ODD = [(1, 64, 128), (7, 257, 100), (300, 200, 1000), (129, 136, 136), (513, 2112, 7168)]


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def poison_allocator(nbytes: int) -> None:
    """Leave NaN in the caching allocator's free blocks so an output that is not fully written shows it."""
    torch.empty(nbytes // 4 + 1024, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


# -------------------------------------------------------------------------------------------- quantizers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (128, 128), (300, 1000), (1000, 7168)])
def test_quantizers_bitwise_equal_reference(dtype, fmt, shape):
    x = rand(*shape, seed=shape[0] + shape[1], dtype=dtype, scale=3.0)
    row, col = qops.quantize_1x128_128x1_cuda(x, fmt)
    ref_row, ref_col = (
        fp8.quantize_1x128(x.cpu(), scale_format=fmt),
        fp8.quantize_128x1(x.cpu(), scale_format=fmt),
    )
    assert torch.equal(bits(row.data).cpu(), bits(ref_row.data)) and torch.equal(
        row.scale.cpu(), ref_row.scale
    )
    assert torch.equal(bits(col.data).cpu(), bits(ref_col.data)) and torch.equal(
        col.scale.cpu(), ref_col.scale
    )
    assert col.data.stride(0) == 1 and col.data.stride(1) % 16 == 0  # token-contiguous storage
    alone = qops.quantize_128x1_cuda(x, fmt)
    assert torch.equal(bits(alone.data), bits(col.data)) and torch.equal(alone.scale, col.scale)
    w = qops.quantize_128x128_cuda(x, fmt)
    ref_w = fp8.quantize_128x128(x.cpu(), scale_format=fmt)
    assert torch.equal(bits(w.data).cpu(), bits(ref_w.data)) and torch.equal(w.scale.cpu(), ref_w.scale)


def test_batched_128x128_and_zero_tiles():
    w = rand(3, 257, 300, seed=1)
    w[1] = 0  # all-zero blocks: finite scales, exact zeros
    q = qops.quantize_128x128_cuda(w, fp8.ScaleFormat.POW2)
    ref = fp8.quantize_128x128(w.cpu(), scale_format="pow2")
    assert torch.equal(bits(q.data).cpu(), bits(ref.data)) and torch.equal(q.scale.cpu(), ref.scale)
    assert not bits(q.data[1]).any() and torch.isfinite(q.scale).all()


@pytest.mark.parametrize("offsets", [[0, 300], [0, 0, 130, 130, 400, 401], [0, 128, 256, 384]])
def test_grouped_colwise_matches_per_expert_reference(offsets):
    x = rand(offsets[-1], 136, seed=len(offsets), dtype=torch.bfloat16)
    got = qops.quantize_128x1_grouped_cuda(x, torch.tensor(offsets), fp8.ScaleFormat.FP32)
    qt, scale, blk = grouped_colwise_reference(x.cpu(), offsets)
    assert got.block_offsets.tolist() == blk
    used = blk[-1]
    assert torch.equal(bits(got.qt[:, : used * BLOCK]).cpu(), bits(qt[:, : used * BLOCK]))
    assert torch.equal(got.scale[:used].cpu(), scale[:used])


def test_nonfinite_input_raises():
    x = rand(200, 256)
    x[150, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        qops.quantize_1x128_128x1_cuda(x, fp8.ScaleFormat.FP32)
    with pytest.raises(ValueError, match="non-finite"):
        qops.quantize_128x128_cuda(x, fp8.ScaleFormat.FP32)
    qops.quantize_128x1_cuda(x, fp8.ScaleFormat.FP32, check_finite=False)  # allowed when asked


# ------------------------------------------------------------------------------------------------ dense


def _gemm_case(m, n, k, seed=0):
    a, b = rand(m, k, seed=seed), rand(n, k, seed=seed + 1)
    return a, b, fp8.quantize_1x128(a), fp8.quantize_128x128(b)


@pytest.mark.parametrize("m", [64, 128])
@pytest.mark.parametrize("nk", V3)
def test_gemm_deepseek_v3_shapes(m, nk):
    a, b, aq, bq = _gemm_case(m, *nk)
    y = fp8.gemm(aq, bq, backend="cuda")
    assert y.dtype == torch.bfloat16 and fp8.calc_diff(y, a @ b.T) < 1e-3
    ref = fp8.gemm(aq, bq, out_dtype=torch.float32, backend="reference")
    assert fp8.calc_diff(fp8.gemm(aq, bq, out_dtype=torch.float32, backend="cuda"), ref) < 1e-6


@pytest.mark.parametrize("m, n, k", ODD)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_gemm_odd_shapes_and_output_dtypes(m, n, k, out_dtype):
    a, b, aq, bq = _gemm_case(m, n, k, seed=m)
    poison_allocator(4 * m * (n + 16))
    y = fp8.gemm(aq, bq, out_dtype=out_dtype, backend="cuda")
    assert y.dtype == out_dtype and y.shape == (m, n) and torch.isfinite(y).all()
    assert fp8.calc_diff(y, a @ b.T) < 1e-3
    ref = fp8.gemm(aq, bq, out_dtype=torch.float32, backend="reference")
    assert fp8.calc_diff(y.float(), ref) < (1e-6 if out_dtype == torch.float32 else 1e-4)


def test_gemm_bitwise_repeatable_poisoned_out_and_accumulate():
    a, b, aq, bq = _gemm_case(4096, 2112, 7168, seed=5)
    first = fp8.gemm(aq, bq, backend="cuda")
    for _ in range(3):
        assert torch.equal(bits(fp8.gemm(aq, bq, backend="cuda")), bits(first))
    out = torch.full((4096, 2112), float("nan"), device="cuda")
    fp8.gemm(aq, bq, out=out, backend="cuda")
    assert torch.isfinite(out).all()
    base = rand(4096, 2112, seed=9)
    acc = base.clone()
    fp8.gemm(aq, bq, out=acc, accumulate=True, backend="cuda")
    torch.testing.assert_close(acc - base, out, rtol=1e-5, atol=1e-3)


def test_gemm_strided_operands():
    big = fp8.quantize_1x128(rand(300, 512, seed=3))
    aq = fp8.FP8Tensor(big.data[:, :256], big.scale[:, :2], (1, BLOCK))  # row stride 512: used in place
    bq = fp8.quantize_128x128(rand(96, 256, seed=4))
    y = fp8.gemm(aq, bq, out_dtype=torch.float32, backend="cuda")
    ref = fp8.gemm(aq, bq, out_dtype=torch.float32, backend="reference")
    assert fp8.calc_diff(y, ref) < 1e-6
    out = torch.zeros(300, 200, device="cuda")[:, :96]  # output rows with stride 200: written in place
    fp8.gemm(aq, bq, out=out, backend="cuda")
    assert fp8.calc_diff(out, ref) < 1e-6


@pytest.mark.parametrize("sizes", [[128, 256, 128, 512], [0, 300, 1, 0, 77], [8192, 8192, 8192, 8192]])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_grouped_contiguous(sizes, out_dtype):
    g, n, k = len(sizes), 4096, 7168 if sum(sizes) > 10000 else 512
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    a, b = rand(int(offsets[-1]), k, seed=g), rand(g, n, k, seed=g + 1)
    aq, bq = fp8.quantize_1x128(a), fp8.quantize_128x128(b)
    poison_allocator(4 * a.shape[0] * n)
    y = fp8.grouped_gemm_contiguous(aq, bq, offsets.cuda(), out_dtype=out_dtype, backend="cuda")
    ref = fp8.grouped_gemm_contiguous(aq, bq, offsets, out_dtype=torch.float32, backend="reference")
    assert y.dtype == out_dtype and torch.isfinite(y).all()
    assert fp8.calc_diff(y.float(), ref) < (1e-6 if out_dtype == torch.float32 else 1e-4)
    for e in range(g):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi > lo:
            assert fp8.calc_diff(y[lo:hi].float(), a[lo:hi] @ b[e].T) < 1e-3


@pytest.mark.parametrize("g, m_max, n, k", [(1, 1024, 4096, 7168), (4, 256, 7168, 2048), (3, 100, 200, 136)])
def test_grouped_masked_padding_rows_are_zero(g, m_max, n, k):
    counts = torch.tensor([m_max, 0, m_max // 3, 1][:g], dtype=torch.int32)
    a, b = rand(g, m_max, k, seed=g), rand(g, n, k, seed=g + 2)
    aq, bq = fp8.quantize_1x128(a), fp8.quantize_128x128(b)
    for e in range(g):  # garbage (NaN codes) in the rows past masked_m must neither be read nor leak
        aq.data[e, int(counts[e]) :] = float("nan")
    poison_allocator(4 * g * m_max * n)
    y = fp8.grouped_gemm_masked(aq, bq, counts.cuda(), backend="cuda")
    assert y.shape == (g, m_max, n) and torch.isfinite(y).all()
    for e in range(g):
        c = int(counts[e])
        assert not bits(y[e, c:]).any()  # exactly +0.0
        if c:
            assert fp8.calc_diff(y[e, :c].float(), a[e, :c] @ b[e].T) < 1e-3


# ---------------------------------------------------------------------------------------------- weight grad


@pytest.mark.parametrize("t, n, k", [(4096, 2112, 7168), (300, 257, 100), (1, 64, 64), (4096, 7168, 2048)])
def test_wgrad_dense(t, n, k):
    dy, x = rand(t, n, seed=t), rand(t, k, seed=t + 1)
    dyq, xq = (
        qops.quantize_128x1_cuda(dy, fp8.ScaleFormat.FP32),
        qops.quantize_128x1_cuda(x, fp8.ScaleFormat.FP32),
    )
    out = torch.full((n, k), float("nan"), device="cuda")
    fp8.gemm_wgrad(dyq, xq, out=out, backend="cuda")
    assert torch.isfinite(out).all() and fp8.calc_diff(out, dy.t() @ x) < 1e-3
    ref = fp8.gemm_wgrad(dyq, xq, backend="reference")
    assert fp8.calc_diff(out, ref) < 1e-6
    again = fp8.gemm_wgrad(dyq, xq, backend="cuda")
    assert torch.equal(bits(again), bits(out))
    base = rand(n, k, seed=2)
    acc = base.clone()
    fp8.gemm_wgrad(dyq, xq, out=acc, accumulate=True, backend="cuda")
    torch.testing.assert_close(acc - base, out, rtol=1e-5, atol=1e-3)
    # operands quantized by the CPU reference (row-major storage) take the copying path
    dyc, xc = fp8.quantize_128x1(dy.cpu()), fp8.quantize_128x1(x.cpu())
    dyc, xc = (fp8.FP8Tensor(q.data.cuda(), q.scale.cuda(), q.block) for q in (dyc, xc))
    plain = fp8.gemm_wgrad(dyc, xc, backend="cuda")
    assert fp8.calc_diff(plain, ref) < 1e-6


@pytest.mark.parametrize("offsets", [[0, 512, 1024, 1536, 2048], [0, 0, 300, 301, 1000], [0, 129]])
def test_wgrad_grouped(offsets):
    t, n, k = offsets[-1], 384, 520
    dy, x = rand(t, n, seed=len(offsets), dtype=torch.bfloat16), rand(t, k, seed=9, dtype=torch.bfloat16)
    m_offsets = torch.tensor(offsets, device="cuda")
    out = torch.full((len(offsets) - 1, n, k), float("nan"), device="cuda")
    ops.grouped_gemm_wgrad_contiguous(dy, x, m_offsets, out=out, backend="cuda")
    ref = ops.grouped_gemm_wgrad_contiguous(dy, x, m_offsets, backend="reference")
    exact = grouped_wgrad_fp32(dy, x, offsets)
    assert torch.isfinite(out).all()
    for e in range(len(offsets) - 1):
        if offsets[e + 1] == offsets[e]:
            assert not bits(out[e]).any()
        else:
            assert fp8.calc_diff(out[e], ref[e]) < 1e-6 and fp8.calc_diff(out[e], exact[e]) < 1e-3
    acc = out.clone()
    ops.grouped_gemm_wgrad_contiguous(dy, x, m_offsets, out=acc, accumulate=True, backend="cuda")
    torch.testing.assert_close(acc, 2 * out, rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------------------------ opcheck, FP8Linear


def test_opcheck_every_op():
    x = rand(300, 200, dtype=torch.bfloat16)
    torch.library.opcheck(qops.quant_rowwise_colwise, (x, 0, True, True))
    torch.library.opcheck(qops.quant_colwise_grouped, (x, torch.tensor([0, 0, 130, 300], dtype=torch.int32,
                                                                     device="cuda"), 1, True))  # fmt: skip
    torch.library.opcheck(qops.quant_per_block_128x128, (x.unsqueeze(0), 2))
    a, b, aq, bq = _gemm_case(129, 257, 300)
    torch.library.opcheck(ops.gemm_nt, (aq.data, aq.scale, bq.data, bq.scale, torch.bfloat16))
    acc = torch.zeros(129, 257, device="cuda")
    torch.library.opcheck(ops.gemm_nt_out_, (aq.data, aq.scale, bq.data, bq.scale, acc, True))
    bg = fp8.quantize_128x128(rand(2, 64, 300, seed=3))
    off = torch.tensor([0, 100, 129], device="cuda")
    torch.library.opcheck(
        ops.m_grouped_gemm_nt_contiguous, (aq.data, aq.scale, bg.data, bg.scale, off, torch.bfloat16)
    )
    am = fp8.quantize_1x128(rand(2, 50, 300, seed=4))
    cnt = torch.tensor([50, 7], device="cuda", dtype=torch.int32)
    torch.library.opcheck(
        ops.m_grouped_gemm_nt_masked, (am.data, am.scale, bg.data, bg.scale, cnt, torch.float32)
    )
    dyq = qops.quantize_128x1_cuda(rand(300, 64, seed=5), fp8.ScaleFormat.FP32)
    xq = qops.quantize_128x1_cuda(rand(300, 96, seed=6), fp8.ScaleFormat.FP32)
    out = torch.zeros(64, 96, device="cuda")
    torch.library.opcheck(
        ops.gemm_wgrad_out_, (dyq.data.t(), dyq.scale, xq.data.t(), xq.scale, out, 300, True)
    )
    gd = qops.quantize_128x1_grouped_cuda(
        rand(300, 64, seed=7), torch.tensor([0, 0, 130, 300]), fp8.ScaleFormat.FP32
    )
    gx = qops.quantize_128x1_grouped_cuda(
        rand(300, 96, seed=8), torch.tensor([0, 0, 130, 300]), fp8.ScaleFormat.FP32
    )
    out = torch.zeros(3, 64, 96, device="cuda")
    torch.library.opcheck(ops.m_grouped_gemm_wgrad_out_, (gd.qt, gd.scale, gx.qt, gx.scale, gd.token_offsets,
                                                          gd.block_offsets, out, False))  # fmt: skip


def test_fp8_linear_cuda_backend_matches_reference():
    torch.manual_seed(0)
    lin = fp8.FP8Linear(300, 257, bias=True).cuda()
    x = rand(4, 77, 300, seed=11).requires_grad_()
    grads = {}
    for backend in ("cuda", "reference"):
        x.grad = None
        lin.zero_grad()
        y = fp8.fp8_linear(x, lin.weight, lin.bias, backend=backend)
        y.square().sum().backward()
        grads[backend] = (y.detach(), x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone())
    for got, want in zip(grads["cuda"], grads["reference"]):
        assert fp8.calc_diff(got, want) < 1e-5
