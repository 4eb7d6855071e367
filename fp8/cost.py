"""GEMM time from measured or peak throughput: the fp8 package's cost model (DESIGN.md, principle 4).

    model = GemmCostModel(peak_fp8_tflops=1979, peak_bf16_tflops=989, hbm_tbps=3.35, sm_fraction=112 / 132)
    model.time_s(4096, 24576, 1536, kind="fprop")                 # seconds of one FP8 GEMM
    model.time_s(32768, 4096, 7168, groups=4, kind="fprop")       # a grouped (per-expert) GEMM
    model = model.with_measurements(load_bench_gemm_rates(["bench/results/bench_fp8-H800-....json"]))

A GEMM's time is the larger of its compute time, FLOPs / (peak x sm_fraction x efficiency x occupancy),
and its memory time, bytes / HBM bandwidth (the roofline; only skinny GEMMs are memory-bound).
``sm_fraction`` is the share of SMs the GEMM gets (DeepSeek-V3 reserves 20 of 132 SMs for communication).
The efficiency is a fraction of the peak *of the SMs the kernel runs on*, one per class: FP8 dense
(fprop/dgrad), FP8 grouped (per-expert fprop/dgrad), FP8 weight-gradient (dense and grouped, accumulating
into FP32), and BF16. ``occupancy`` only discounts GEMMs too small to fill those SMs.

Default efficiencies (``GemmEfficiency.deepseek_v3_h800()``) are measured, not fitted: they are the rates of
the kernels DeepSeek-V3 was trained with, taken from DeepSeek's public training profile (train.json in
github.com/deepseek-ai/profile-data: one DualPipe forward+backward chunk pair of 4 MoE layers, EP64, 4096
tokens, H800, 20 SMs running DeepEP): the FLOPs of each GEMM class (examples/deepseek_v3/plan/model.py)
divided by the summed duration of its kernels, divided by the FP8 (BF16) peak x 112/132. Reproduce them with
``python -m examples.deepseek_v3.plan.calibrate --trace train.json``. Cross-check: DeepGEMM's first README
(Feb 2025, H800, all 132 SMs) reports its speedup over DeepSeek's internal CUTLASS-3.6 kernels, which puts
those at 590-1190 TFLOPS for the dense V3 shapes at M=4096 (930-1190 but for N=32768, K=512) and 920-1080
grouped; the profile's rates scaled to 132 SMs (1060 dense, 1190 grouped) agree within ~15%. Today's
DeepGEMM is faster (ANCHORS.md: 1127-1520 dense, 1214-1346 grouped, 920-1092 wgrad).

Measured rates (``MeasuredGemm``, e.g. from bench/results JSON written by bench/bench_fp8.py on a GPU) replace
the efficiency for GEMMs of the same class whose shape is close (every dimension within 2x, log distance).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

GemmKind = Literal["fprop", "dgrad", "wgrad"]
GemmDtype = Literal["fp8", "bf16"]
_KINDS = ("fprop", "dgrad", "wgrad")
_DTYPES = ("fp8", "bf16")


@dataclass(frozen=True)
class GemmEfficiency:
    """Fraction of the dense peak (of the SMs the kernel runs on) that each GEMM class reaches."""

    fp8_dense: float
    fp8_grouped: float
    fp8_wgrad: float
    bf16: float
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("fp8_dense", "fp8_grouped", "fp8_wgrad", "bf16"):
            val = getattr(self, name)
            if not 0.0 < val <= 1.0:
                raise ValueError(f"GemmEfficiency.{name}={val} must be in (0, 1]")

    @staticmethod
    def deepseek_v3_h800() -> GemmEfficiency:
        """The kernels of the DeepSeek-V3 run, measured in DeepSeek's training profile (module docstring).

        Kernel time summed over the profiled chunk pair (4 MoE layers, 4096 tokens, fwd + bwd):
        fp8 dense fprop/dgrad (incl. the recomputed MLA up-projections) 16.94 TFLOP in 18.84 ms = 899 TFLOPS;
        fp8 grouped fprop/dgrad 23.09 TFLOP in 22.93 ms = 1007; fp8 wgrad 19.12 TFLOP in 32.76 ms = 584;
        divided by 1979 x 112/132. BF16: the profile's only BF16 GEMMs are the router's (N or K = 256: 0.50
        after the occupancy discount), not representative of large BF16 GEMMs such as the output head. A GEMM
        runs at least as efficiently as FlashAttention's forward on the same BF16 tensor cores, measured in
        the same profile at 0.662 of 989 x 112/132; that is the BF16 efficiency (a lower bound).
        """
        return GemmEfficiency(
            fp8_dense=0.535,
            fp8_grouped=0.600,
            fp8_wgrad=0.348,
            bf16=0.662,
            source="DeepSeek-V3 training profile (deepseek-ai/profile-data train.json), H800, 112 of 132 SMs",
        )


@dataclass(frozen=True)
class MeasuredGemm:
    """A measured GEMM rate: shape, class and achieved TFLOPS (with the SM fraction it ran with)."""

    m: int
    n: int
    k: int
    kind: GemmKind
    dtype: GemmDtype
    tflops: float
    groups: int = 1
    sm_fraction: float = 1.0


@dataclass(frozen=True)
class GemmCostModel:
    """Time of FP8/BF16 GEMMs on one GPU (module docstring). Peaks are dense TFLOPS of the whole GPU."""

    peak_fp8_tflops: float
    peak_bf16_tflops: float
    hbm_tbps: float
    efficiency: GemmEfficiency = GemmEfficiency.deepseek_v3_h800()
    sm_fraction: float = 1.0
    measured: tuple[MeasuredGemm, ...] = ()
    num_sms: int = 132
    tile: int = 128  # output tile edge of one CTA (for the occupancy of small GEMMs)

    def __post_init__(self) -> None:
        for name in ("peak_fp8_tflops", "peak_bf16_tflops", "hbm_tbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GemmCostModel.{name}={getattr(self, name)} must be > 0")
        if not 0.0 < self.sm_fraction <= 1.0:
            raise ValueError(f"GemmCostModel.sm_fraction={self.sm_fraction} must be in (0, 1]")

    def with_measurements(self, measured: Iterable[MeasuredGemm]) -> GemmCostModel:
        return replace(self, measured=tuple(self.measured) + tuple(measured))

    def _efficiency(self, kind: GemmKind, dtype: GemmDtype, groups: int) -> float:
        e = self.efficiency
        if dtype == "bf16":
            return e.bf16
        if kind == "wgrad":
            return e.fp8_wgrad
        return e.fp8_grouped if groups > 1 else e.fp8_dense

    def _measured_tflops(self, m: int, n: int, k: int, kind: GemmKind, dtype: GemmDtype, groups: int):
        best, best_dist = None, math.inf
        for r in self.measured:
            if r.dtype != dtype or r.kind != kind or (r.groups > 1) != (groups > 1):
                continue
            ratios = [math.log(a / b) for a, b in ((m, r.m), (n, r.n), (k, r.k))]
            if max(abs(x) for x in ratios) > math.log(2.0):
                continue
            dist = math.sqrt(sum(x * x for x in ratios))
            if dist < best_dist:
                best, best_dist = r, dist
        if best is None:
            return None
        return best.tflops * self.sm_fraction / best.sm_fraction

    def occupancy(self, m: int, n: int, k: int, *, kind: GemmKind = "fprop", groups: int = 1) -> float:
        """Share of the available SMs a GEMM can keep busy: min(1, output tiles / SMs).

        A GEMM with fewer ``tile`` x ``tile`` output tiles than SMs runs one partial wave and leaves SMs idle
        (e.g. the router, 4096 x 256: 64 tiles for 112 SMs). Larger GEMMs are taken to balance their waves
        (persistent kernels pick tile shapes for that), so their occupancy is 1.
        """
        t = self.tile
        if kind == "wgrad":  # the output is the weight gradient, groups x (n, k)
            tiles = groups * math.ceil(n / t) * math.ceil(k / t)
        else:
            rows = math.ceil(m / groups)
            out_cols = k if kind == "dgrad" else n
            tiles = groups * math.ceil(rows / t) * math.ceil(out_cols / t)
        return min(1.0, tiles / (self.num_sms * self.sm_fraction))

    def rate_tflops(
        self, m: int, n: int, k: int, *, kind: GemmKind = "fprop", dtype: GemmDtype = "fp8", groups: int = 1
    ) -> float:
        """Achieved TFLOPS of the compute part: a close measurement if any, else
        peak x SM share x class efficiency x occupancy."""
        _check(m, n, k, kind, dtype, groups)
        measured = self._measured_tflops(m, n, k, kind, dtype, groups)
        if measured is not None:
            return measured
        peak = self.peak_fp8_tflops if dtype == "fp8" else self.peak_bf16_tflops
        occ = self.occupancy(m, n, k, kind=kind, groups=groups)
        return peak * self.sm_fraction * self._efficiency(kind, dtype, groups) * occ

    def time_s(
        self, m: int, n: int, k: int, *, kind: GemmKind = "fprop", dtype: GemmDtype = "fp8", groups: int = 1
    ) -> float:
        """Seconds for one (m, k) x (k, n) GEMM pass; grouped: m rows spread over ``groups`` weight matrices.

        fprop computes (m, n) from (m, k) and the (n, k) weights; dgrad (m, k) from (m, n); wgrad the weights
        (groups x n x k, FP32 accumulate) from both activations. All three cost 2mnk FLOPs.
        """
        flops = 2.0 * m * n * k
        compute = flops / (self.rate_tflops(m, n, k, kind=kind, dtype=dtype, groups=groups) * 1e12)
        return max(
            compute, gemm_bytes(m, n, k, kind=kind, dtype=dtype, groups=groups) / (self.hbm_tbps * 1e12)
        )


def gemm_bytes(
    m: int, n: int, k: int, *, kind: GemmKind = "fprop", dtype: GemmDtype = "fp8", groups: int = 1
) -> float:
    """HBM bytes one pass must move at least once: both operands and the output (BF16 out; FP32 for wgrad)."""
    elt = 1 if dtype == "fp8" else 2
    weights = groups * n * k
    if kind == "wgrad":
        return float(elt * (m * n + m * k) + 4 * weights * 2)  # read-modify-write of the FP32 grad
    if kind == "dgrad":
        return float(elt * (m * n + weights) + 2 * m * k)
    return float(elt * (m * k + weights) + 2 * m * n)


def _check(m: int, n: int, k: int, kind: str, dtype: str, groups: int) -> None:
    if min(m, n, k) <= 0:
        raise ValueError(f"GEMM shape {m=}, {n=}, {k=} must be positive")
    if kind not in _KINDS:
        raise ValueError(f"{kind=} must be one of {_KINDS}")
    if dtype not in _DTYPES:
        raise ValueError(f"{dtype=} must be one of {_DTYPES}")
    if groups < 1:
        raise ValueError(f"{groups=} must be >= 1")


def load_bench_gemm_rates(paths: Sequence[str | Path]) -> list[MeasuredGemm]:
    """Measured GEMM rates from benchmark JSON files (bench/common.py ``write_results`` format).

    Every row with integer ``m``, ``n``, ``k`` and a ``tflops`` figure is used (``median_us`` is converted
    when ``tflops`` is absent); optional keys: ``kind`` (fprop|dgrad|wgrad, default fprop), ``dtype``
    (fp8|bf16, default fp8), ``groups`` (default 1; ``m`` is then the rows summed over groups) and
    ``sm_fraction`` (default 1). Rows from a CPU run (env.device == "cpu") are ignored: they say nothing
    about a GPU. Rows without a shape (other benchmarks) are skipped.
    """
    out: list[MeasuredGemm] = []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        if str(payload.get("env", {}).get("device", "")).lower() == "cpu":
            continue
        for row in payload.get("rows", []):
            try:
                m, n, k = int(row["m"]), int(row["n"]), int(row["k"])
            except (KeyError, TypeError, ValueError):
                continue
            tflops = row.get("tflops")
            if tflops is None and row.get("median_us"):
                groups = int(row.get("groups", 1))
                tflops = 2.0 * m * n * k / (float(row["median_us"]) * 1e-6) / 1e12
            if not tflops:
                continue
            kind, dtype = str(row.get("kind", "fprop")), str(row.get("dtype", "fp8"))
            groups = int(row.get("groups", 1))
            _check(m, n, k, kind, dtype, groups)
            out.append(
                MeasuredGemm(m, n, k, kind, dtype, float(tflops), groups, float(row.get("sm_fraction", 1.0)))
            )
    return out
