"""Row gathers and the combine's FP32 weighted sums: the memory passes of a dispatch/combine.

Every byte a dispatch or combine moves is also touched by these passes (pack, expand to the expert
layout, gather the pairs, sum them), so on a CPU, where they share the cores with the transport's copies,
their cost per byte decides the overhead over a plain all-to-all.

``gather_rows``  out[i] = src[index[i]]. On CPU the rows are reinterpreted as the widest integer words
                 that tile them (int64 for BF16 rows of an even width, packed dispatch rows, ...): ATen's
                 index_select copies one element at a time, so 8-byte elements cost a quarter of BF16's and
                 an eighth of bytes' (measured 0.7 ms vs 4.3 ms for 4096 packed 2 KiB rows, one core).
                 On CUDA with the extension: the 16-byte-vector kernel of csrc/moe_comm.
``sum_pairs_fp32``  out[t] = sum_k w[t, k] * rows[index[t, k]] in FP32, k ascending (combine, dispatch
                 backward, reduced partials). On CUDA with the extension: one fused kernel.
``weights_grad``   d topk_weights of the pairs combine.
"""

from __future__ import annotations

import torch

__all__ = ["gather_rows", "stable_argsort", "sum_pairs_fp32", "weights_grad"]

_WORDS = ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2))
_BLOCK_BYTES = 2 << 20  # FP32 accumulator rows per block of the weighted sum (fits in a core's L2 + L3 share)


