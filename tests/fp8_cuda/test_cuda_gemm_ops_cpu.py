"""CPU-side checks of the CUDA backend (fp8/cuda_gemm_ops.py) that need no GPU: fake implementations
(shapes and argument errors through the ops themselves, on meta tensors), the wrapper's layout helpers,
that every fp8._C call in Python matches a binding in csrc/fp8/bindings.cpp (name and argument count), the
backend registration, the reference path of the grouped weight gradient, and the benchmark's CPU exit."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fp8
import fp8.cuda_gemm_ops as ops
import fp8.cuda_quant_ops as qops
from fp8.quant import BLOCK, ceil_div

from .reference import grouped_colwise_reference, grouped_wgrad_fp32

ROOT = Path(__file__).resolve().parents[2]
E4M3 = torch.float8_e4m3fn
F = torch.ops.frugal_fp8


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


# --------------------------------------------------------------------------------------------- fake impls


@pytest.mark.parametrize("t, c", [(1, 1), (300, 200), (256, 7168)])
def test_quant_fakes_shapes(t, c):
    x = meta(t, c, dtype=torch.bfloat16)
    q, s, qt, st, flag = F.quant_rowwise_colwise(x, 0, True, True)
    nb = ceil_div(t, BLOCK)
    assert (q.shape, q.dtype, s.shape) == ((t, c), E4M3, (t, ceil_div(c, BLOCK)))
    assert (qt.shape, qt.dtype, st.shape, flag.shape) == ((c, nb * BLOCK), E4M3, (nb, c), (1,))
    q, s, qt, st, flag = F.quant_rowwise_colwise(x, 1, False, True)
    assert q.numel() == 0 and s.numel() == 0 and qt.shape == (c, nb * BLOCK)
    offsets = meta(4, dtype=torch.int32)
    q, s, qt, st, blk, flag = F.quant_colwise_grouped(x, offsets, 2, True)
    assert q.shape == (t, c) and qt.shape == (c, (t // BLOCK + 3) * BLOCK) and st.shape == (t // BLOCK + 3, c)
    assert blk.shape == (4,) and blk.dtype == torch.int32
    q, s, flag = F.quant_per_block_128x128(meta(3, t, c), 0)
    assert q.shape == (3, t, c) and s.shape == (3, ceil_div(t, BLOCK), ceil_div(c, BLOCK))


def test_gemm_fakes_shapes():
    m, n, k = 7, 257, 300
    a, sfa = meta(m, k, dtype=E4M3), meta(m, ceil_div(k, BLOCK))
    b, sfb = meta(n, k, dtype=E4M3), meta(ceil_div(n, BLOCK), ceil_div(k, BLOCK))
    for dt in (torch.bfloat16, torch.float32):
        y = F.gemm_nt(a, sfa, b, sfb, dt)
        assert y.shape == (m, n) and y.dtype == dt
    F.gemm_nt_out_(a, sfa, b, sfb, meta(m, n), True)
    g = 3
    bg, sfbg = meta(g, n, k, dtype=E4M3), meta(g, ceil_div(n, BLOCK), ceil_div(k, BLOCK))
    y = F.m_grouped_gemm_nt_contiguous(a, sfa, bg, sfbg, meta(g + 1, dtype=torch.int64), torch.bfloat16)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    am, sfam = meta(g, 5, k, dtype=E4M3), meta(g, 5, ceil_div(k, BLOCK))
    y = F.m_grouped_gemm_nt_masked(am, sfam, bg, sfbg, meta(g, dtype=torch.int32), torch.float32)
    assert y.shape == (g, 5, n) and y.dtype == torch.float32
    t = 300
    dyt, xt = meta(n, t, dtype=E4M3), meta(k, t, dtype=E4M3)
    nb = ceil_div(t, BLOCK)
    F.gemm_wgrad_out_(dyt, meta(nb, n), xt, meta(nb, k), meta(n, k), t, False)
    cap = t // BLOCK + g
    F.m_grouped_gemm_wgrad_out_(
        meta(n, cap * BLOCK, dtype=E4M3), meta(cap, n), meta(k, cap * BLOCK, dtype=E4M3), meta(cap, k),
        meta(g + 1, dtype=torch.int32), meta(g + 1, dtype=torch.int32), meta(g, n, k), True,
    )  # fmt: skip


def test_ops_reject_bad_arguments_with_their_values():
    a, sfa = meta(8, 256, dtype=E4M3), meta(8, 2)
    b, sfb = meta(64, 256, dtype=E4M3), meta(1, 2)
    with pytest.raises(ValueError, match=r"sfa.shape=\(8, 3\) must be \(M, ceil\(K/128\)\)=\(8, 2\)"):
        F.gemm_nt(a, meta(8, 3), b, sfb, torch.bfloat16)
    with pytest.raises(ValueError, match=r"a.dtype=torch.bfloat16"):
        F.gemm_nt(meta(8, 256, dtype=torch.bfloat16), sfa, b, sfb, torch.bfloat16)
    with pytest.raises(ValueError, match=r"out_dtype=torch.float16 must be one of"):
        F.gemm_nt(a, sfa, b, sfb, torch.float16)
    with pytest.raises(ValueError, match="accumulate=True needs a float32 out"):
        F.gemm_nt_out_(a, sfa, b, sfb, meta(8, 64, dtype=torch.bfloat16), True)
    with pytest.raises(ValueError, match=r"out.shape=\(8, 63\) must be \(8, 64\)"):
        F.gemm_nt_out_(a, sfa, b, sfb, meta(8, 63), False)
    bg, sfbg = meta(2, 64, 256, dtype=E4M3), meta(2, 1, 2)
    with pytest.raises(ValueError, match=r"index.shape=\(2,\) must be \(3,\)"):
        F.m_grouped_gemm_nt_contiguous(a, sfa, bg, sfbg, meta(2, dtype=torch.int64), torch.bfloat16)
    with pytest.raises(ValueError, match=r"must be e4m3 \(G, M_max, K\) with K=256, G=2"):
        F.m_grouped_gemm_nt_masked(
            meta(3, 4, 256, dtype=E4M3), meta(3, 4, 2), bg, sfbg, meta(2), torch.bfloat16
        )
    with pytest.raises(ValueError, match=r"scale_format=5 must be one of \[0, 1, 2\]"):
        F.quant_rowwise_colwise(meta(4, 4), 5, True, False)
    with pytest.raises(ValueError, match="token_offsets must be \\(G\\+1,\\) int32"):
        F.quant_colwise_grouped(meta(4, 4), meta(3, dtype=torch.int64), 0, False)
    with pytest.raises(ValueError, match=r"out must be float32 \(64, 32\)"):
        F.gemm_wgrad_out_(meta(64, 10, dtype=E4M3), meta(1, 64), meta(32, 10, dtype=E4M3), meta(1, 32),
                          meta(64, 32, dtype=torch.bfloat16), 10, False)  # fmt: skip
    with pytest.raises(ValueError, match="scales need ceil\\(T/128\\)=1 rows"):
        F.gemm_wgrad_out_(meta(64, 10, dtype=E4M3), meta(2, 64), meta(32, 10, dtype=E4M3), meta(2, 32),
                          meta(64, 32), 10, False)  # fmt: skip


# ------------------------------------------------------------------------------------------ layout helpers


def test_rows16_keeps_aligned_rows_and_copies_the_rest():
    base = torch.randn(5, 64).to(E4M3)
    same, ld = ops._rows16(base[:, :40])  # row stride 64: already TMA-aligned, no copy
    assert same.data_ptr() == base.data_ptr() and ld == 64
    odd = torch.randn(5, 40).to(E4M3)  # row stride 40: not a multiple of 16
    copy, ld = ops._rows16(odd)
    assert ld == 48 and copy.data_ptr() != odd.data_ptr()
    assert torch.equal(copy[:, :40].view(torch.uint8), odd.view(torch.uint8))
    t = torch.randn(40, 5).to(E4M3).t()  # column-major view: copied into rows
    copy, ld = ops._rows16(t)
    assert ld == 48 and torch.equal(copy[:, :40].view(torch.uint8), t.contiguous().view(torch.uint8))


def test_dense_operand_meets_cutlass_alignment_rule():
    base = torch.randn(5, 64).to(E4M3)
    assert ops._dense_operand(base[:, :32], 5, 32).data_ptr() == base.data_ptr()  # K, stride multiples of 16
    tail = ops._dense_operand(base[:, :40], 8, 48)  # K=40: zero-padded to 48 columns, and rows to 8
    assert tail.shape == (8, 48) and torch.equal(
        tail[:5, :40].view(torch.uint8), base[:, :40].view(torch.uint8)
    )
    assert not tail[:5, 40:].view(torch.uint8).any() and not tail[5:].view(torch.uint8).any()


def test_pad_k16_zero_pads():
    x = torch.randn(2, 3, 100).to(E4M3)
    p = ops._pad_k16(x)
    assert p.shape == (2, 3, 112) and p.is_contiguous()
    assert torch.equal(p[..., :100].view(torch.uint8), x.view(torch.uint8))
    assert not p[..., 100:].view(torch.uint8).any()
    y = torch.randn(4, 128).to(E4M3)
    assert ops._pad_k16(y) is y


# ------------------------------------------------------------------------------ Python <-> C++ bindings


def _bindings() -> dict[str, int]:
    src = (ROOT / "csrc/fp8/bindings.cpp").read_text()
    defs = re.findall(r'm\.def\("(\w+)",\s*&[\w:]+,(.*?)\);', src, flags=re.S)
    return {name: body.count("py::arg(") for name, body in defs}


def _ext_calls(path: Path) -> list[tuple[str, int]]:
    """(binding name, positional args) of every ``ext.f(...)`` / ``_ext().f(...)`` call; ``run(...)`` in
    the grouped wrapper stands for both grouped GEMMs."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and (
            (isinstance(f.value, ast.Name) and f.value.id == "ext")
            or (isinstance(f.value, ast.Call) and getattr(f.value.func, "id", "") == "_ext")
        ):
            names = [f.attr]
        elif isinstance(f, ast.Name) and f.id == "run" and len(node.args) > 1:
            names = [f"sm90_m_grouped_fp8_gemm_nt_{kind}" for kind in ("contiguous", "masked")]
        else:
            continue
        assert not any(isinstance(a, ast.Starred) for a in node.args), f"{names}: keep fp8._C calls explicit"
        calls += [(name, len(node.args) + len(node.keywords)) for name in names]
    return calls


