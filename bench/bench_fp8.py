"""FP8 scaling recipes on DeepSeek-V3's GEMM shapes: accuracy (CPU or GPU) and GEMM timing (GPU).

    python -m bench.bench_fp8                            # CPU: accuracy, M=128, N and K x0.25 (< 2 min)
    python -m bench.bench_fp8 --out /tmp/bench_fp8.json  # the same, also written as JSON
    python -m bench.bench_fp8 --m 128 4096               # GPU: full shapes, + timing, JSON in bench/results/

Accuracy: ``calc_diff`` against an FP32 GEMM of the unquantized inputs (DESIGN.md, < 1e-3 for FP8 GEMMs)
for four recipes of ``a (M, K) @ b (N, K).T`` -- one scale per tensor, one per row (of a and of b), 1x128
activation tiles with 128x128 weight blocks (DeepSeek-V3), and the same with power-of-two scales -- on
random normal operands and on an outlier case (a few channels 1e5x larger, error measured on the ordinary
channels' contribution, where the recipes differ; see DESIGN.md, Numerics conventions).

Timing (CUDA only): BF16 ``torch.mm``, torch's blockwise ``F.scaled_mm`` (the "torch" backend), the "cuda"
backend when the extension is built, and the reference on the GPU; operands pre-quantized, L2 flushed,
median of CUDA-event timings, TFLOPS = 2MNK / t and the ratio to BF16 mm in the same run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import fp8
from bench.common import geomean, print_table, time_fn, write_results
from fp8.quant import FP8Tensor, quantize_blockwise

# (N, K) of DeepSeek-V3's dense GEMMs, as benchmarked by DeepGEMM (ANCHORS.md)
V3_SHAPES = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
OUTLIER_CHANNELS = 4
OUTLIER_FACTOR = 1e5


def _dequant_gemm(qa, sa, qb, sb) -> torch.Tensor:
    """a @ b.T for recipes whose scales are constant along K (per tensor, per row): scale after the mm."""
    return (qa.float() @ qb.float().T) * sa * sb.T


def recipe_outputs(
    a: torch.Tensor, b: torch.Tensor, drop: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """FP32 results of each recipe; ``drop`` (channel indices) zeroes those channels of a's FP8 codes after
    quantization (their scales still saw them), to measure the ordinary channels' contribution."""
    m, k = a.shape
    n = b.shape[0]

    def cut(q: torch.Tensor) -> torch.Tensor:
        if drop is None:
            return q
        q = q.clone()
        q[:, drop] = 0
        return q

    out = {}
    qa, sa = quantize_blockwise(a, m, k)
    qb, sb = quantize_blockwise(b, n, k)
    out["per-tensor"] = _dequant_gemm(cut(qa), sa.view(1, 1), qb, sb.view(1, 1))
    qa, sa = quantize_blockwise(a, 1, k)
    qb, sb = quantize_blockwise(b, 1, k)
    out["per-row"] = _dequant_gemm(cut(qa), sa.view(m, 1), qb, sb.view(n, 1))
    for name, fmt in (("1x128/128x128", "fp32"), ("1x128/128x128 pow2", "pow2")):
        ta = fp8.quantize_1x128(a, scale_format=fmt)
        tb = fp8.quantize_128x128(b, scale_format=fmt)
        ta = FP8Tensor(cut(ta.data), ta.scale, ta.block, ta.scale_format)
        out[name] = fp8.gemm(ta, tb, out_dtype=torch.float32, backend="reference")
    return out


def accuracy_rows(shapes, ms, device, seed) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device)
    for m in ms:
        for n, k in shapes:
            gen.manual_seed(seed + n + k + m)
            a = torch.randn(m, k, device=device, generator=gen)
            b = torch.randn(n, k, device=device, generator=gen)
            ref = a @ b.T
            row = {"case": "normal", "M": m, "N": n, "K": k}
            row.update({name: fp8.calc_diff(y, ref) for name, y in recipe_outputs(a, b).items()})
            rows.append(row)
    # outliers on the first shape: a few channels, in different 128-wide tiles, OUTLIER_FACTOR larger
    m, (n, k) = ms[0], shapes[0]
    gen.manual_seed(seed)
    a = torch.randn(m, k, device=device, generator=gen)
    b = torch.randn(n, k, device=device, generator=gen)
    drop = torch.linspace(5, k - 5, OUTLIER_CHANNELS, device=device).long()
    a[:, drop] *= OUTLIER_FACTOR
    a_ordinary = a.clone()
    a_ordinary[:, drop] = 0
    ref = a_ordinary @ b.T
    row = {"case": f"outliers x{OUTLIER_FACTOR:.0e}", "M": m, "N": n, "K": k}
    row.update({name: fp8.calc_diff(y, ref) for name, y in recipe_outputs(a, b, drop).items()})
    rows.append(row)
    return rows


