"""Grouped FP8 GEMMs for mixture-of-experts: one ``a_g @ b[g].T`` per expert ``g`` in a single call.

Two layouts of the tokens routed to G local experts (names as in DeepGEMM: M-grouped, NT):

* contiguous: ``a`` (sum_g M_g, K) holds the rows of expert 0, then expert 1, ...; ``m_offsets`` (G+1,)
  gives the boundaries (``rows m_offsets[g] : m_offsets[g+1]`` belong to expert g). Used in training
  and prefill, where the per-expert counts are known after the dispatch layout is computed. Any M_g >= 0
  (no alignment to 128 is required of the caller).
* masked: ``a`` (G, M_max, K) with ``masked_m[g]`` valid rows per expert; rows ``>= masked_m[g]`` are
  ignored on input (they may hold anything, even NaN) and written as exact zeros on output. Used where the
  counts stay on the device (decoding with CUDA graphs, low-latency dispatch).

Numerics are those of :func:`fp8.gemm` (1x128 activations, 128x128 weight blocks, FP32 promotion every
128 of K); ``b`` (G, N, K) is quantized per 128x128 block of each expert's (N, K) weight.
"""

from __future__ import annotations

import torch

from fp8.backends import register_impl, select_backend
from fp8.gemm import as_fp8, gemm_nt_fp32, resolve_out
from fp8.quant import BLOCK, FP8Tensor, quantize_1x128, quantize_128x128


