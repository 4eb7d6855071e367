"""Row gathers (integer-word views) and the blocked FP32 weighted sum against plain references, bitwise."""

from __future__ import annotations

import pytest
import torch

import moe_comm.row_ops as row_ops
from moe_comm.row_ops import as_words, gather_rows, sum_pairs_fp32


def _rows(n: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n, width), generator=g, dtype=torch.uint8)
    return torch.randn(n, width, generator=g).to(dtype)


@pytest.mark.parametrize(
    "dtype, width, word",
    [
        (torch.bfloat16, 1024, torch.int64),
        (torch.bfloat16, 6, torch.int32),  # 12 bytes
        (torch.bfloat16, 3, torch.bfloat16),  # 6 bytes: int16 is no wider than bf16
        (torch.float32, 5, torch.float32),  # 20 bytes: int32 is no wider
        (torch.uint8, 2064, torch.int64),  # a packed dispatch row
        (torch.uint8, 6, torch.int16),
        (torch.uint8, 7, torch.uint8),
    ],
)
def test_gather_rows_equals_index_select(dtype, width, word):
    src = _rows(37, width, dtype, seed=width)
    index = torch.randint(0, 37, (53,), generator=torch.Generator().manual_seed(1))
    assert as_words(src).dtype == word
    got = gather_rows(src, index)
    assert got.dtype == dtype and torch.equal(
        got.view(torch.uint8), src.index_select(0, index).view(torch.uint8)
    )
    # into a strided field of wider packed rows, and from one (the dispatch's pack / expand)
    packed = torch.zeros(53, width * src.element_size() + 16, dtype=torch.uint8)
    field = packed[:, : width * src.element_size()].view(dtype)
    assert gather_rows(src, index, out=field) is field
    assert torch.equal(field.view(torch.uint8), src.index_select(0, index).view(torch.uint8))
    assert (packed[:, width * src.element_size() :] == 0).all()  # the rest of each row is untouched
    back = gather_rows(field, torch.arange(52, -1, -1))
    assert torch.equal(back.view(torch.uint8), field.flip(0).view(torch.uint8))


def test_gather_rows_unaligned_offset_falls_back():
    buf = _rows(10, 17, torch.uint8, seed=3)
    src = buf[:, 1:9]  # 8 bytes per row but rows start at odd offsets: no int64 view
    assert as_words(src).dtype == torch.uint8
    index = torch.tensor([4, 0, 9, 9, 2])
    assert torch.equal(gather_rows(src, index), src.index_select(0, index))


def _reference_sum(rows, index, weights, dtype, unused):
    """acc = acc + w * y.float() per k from +0, unused slots skipped: the documented semantics."""
    T, K = index.shape
    acc = torch.zeros(T, rows.shape[1], dtype=torch.float32)
    for k in range(K):
        live = (index[:, k] != unused)[:, None]
        y = rows.index_select(0, index[:, k].clamp(min=0)).float()
        term = y if weights is None else weights[:, k : k + 1] * y
        acc = torch.where(live, acc + term, acc)
    return acc.to(dtype)


def _routing(T: int, K: int, N: int, unused: int, live_frac: list[float], seed: int):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, N, (T, K), generator=g)
    for k, frac in enumerate(live_frac):
        dead = torch.rand(T, generator=g) >= frac
        index[dead, k] = unused
    return index


@pytest.mark.parametrize("block_rows", [3, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weighted", [True, False])
def test_sum_pairs_fp32_bitwise(monkeypatch, block_rows, dtype, weighted):
    T, K, H, N = 29, 6, 24, 70
    monkeypatch.setattr(row_ops, "_BLOCK_BYTES", 4 * H * block_rows)
    rows = _rows(N + 1, H, dtype, seed=7)
    rows[N] = 0  # the appended zero row that unused slots point at
    rows[3] = -0.0  # negative zeros: a sum of -0 terms must still come out +0
    rows[5, :4] = -0.0
    # dense, empty, sparse (two) and half-live columns (the two gather paths), odd sizes, several blocks
    index = _routing(T, K, N, N, [1.0, 0.0, 0.2, 0.6, 1.0, 0.1], seed=8)
    index[0] = torch.tensor([3, N, 3, 3, 5, N])  # row 0: only -0 terms
    weights = torch.rand(T, K, generator=torch.Generator().manual_seed(9)) if weighted else None
    got = sum_pairs_fp32(rows, index, weights, dtype)
    want = _reference_sum(rows, index, weights, dtype, N)
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert got[0, :4].view(torch.uint8).eq(0).all()  # +0, not -0


@pytest.mark.parametrize("block_rows", [4, 100])
def test_sum_pairs_fp32_unused_minus_one(monkeypatch, block_rows):
    """The reduced combine's partials: unused slots are -1 (no zero row); live columns only gather."""
    T, K, H, N = 23, 4, 16, 40
    monkeypatch.setattr(row_ops, "_BLOCK_BYTES", 4 * H * block_rows)
    rows = _rows(N, H, torch.bfloat16, seed=11)
    index = _routing(T, K, N, -1, [1.0, 0.9, 0.3, 0.0], seed=12)
    weights = torch.rand(T, K, generator=torch.Generator().manual_seed(13))
    got = sum_pairs_fp32(rows, index, weights, torch.bfloat16, unused=-1)
    want = _reference_sum(rows, index, weights, torch.bfloat16, -1)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_sum_pairs_fp32_nothing_live():
    rows = _rows(5, 8, torch.bfloat16, seed=1)
    index = torch.full((3, 2), 4)
    out = sum_pairs_fp32(rows, index, None, torch.bfloat16)
    assert out.shape == (3, 8) and out.view(torch.int16).eq(0).all()
