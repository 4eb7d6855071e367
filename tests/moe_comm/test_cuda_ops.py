"""The permute/unpermute ops: CPU references against independent computations (and torch.library.opcheck);
the CUDA kernels against the CPU references where a GPU and the built extension are present."""

from __future__ import annotations

import pytest
import torch

import moe_comm
from moe_comm import cuda_ops  # noqa: F401  (registers the frugal_moe ops)
from moe_comm.dispatcher import sum_pairs_fp32

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and moe_comm.HAS_CUDA_EXT), reason="needs a CUDA GPU and moe_comm._C"
)


def _case(seed=0, N=37, T=21, K=3, H=300, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(N, H, generator=g).to(dtype)
    index = torch.randint(-1, N, (T, K), generator=g)
    weights = torch.rand(T, K, generator=g)
    return rows, index, weights


def test_gather_rows_reference():
    rows, index, _ = _case()
    out = torch.ops.frugal_moe.gather_rows(rows, index[:, 0])
    for i, j in enumerate(index[:, 0].tolist()):
        assert torch.equal(out[i], rows[j] if j >= 0 else torch.zeros_like(rows[0]))


def test_weighted_sum_reference_matches_dispatcher_sum_bitwise():
    for dtype in (torch.bfloat16, torch.float32):
        rows, index, w = _case(dtype=dtype)
        ref = torch.ops.frugal_moe.weighted_sum_rows(rows, index, w, dtype)
        # the dispatcher's CPU path: unused slots point at an appended zero row
        padded = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        idx = torch.where(index >= 0, index, rows.shape[0])
        assert torch.equal(sum_pairs_fp32(padded, idx, w, dtype), ref)
        assert torch.equal(sum_pairs_fp32(padded, idx, None, dtype), torch.ops.frugal_moe.weighted_sum_rows(
            rows, index, None, dtype))  # fmt: skip
        # an independent per-element loop on one token
        t = 3
        acc = torch.zeros(rows.shape[1])
        for k in range(index.shape[1]):
            if index[t, k] >= 0:
                acc = acc + w[t, k] * rows[index[t, k]].float()
        assert torch.equal(ref[t], acc.to(dtype))


def test_pack_rows_fp8_reference_matches_quantize_1x128():
    import fp8

    x = torch.randn(9, 300) * 3
    index = torch.tensor([4, 0, 8, 8, 1])
    off = 300
    row_bytes = off + 4 * 3 + 4
    out = torch.ops.frugal_moe.pack_rows_fp8_1x128(x, index, row_bytes, off, 0)
    q = fp8.quantize_1x128(x[index])
    assert torch.equal(out[:, :300], q.data.view(torch.uint8))
    assert torch.equal(out[:, off : off + 12].contiguous().view(torch.float32), q.scale)
    assert not out[:, off + 12 :].any()
    with pytest.raises(ValueError, match="must be multiples of 4"):
        torch.ops.frugal_moe.pack_rows_fp8_1x128(x, index, row_bytes, 301, 0)


def test_opcheck_cpu():
    rows, index, w = _case(N=9, T=5, K=2, H=16, dtype=torch.float32)
    torch.library.opcheck(torch.ops.frugal_moe.gather_rows.default, (rows, index[:, 0]))
    torch.library.opcheck(torch.ops.frugal_moe.weighted_sum_rows.default, (rows, index, w, torch.bfloat16))
    x = torch.randn(6, 130)
    torch.library.opcheck(
        torch.ops.frugal_moe.pack_rows_fp8_1x128.default, (x, torch.tensor([1, 5]), 144, 132, 1)
    )


@needs_cuda
def test_kernels_match_cpu_reference():
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        rows, index, w = _case(dtype=dtype, H=1000)
        for weights in (w, None):
            for out_dtype in (torch.bfloat16, torch.float32):
                ref = torch.ops.frugal_moe.weighted_sum_rows(rows, index, weights, out_dtype)
                got = torch.ops.frugal_moe.weighted_sum_rows(
                    rows.cuda(), index.cuda(), None if weights is None else weights.cuda(), out_dtype
                )
                assert torch.equal(got.cpu(), ref), (dtype, out_dtype)
        for H in (300, 1024):  # byte path and 16-byte vector path
            rows, index, _ = _case(dtype=dtype, H=H)
            ref = torch.ops.frugal_moe.gather_rows(rows, index[:, 0])
            assert torch.equal(torch.ops.frugal_moe.gather_rows(rows.cuda(), index[:, 0].cuda()).cpu(), ref)
    x = torch.randn(40, 1000) * torch.logspace(-3, 3, 1000)
    index = torch.randint(0, 40, (25,))
    for fmt in (0, 1):
        ref = torch.ops.frugal_moe.pack_rows_fp8_1x128(x, index, 1040, 1000, fmt)
        got = torch.ops.frugal_moe.pack_rows_fp8_1x128(x.cuda(), index.cuda(), 1040, 1000, fmt)
        assert torch.equal(got.cpu(), ref)
