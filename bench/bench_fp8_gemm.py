"""The sm90 FP8 kernels (csrc/fp8, the "cuda" backend) against torch in the same run, on DeepSeek-V3 shapes.

    python -m bench.bench_fp8_gemm          # Hopper GPU, fp8._C built: every table, JSON in bench/results/
    python -m bench.bench_fp8_gemm --quick  # M=4096 on two shapes, one grouped and one quantizer case

Tables (issue 3's Benchmark section), operands quantized beforehand, L2 flushed before every run, median of
CUDA-event timings, TFLOPS = 2 * (useful M) * N * K / t:

* dense ``fp8.gemm`` (1x128 x 128x128 -> bf16): M in {64, 128, 4096} x (N, K) of DeepSeek-V3;
* grouped contiguous (4 x 8192, 8 x 4096 rows) and masked (1 x 1024, 2 x 512, 4 x 256; all rows valid) with
  (N, K) in {(4096, 7168), (7168, 2048)};
* weight grad dW (N, K) = dY^T X over 4096 tokens at the dense (N, K) shapes (fp32 out);
* quantizers (1x128, 128x1 transposed, both in one pass, 128x128) in GB/s against a device-to-device
  copy of the same input timed in the same run.

Peers: BF16 ``torch.mm`` (``torch.bmm`` for equal-size groups) and torch's blockwise ``F.scaled_mm``
(cuBLASLt 1x128 x 128x128; grouped: one call per group; "n/a" where torch rejects the layout). Ratios are
peer time / our time (> 1: ours is faster); the summary gives their geometric means. Each row also carries
``calc_diff`` against FP32 of the unquantized inputs. Without a CUDA GPU, the extension or sm_90 the script
says so and exits 0 having timed nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.common import geomean, print_table, time_fn, write_results

V3_SHAPES = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
GROUPED_NK = [(4096, 7168), (7168, 2048)]
CONTIGUOUS = [(4, 8192), (8, 4096)]  # (experts, rows per expert)
MASKED = [(1, 1024), (2, 512), (4, 256)]  # (experts, M_max)


def _why_not() -> str:
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    import fp8

    if not fp8.HAS_CUDA_EXT:
        return "the fp8._C extension is not built (FRUGAL_CUDA=ON pip install --no-build-isolation -e .)"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"{torch.cuda.get_device_name()} is not sm_90 (Hopper)"
    return ""


def _pad2(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.zeros(rows, cols, dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _scaled_mm_peer(aq, bq) -> Callable[[], object] | None:
    """torch's blockwise F.scaled_mm on the same FP8 operands, laid out once outside the timing (its shape
    checks want K and N multiples of 128, M-major 1x128 scales, K-major padded 128x128 scales)."""
    import torch.nn.functional as F

    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return None
    m, k = aq.shape
    n = bq.shape[0]
    kb, nb = -(-k // 128), -(-n // 128)
    a = _pad2(aq.data, m, kb * 128)
    b = _pad2(bq.data, nb * 128, kb * 128)
    sa = aq.scale.t().contiguous().t()
    sb = _pad2(bq.scale, nb, -(-kb // 4) * 4).t()

    def run():
        return F.scaled_mm(a, b.t(), sa, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
                           output_dtype=torch.bfloat16)  # fmt: skip

    try:
        run()
    except (RuntimeError, TypeError, ValueError) as e:
        print(f"  torch scaled_mm rejected M={m} N={n} K={k}: {str(e).splitlines()[0][:120]}")
        return None
    return run


def _row(table: str, shape: dict, flops: float, ours, peers: dict, diff: float, iters: int) -> dict:
    t = time_fn(ours, device="cuda", iters=iters, flush=True)
    row = {"table": table, **shape, "us": t.median_us, "TFLOPS": t.tflops(flops), "calc_diff": diff}
    for name, fn in peers.items():
        if fn is None:
            row[f"x vs {name}"] = float("nan")
            continue
        tp = time_fn(fn, device="cuda", iters=iters, flush=True)
        row[f"{name} us"] = tp.median_us
        row[f"x vs {name}"] = tp.median_us / t.median_us
    return row


def _dense_case(m: int, n: int, k: int, iters: int) -> dict:
    import fp8

    a, b = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda")
    aq, bq = fp8.quantize_1x128(a), fp8.quantize_128x128(b)
    a16, b16 = a.bfloat16(), b.bfloat16()

    def ours():
        return torch.ops.frugal_fp8.gemm_nt(aq.data, aq.scale, bq.data, bq.scale, torch.bfloat16)

    diff = fp8.calc_diff(ours().float(), a @ b.T)
    peers = {"bf16 mm": lambda: torch.mm(a16, b16.T), "scaled_mm": _scaled_mm_peer(aq, bq)}
    return _row("dense", {"M": m, "N": n, "K": k}, 2.0 * m * n * k, ours, peers, diff, iters)


def _grouped_case(kind: str, g: int, m: int, n: int, k: int, iters: int) -> dict:
    import fp8

    a, b = torch.randn(g, m, k, device="cuda"), torch.randn(g, n, k, device="cuda")
    bq = fp8.quantize_128x128(b)
    if kind == "contiguous":
        aq = fp8.quantize_1x128(a.view(g * m, k))
        index = torch.arange(0, (g + 1) * m, m, device="cuda", dtype=torch.int32)
        op = torch.ops.frugal_fp8.m_grouped_gemm_nt_contiguous
    else:
        aq = fp8.quantize_1x128(a)
        index = torch.full((g,), m, device="cuda", dtype=torch.int32)  # every row valid
        op = torch.ops.frugal_fp8.m_grouped_gemm_nt_masked

    def ours():
        return op(aq.data, aq.scale, bq.data, bq.scale, index, torch.bfloat16)

    diff = fp8.calc_diff(ours().float().view(g, m, n), torch.bmm(a, b.transpose(1, 2)))
    a16, bt16 = a.bfloat16(), b.bfloat16().transpose(1, 2)
    per_group = [_scaled_mm_peer(fp8.quantize_1x128(a[e]), fp8.quantize_128x128(b[e])) for e in range(g)]
    scaled = None if None in per_group else (lambda: [f() for f in per_group])
    peers = {"bf16 mm": lambda: torch.bmm(a16, bt16), "scaled_mm": scaled}
    shape = {"M": f"{g}x{m}", "N": n, "K": k}
    return _row(f"grouped {kind}", shape, 2.0 * g * m * n * k, ours, peers, diff, iters)


def _wgrad_case(tokens: int, n: int, k: int, iters: int) -> dict:
    import fp8
    from fp8.cuda_quant_ops import quantize_128x1_cuda

    dy, x = torch.randn(tokens, n, device="cuda"), torch.randn(tokens, k, device="cuda")
    dyq = quantize_128x1_cuda(dy, fp8.ScaleFormat.FP32)
    xq = quantize_128x1_cuda(x, fp8.ScaleFormat.FP32)
    out = torch.empty(n, k, device="cuda")

    def ours():
        torch.ops.frugal_fp8.gemm_wgrad_out_(
            dyq.data.t(), dyq.scale, xq.data.t(), xq.scale, out, tokens, False
        )

    ours()
    diff = fp8.calc_diff(out, dy.t() @ x)
    dy16, x16 = dy.bfloat16(), x.bfloat16()
    peers = {
        "bf16 mm": lambda: torch.mm(dy16.t(), x16),
        "scaled_mm": None,
    }  # torch has no 1x128 x 1x128 wgrad
    return _row("wgrad", {"M": tokens, "N": n, "K": k}, 2.0 * tokens * n * k, ours, peers, diff, iters)


def _quant_case(name: str, src: torch.Tensor, fn, outputs: int, iters: int) -> dict:
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device="cuda", iters=iters, flush=True)
    t = time_fn(fn, device="cuda", iters=iters, flush=True)
    n_el = src.numel()
    moved = n_el * src.element_size() + outputs * (n_el + n_el // 128 * 4)  # read + fp8 codes + fp32 scales
    gbps, copy_gbps = t.gbps(moved), t_copy.gbps(2 * n_el * src.element_size())
    shape = {"M": src.shape[-2], "N": src.shape[-1], "K": name}
    return {"table": "quant", **shape, "us": t.median_us, "GB/s": gbps, "copy GB/s": copy_gbps,
            "x of copy bandwidth": gbps / copy_gbps}  # fmt: skip


def quant_rows(iters: int, quick: bool) -> list[dict]:
    ops = torch.ops.frugal_fp8
    x = torch.randn(4096, 7168, device="cuda").bfloat16()
    w = torch.randn(1, 7168, 2048, device="cuda").bfloat16()
    cases = [
        ("1x128", x, lambda: ops.quant_rowwise_colwise(x, 0, True, False), 1),
        ("128x1 transposed", x, lambda: ops.quant_rowwise_colwise(x, 0, False, True), 1),
        ("1x128 + 128x1 (one pass)", x, lambda: ops.quant_rowwise_colwise(x, 0, True, True), 2),
        ("128x128", w, lambda: ops.quant_per_block_128x128(w, 0), 1),
    ]
    return [_quant_case(*case, iters) for case in cases[: 1 if quick else None]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="M=4096 on two shapes, one grouped, one quantizer")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument(
        "--out", default=None, help="JSON path (default bench/results/bench_fp8_gemm-<gpu>-<date>.json)"
    )
    args = p.parse_args(argv)
    reason = _why_not()
    if reason:
        print(f"bench_fp8_gemm needs a CUDA GPU (Hopper, sm_90) and the fp8._C extension: {reason}; "
              "nothing was timed.")  # fmt: skip
        return 0
    import fp8.cuda_gemm_ops  # noqa: F401  (registers the frugal_fp8 GEMM ops and, through it, the quantizers)

    torch.manual_seed(0)
    ms, shapes = ([4096], V3_SHAPES[3:5]) if args.quick else ([64, 128, 4096], V3_SHAPES)
    rows = [_dense_case(m, n, k, args.iters) for m in ms for n, k in shapes]
    contiguous, masked = (CONTIGUOUS[:1], MASKED[:1]) if args.quick else (CONTIGUOUS, MASKED)
    for kind, cases in (("contiguous", contiguous), ("masked", masked)):
        for g, m in cases:
            rows += [
                _grouped_case(kind, g, m, n, k, args.iters)
                for n, k in GROUPED_NK[: 1 if args.quick else None]
            ]
    rows += [_wgrad_case(4096, n, k, args.iters) for n, k in shapes]
    gemm_rows = list(rows)
    rows += quant_rows(args.iters, args.quick)

    for table in dict.fromkeys(r["table"] for r in rows):
        print(f"\n{table}")
        print_table([{k: v for k, v in r.items() if k != "table"} for r in rows if r["table"] == table])
    summary = {}
    for peer in ("bf16 mm", "scaled_mm"):
        summary[f"geomean x vs {peer}"] = geomean([r[f"x vs {peer}"] for r in gemm_rows])
        summary[f"geomean x vs {peer} (dense)"] = geomean(
            [r[f"x vs {peer}"] for r in gemm_rows if r["table"] == "dense"]
        )
    big = [r["TFLOPS"] for r in gemm_rows if r["table"] == "dense" and r["M"] == 4096]
    summary["dense M=4096 TFLOPS min/max"] = f"{min(big):.0f}/{max(big):.0f}" if big else "n/a"
    summary["max calc_diff"] = max(r["calc_diff"] for r in gemm_rows)
    summary["quant min x of copy bandwidth"] = min(
        r["x of copy bandwidth"] for r in rows if r["table"] == "quant"
    )
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    path = write_results("bench_fp8_gemm", rows, summary=summary, args=vars(args), out=args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