def as_words(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor with contiguous rows viewed as the widest integer words that tile its rows (the same
    bytes), or ``t`` itself when none does (1-D, strided rows, odd byte widths, offsets not aligned)."""
    if t.dim() != 2 or t.stride(1) != 1 or t.shape[1] == 0:
        return t
    es = t.element_size()
    row_bytes, stride_bytes, offset_bytes = t.shape[1] * es, t.stride(0) * es, t.storage_offset() * es
    for dtype, size in _WORDS:
        if size <= es:
            break
        if row_bytes % size == 0 and stride_bytes % size == 0 and offset_bytes % size == 0:
            return t.view(dtype)
    return t


def stable_argsort(key: torch.Tensor) -> torch.Tensor:
    """(n,) int64 indices that sort ``key`` (n,) integer, ties in index order.

    The keys must fit in int32 (callers sort by peer rank or local expert): on CPU they are sorted as
    int32, half the bytes per pass (measured 250 us vs 500 us for 32768 keys, one core)."""
    if not key.is_cuda and key.dtype == torch.int64:
        key = key.int()
    return torch.sort(key, stable=True).indices


def gather_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(len(index), ...) = src[index] along dim 0; index (n,) int64 in [0, src.shape[0]).

    ``out`` (n, ...) of src's dtype may be a strided view (a field of packed rows); it is returned."""
    if out is None:
        if src.is_cuda:
            from moe_comm.cuda_ops import use_kernels

            if use_kernels(src):
                return torch.ops.frugal_moe.gather_rows(src, index)
        out = src.new_empty((index.numel(), *src.shape[1:]))
    s, o = as_words(src), as_words(out)
    if s.dtype == o.dtype and s.shape[1:] == o.shape[1:]:
        torch.index_select(s, 0, index, out=o)
    else:
        torch.index_select(src, 0, index, out=out)
    return out


def sum_pairs_fp32(
    rows: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor | None,
    dtype: torch.dtype,
    unused: int | None = None,
) -> torch.Tensor:
    """(T, H): sum over k ascending, in FP32 from 0, of weights[:, k] * rows[index[:, k]] (weights None: 1).

    rows (N, H) any float dtype; index (T, K) int64 rows of each slot; slots whose index equals ``unused``
    (default N - 1: callers append a zero row) add nothing. The product of a row and its FP32 weight is
    formed in FP32 (the row's value converts exactly), then added: the same two roundings as
    ``acc = acc + w * y.float()`` per k, so a plain reference reproduces it bit for bit.

    CPU schedule: blocks of output rows whose FP32 accumulator fits in cache (``_BLOCK_BYTES``), each
    summing all its slots before the next block starts, so the FP32 temporaries never travel to memory
    (measured under 4 busy ranks on 2 cores: half the time at H=7168, K=8). A column that is mostly
    unused gathers its live rows only (one rounded add per element: the rows are unique). The first
    term of a block initialises the accumulator (no zero fill, no add): adding it to +0 would only turn a
    -0 into +0, and a -0 survives the later adds only if every term is a zero, so one ``+ 0`` on the
    output restores the reference's bits (x + 0 == x for every other x, and skipping a zero term is exact).
    """
    unused = rows.shape[0] - 1 if unused is None else unused
    if rows.is_cuda:
        from moe_comm.cuda_ops import use_kernels

        if use_kernels(rows):  # one fused pass (csrc/moe_comm/permute_rows.cu), same roundings
            idx = torch.where(index == unused, -1, index)
            return torch.ops.frugal_moe.weighted_sum_rows(rows, idx, weights, dtype)
    T, K = index.shape
    tail, dev = rows.shape[1:], rows.device
    width = max(1, rows[0].numel()) if rows.shape[0] else 1
    B = max(1, min(T, _BLOCK_BYTES // (4 * width)))
    # Per column: None (no live slot), "dense" (gather every row: unused slots read the zero row, +0), or
    # the live rows (ascending) with each block's [lo, hi) range among them.
    plan: list = []
    is_live = index != unused
    live_counts = is_live.sum(0).tolist()  # one count for all columns
    for n in live_counts:
        plan.append(None if n == 0 else "dense" if n == T or (unused >= 0 and 2 * n >= T) else "sparse")
    sparse = [k for k, p in enumerate(plan) if p == "sparse"]
    if sparse:
        # every sparse column's live rows and per-block bounds with one more host read in all (not two per
        # column): the live (column, row) pairs come out column-major with rows ascending, sized by the
        # counts already read; the bounds are running sums of live rows per block of B rows
        mask = is_live[:, sparse].t()  # (S, T)
        sizes = [live_counts[k] for k in sparse]
        rows_live = torch.nonzero_static(mask, size=sum(sizes))[:, 1].split(sizes)
        nb = (T + B - 1) // B
        per_block = torch.nn.functional.pad(mask, (0, nb * B - T)).view(len(sparse), nb, B).sum(2)
        bounds = torch.nn.functional.pad(per_block.cumsum(1), (1, 0)).tolist()
        for k, live, bd in zip(sparse, rows_live, bounds):
            plan[k] = (live, bd)
    out = torch.empty((T, *tail), dtype=dtype, device=dev)
    acc_buf = torch.empty((B, *tail), dtype=torch.float32, device=dev)
    term_buf = picked_buf = None
    for blk, a in enumerate(range(0, T, B)):
        b = min(T, a + B)
        acc, started = acc_buf[: b - a], False
        for k, p in enumerate(plan):
            if p is None:
                continue
            if isinstance(p, str):  # dense column
                if picked_buf is None:
                    picked_buf = rows.new_empty((B, *tail))
                picked = gather_rows(rows, index[a:b, k], out=picked_buf[: b - a])
                if started:
                    if term_buf is None:
                        term_buf = torch.empty_like(acc_buf)
                    dst = term_buf[: b - a]
                else:
                    dst = acc
                dst.copy_(picked)  # convert first: mixed-dtype elementwise ops take a slow path on CPU
                if weights is not None:
                    dst.mul_(weights[a:b, k : k + 1])
                if started:
                    acc.add_(dst)
                started = True
                continue
            live, bounds = p
            lo, hi = bounds[blk], bounds[blk + 1]
            if lo == hi:
                continue
            sel = live[lo:hi]
            if not started:
                acc.zero_()
                started = True
            part = gather_rows(rows, index[:, k].index_select(0, sel)).float()
            if weights is not None:
                part.mul_(weights[:, k].index_select(0, sel)[:, None])
            acc.index_add_(0, sel - a, part)
        dst = out[a:b]
        if started:
            dst.copy_(acc.add_(0))  # -0 -> +0 (see above), in the cached FP32 block, not on the output
        else:
            dst.zero_()
    return out


def weights_grad(
    grad_out: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, topk_idx: torch.Tensor
) -> torch.Tensor:
    """d topk_weights (T, K) fp32 = <grad_out[t], rows[index[t, k]]> in FP32; 0 at unused slots."""
    g = grad_out.float()
    cols = [(g * gather_rows(rows, index[:, k]).float()).sum(-1) for k in range(index.shape[1])]
    return torch.where(topk_idx >= 0, torch.stack(cols, dim=1), 0.0)