def test_every_extension_call_matches_a_binding():
    bindings = _bindings()
    assert "quant_per_token_1x128" in bindings and len(bindings) >= 12
    calls = _ext_calls(ROOT / "fp8/cuda_gemm_ops.py") + _ext_calls(ROOT / "fp8/cuda_quant_ops.py")
    assert len(calls) >= 12
    for name, nargs in calls:
        assert name in bindings, f"fp8._C has no binding {name!r}"
        assert nargs == bindings[name], (
            f"{name}: Python passes {nargs} arguments, the binding takes {bindings[name]}"
        )


def test_cuda_backend_registers_every_op():
    from fp8.backends import _IMPLS, OPS, select_backend

    for op in OPS:
        assert _IMPLS[(op, "cuda")].__module__ == "fp8.cuda_gemm_ops"
    with pytest.raises(RuntimeError, match="backend='cuda' was asked for gemm on cpu but is unavailable"):
        select_backend("gemm", torch.device("cpu"), "cuda")


# --------------------------------------------------------------------- grouped weight grad, reference path


def test_grouped_wgrad_reference_path_on_cpu():
    gen = torch.Generator().manual_seed(7)
    offsets = [0, 130, 130, 300, 301]  # an empty expert, a tail, a single token
    t, n, k = offsets[-1], 72, 200
    dy, x = torch.randn(t, n, generator=gen), torch.randn(t, k, generator=gen)
    m_offsets = torch.tensor(offsets)
    ref = grouped_wgrad_fp32(dy, x, offsets)
    out = ops.grouped_gemm_wgrad_contiguous(dy, x, m_offsets)
    assert out.shape == (4, n, k) and not out[1].any()
    for e in (0, 2, 3):
        assert fp8.calc_diff(out[e], ref[e]) < 1e-3
    acc = torch.randn(4, n, k, generator=gen)
    expect = acc + out
    ops.grouped_gemm_wgrad_contiguous(dy, x, m_offsets, out=acc, accumulate=True, backend="reference")
    torch.testing.assert_close(acc, expect, rtol=1e-6, atol=1e-5)
    with pytest.raises(RuntimeError, match="backend='cuda' was asked for grouped_gemm_wgrad_contiguous"):
        ops.grouped_gemm_wgrad_contiguous(dy, x, m_offsets, backend="cuda")


def test_grouped_token_layout_reference_round_trips_through_expert():
    gen = torch.Generator().manual_seed(8)
    offsets = [0, 0, 200, 329]
    x = torch.randn(offsets[-1], 96, generator=gen)
    qt, scale, blk = grouped_colwise_reference(x, offsets)
    assert blk == [0, 1, 3, 5] and qt.shape == (96, (329 // BLOCK + 3) * BLOCK)
    off32, blk32 = torch.tensor(offsets, dtype=torch.int32), torch.tensor(blk, dtype=torch.int32)
    grouped = qops.GroupedTokenFP8(qt, scale, off32, blk32, offsets[-1], fp8.ScaleFormat.FP32)
    for e in (1, 2):
        want = fp8.quantize_128x1(x[offsets[e] : offsets[e + 1]])
        got = grouped.expert(e)
        assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
        assert torch.equal(got.scale, want.scale)
    assert grouped.expert(0).shape == (0, 96) and not qt[:, :BLOCK].view(torch.uint8).any()


# ---------------------------------------------------------------------------------------------- benchmark


def test_benchmark_explains_itself_without_a_gpu():
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "bench.bench_fp8_gemm", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "needs a CUDA GPU" in r.stdout and "nothing was timed" in r.stdout