def grouped_gemm_contiguous(
    a: torch.Tensor | FP8Tensor,
    b: torch.Tensor | FP8Tensor,
    m_offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Rows ``m_offsets[g] : m_offsets[g+1]`` of the result are ``a[those rows] @ b[g].T``.

    a: (sum_g M_g, K) float tensor (quantized 1x128) or FP8Tensor (1, 128).
    b: (G, N, K) float tensor (quantized 128x128 per expert) or FP8Tensor (128, 128) of that shape.
    m_offsets: (G+1,) int32/int64, m_offsets[0] == 0, non-decreasing, m_offsets[G] == a.shape[0]. The values
       are checked (ValueError) when on the CPU; offsets on a GPU are trusted (no host sync).
    Returns (sum_g M_g, N) of out_dtype (bfloat16 by default), or ``out`` filled in place.
    """
    aq = as_fp8(a, "a", (1, BLOCK), quantize_1x128)
    bq = as_fp8(b, "b", (BLOCK, BLOCK), quantize_128x128)
    g, n, k = _check_grouped_b(bq, aq)
    if aq.dim() != 2:
        raise ValueError(
            f"a must be 2-D (sum_g M_g, K) in the contiguous layout, got shape {tuple(aq.shape)}"
        )
    _check_offsets(m_offsets, g, aq.shape[0])
    out_dtype = resolve_out(out, out_dtype, False, (aq.shape[0], n))
    _, impl = select_backend("grouped_gemm_contiguous", aq.device, backend)
    return impl(aq, bq, m_offsets, _host_copy(m_offsets), out_dtype=out_dtype, out=out)


def grouped_gemm_masked(
    a: torch.Tensor | FP8Tensor,
    b: torch.Tensor | FP8Tensor,
    masked_m: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``out[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T``; ``out[g, masked_m[g]:] = 0`` exactly.

    a: (G, M_max, K) float tensor (quantized 1x128; its padding rows are zeroed first so that garbage there
       can neither raise nor leak) or FP8Tensor (1, 128) of that shape.
    b: (G, N, K) float tensor or FP8Tensor (128, 128).
    masked_m: (G,) int32/int64, 0 <= masked_m[g] <= M_max (checked when on the CPU; trusted on a GPU).
    Returns (G, M_max, N) of out_dtype (bfloat16 by default), or ``out`` filled in place.
    """
    if isinstance(a, torch.Tensor) and a.dim() == 3 and isinstance(masked_m, torch.Tensor):
        _check_masked_m(masked_m, a.shape[0], a.shape[1])
        valid = torch.arange(a.shape[1], device=a.device).unsqueeze(0) < masked_m.to(a.device).unsqueeze(1)
        a = torch.where(valid.unsqueeze(-1), a, torch.zeros((), dtype=a.dtype, device=a.device))
    aq = as_fp8(a, "a", (1, BLOCK), quantize_1x128)
    bq = as_fp8(b, "b", (BLOCK, BLOCK), quantize_128x128)
    g, n, k = _check_grouped_b(bq, aq)
    if aq.dim() != 3 or aq.shape[0] != g:
        raise ValueError(f"a must be (G={g}, M_max, K) in the masked layout, got shape {tuple(aq.shape)}")
    _check_masked_m(masked_m, g, aq.shape[1])
    out_dtype = resolve_out(out, out_dtype, False, (g, aq.shape[1], n))
    _, impl = select_backend("grouped_gemm_masked", aq.device, backend)
    return impl(aq, bq, masked_m, _host_copy(masked_m), out_dtype=out_dtype, out=out)


def _check_grouped_b(bq: FP8Tensor, aq: FP8Tensor) -> tuple[int, int, int]:
    if bq.dim() != 3:
        raise ValueError(f"b must be 3-D (G, N, K), got shape {tuple(bq.shape)}")
    g, n, k = bq.shape
    if aq.shape[-1] != k:
        raise ValueError(
            f"a.shape={tuple(aq.shape)} and b.shape={tuple(bq.shape)} need the same K (last dim)"
        )
    if aq.device != bq.device:
        raise ValueError(f"operands on different devices: a on {aq.device}, b on {bq.device}")
    return g, n, k


def _check_int_vector(t: torch.Tensor, arg: str, length: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be an integer torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{arg}.dtype={t.dtype} must be torch.int32 or torch.int64")
    if tuple(t.shape) != (length,):
        raise ValueError(f"{arg}.shape={tuple(t.shape)} must be ({length},)")


def _check_offsets(m_offsets: torch.Tensor, g: int, m_total: int) -> None:
    """Dtype and shape always; the values only when they are on the CPU (no host sync for device-resident
    offsets, which the kernels trust: they come from the dispatch layout)."""
    _check_int_vector(m_offsets, "m_offsets", g + 1)
    if m_offsets.device.type != "cpu":
        return
    if (
        int(m_offsets[0]) != 0
        or int(m_offsets[-1]) != m_total
        or bool((m_offsets[1:] < m_offsets[:-1]).any())
    ):
        raise ValueError(
            f"m_offsets={m_offsets.tolist()} must start at 0, never decrease and end at a.shape[0]={m_total}"
        )


def _check_masked_m(masked_m: torch.Tensor, g: int, m_max: int) -> None:
    """As _check_offsets: values checked when on the CPU only."""
    _check_int_vector(masked_m, "masked_m", g)
    if masked_m.device.type == "cpu" and (bool((masked_m < 0).any()) or bool((masked_m > m_max).any())):
        raise ValueError(f"masked_m={masked_m.tolist()} must be within [0, M_max={m_max}]")


def _host_copy(index: torch.Tensor) -> torch.Tensor | None:
    """The index as a CPU tensor when it already is one (free), else None: implementations that need the
    values on the host (the reference) copy them themselves; the kernels read the device tensor."""
    return index if index.device.type == "cpu" else None


def _group(t: FP8Tensor, g: int, rows: slice | None = None) -> FP8Tensor:
    """Expert g's 2-D slice of a stacked FP8Tensor (rows of the 1x128 scales follow the data rows)."""
    data, scale = t.data[g], t.scale[g]
    if rows is not None:
        data, scale = data[rows], scale[rows]
    return FP8Tensor(data, scale, t.block, t.scale_format)


@register_impl("grouped_gemm_contiguous", "reference")
def _contiguous_reference(
    a: FP8Tensor,
    b: FP8Tensor,
    m_offsets: torch.Tensor,
    host_offsets: torch.Tensor | None,
    *,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
) -> torch.Tensor:
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    bounds = (m_offsets if host_offsets is None else host_offsets).tolist()
    for g in range(b.shape[0]):  # one vectorised GEMM per expert (experts are few; tiles are not looped)
        lo, hi = bounds[g], bounds[g + 1]
        if hi > lo:
            rows = FP8Tensor(a.data[lo:hi], a.scale[lo:hi], a.block, a.scale_format)
            out[lo:hi] = gemm_nt_fp32(rows, _group(b, g))
    return out


@register_impl("grouped_gemm_masked", "reference")
def _masked_reference(
    a: FP8Tensor,
    b: FP8Tensor,
    masked_m: torch.Tensor,
    host_masked_m: torch.Tensor | None,
    *,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
) -> torch.Tensor:
    g_count, m_max, n = a.shape[0], a.shape[1], b.shape[1]
    if out is None:
        out = torch.empty(g_count, m_max, n, dtype=out_dtype, device=a.device)
    for g, m in enumerate((masked_m if host_masked_m is None else host_masked_m).tolist()):
        if m > 0:
            out[g, :m] = gemm_nt_fp32(_group(a, g, slice(0, m)), _group(b, g))
        out[g, m:] = 0
    return out