def timing_rows(shapes, ms, device, iters) -> list[dict]:
    return [row for m in ms for n, k in shapes for row in _time_shape(m, n, k, device, iters)]


def _time_shape(m: int, n: int, k: int, device: torch.device, iters: int) -> list[dict]:
    a = torch.randn(m, k, device=device)
    b = torch.randn(n, k, device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()
    aq, bq = fp8.quantize_1x128(a), fp8.quantize_128x128(b)
    candidates: dict[str, Callable[[], object]] = {"bf16 torch.mm": lambda: torch.mm(a16, b16.T)}
    for backend in ("torch", "cuda", "reference"):
        try:
            fp8.select_backend("gemm", a.device, backend)
        except RuntimeError as e:
            print(f"  {backend}: skipped ({e})")
            continue
        candidates[f"fp8 {backend}"] = lambda backend=backend: fp8.gemm(aq, bq, backend=backend)
    rows, base = [], None
    for name, fn in candidates.items():
        slow = name == "fp8 reference"
        t = time_fn(fn, device=device, warmup=1 if slow else 5, iters=3 if slow else iters, flush=True)
        base = base or t.median_us
        rows.append(
            {
                "M": m,
                "N": n,
                "K": k,
                "impl": name,
                "us": t.median_us,
                "TFLOPS": t.tflops(2.0 * m * n * k),
                "vs bf16 mm": base / t.median_us,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[128, 4096] if cuda else [128], help="token counts M")
    p.add_argument(
        "--scale", type=float, default=1.0 if cuda else 0.25, help="multiply N and K (CPU default 0.25)"
    )
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-timing", action="store_true", help="accuracy only")
    p.add_argument("--out", default=None, help="JSON path (default on GPU: bench/results/; on CPU: none)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = [(max(1, round(n * args.scale)), max(1, round(k * args.scale))) for n, k in V3_SHAPES]
    print(f"fp8 recipes on DeepSeek-V3 shapes, device {device}, scale {args.scale}, M {args.m}")
    print(f"backends: {fp8.backend_report(device)}")

    acc = accuracy_rows(shapes, args.m, device, args.seed)
    print("\ncalc_diff vs FP32 of the unquantized inputs (lower is better; FP8 GEMMs must stay < 1e-3)")
    print_table(acc)
    recipes = [c for c in acc[0] if c not in ("case", "M", "N", "K")]
    normal = [r for r in acc if r["case"] == "normal"]
    summary: dict = {f"geomean calc_diff {r}": geomean([row[r] for row in normal]) for r in recipes}
    outlier = acc[-1]
    summary["outliers: per-tensor / 1x128 error ratio"] = outlier["per-tensor"] / outlier["1x128/128x128"]
    print(
        f"\noutlier case: 1x128 tiles are {summary['outliers: per-tensor / 1x128 error ratio']:.1f}x more "
        "accurate than one per-tensor scale on the ordinary channels"
    )

    rows = [{"table": "accuracy", **r} for r in acc]
    if device.type == "cuda" and not args.no_timing:
        timing = timing_rows(shapes, args.m, device, args.iters)
        print("\nGEMM time (median of CUDA events, L2 flushed), TFLOPS and speed relative to BF16 torch.mm")
        print_table(timing)
        for impl in sorted({r["impl"] for r in timing}):
            summary[f"geomean speed vs bf16 mm: {impl}"] = geomean(
                [r["vs bf16 mm"] for r in timing if r["impl"] == impl]
            )
        rows += [{"table": "timing", **r} for r in timing]
    elif not args.no_timing:
        print("\n(no CUDA device: timing skipped; the CPU reference is not a performance path)")
    for key, value in summary.items():
        print(f"{key}: {value:.4g}")

    if args.out is not None or device.type == "cuda":
        path = write_results("bench_fp8", rows, summary=summary, args=vars(args), out=args.out)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
