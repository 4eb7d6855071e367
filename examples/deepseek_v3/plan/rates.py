"""Kernel efficiencies of the plan: the one documented set of defaults, and where each number comes from.

    rates = KernelRates.default()                  # measured on DeepSeek-V3's own kernels (below)
    rates = rates.with_gemm_measurements(load_bench_gemm_rates(paths))   # calibrated from bench/results JSON

Every efficiency is a property of a kernel class, never of a training step: a fraction of the peak of the SMs
the kernel runs on (compute-bound classes), of HBM bandwidth (memory-bound classes) or of a link's nominal
bandwidth (communication). The same numbers are used for every model, cluster and what-if; nothing here is
tuned to make a published step-level figure (step time, bubble, MFU, GPU-hours) come out.

Source of the defaults: DeepSeek's public training profile (github.com/deepseek-ai/profile-data, train.json):
one DualPipe forward+backward chunk pair of 4 MoE layers of DeepSeek-V3 (EP64, 4096 tokens, perfectly
balanced routing, H800, expert-parallel communication on 20 SMs), i.e. the kernels the V3 run used. For
each class, the FLOPs (bytes) that model.py / moe_comm.cost count for that chunk pair are divided by the
summed duration of the class's kernels. ``python -m examples.deepseek_v3.plan.calibrate --trace train.json``
recomputes every measured number below from the trace (kernel-name classes listed there):

    class                           kernels    work            rate          efficiency
    FP8 dense fprop+dgrad           18.84 ms   16.94 TFLOP      899 TFLOPS   0.535 of 1979 x 112/132
    FP8 grouped fprop+dgrad         22.93 ms   23.09 TFLOP     1007 TFLOPS   0.600
    FP8 wgrad (dense + grouped)     32.76 ms   19.12 TFLOP      584 TFLOPS   0.348
    attention forward (BF16 FA)      4.95 ms    2.75 TFLOP      556 TFLOPS   0.662 of 989 x 112/132
    attention backward              17.02 ms    6.87 TFLOP      404 TFLOPS   0.481
    element-wise (norms, casts,     32.53 ms   56.8 GB          1.75 TB/s    0.521 of 3.35 TB/s
      RoPE, SwiGLU, permutes ...)
    dispatch + combine kernels      80.45 ms   2.64 GB over IB  32.8 GB/s    0.655 of 50 GB/s

Not measurable from that profile, with their source:
* BF16 GEMMs: the profile's only BF16 GEMMs are the router's (N or K = 256; 0.50 after fp8.cost's occupancy
  discount), not representative of large BF16 GEMMs like the output head. A GEMM runs at least as efficiently
  as FlashAttention's forward on the same BF16 tensor cores, so the BF16 class uses attention forward's 0.662.
* NVLink: 0.8 of nominal (DeepSeek-V3 report: 160 GB/s achieved of H800's 200; DeepEP measures 153-158).
  The profiled exchanges are InfiniBand-bound, so they do not measure NVLink.

Notes. The element-wise efficiency is low because it is dozens of small kernels per layer sharing HBM with
the communication kernels; the optimizer (AdamW on the ZeRO shard) is element-wise and uses it too. The IB
efficiency is achieved *while overlapped with compute* (DeepEP's isolated benchmark of the same exchange,
EP64, measures 51 GB/s of "logical" bandwidth, ~45 GB/s of the remote bytes counted here: 0.89); the plan uses
the in-run figure for all InfiniBand traffic (expert exchange, pipeline sends, data-parallel collectives).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from fp8.cost import GemmEfficiency, MeasuredGemm

ATTENTION_FWD_EFFICIENCY = 0.662
ATTENTION_BWD_EFFICIENCY = 0.481
ELEMENTWISE_HBM_EFFICIENCY = 0.521
IB_EFFICIENCY = 0.655
NVLINK_EFFICIENCY = 0.8


@dataclass(frozen=True)
class KernelRates:
    """Efficiencies of every kernel class the time model prices (module docstring)."""

    gemm: GemmEfficiency = field(default_factory=GemmEfficiency.deepseek_v3_h800)
    attention_fwd: float = ATTENTION_FWD_EFFICIENCY  # of the BF16 peak of the compute SMs
    attention_bwd: float = ATTENTION_BWD_EFFICIENCY
    elementwise: float = ELEMENTWISE_HBM_EFFICIENCY  # of HBM bandwidth
    ib_efficiency: float = IB_EFFICIENCY  # of the nominal InfiniBand bandwidth per GPU
    nvlink_efficiency: float = NVLINK_EFFICIENCY
    gemm_measured: tuple[MeasuredGemm, ...] = ()
    source: str = "DeepSeek-V3 training profile (deepseek-ai/profile-data train.json), H800"

    def __post_init__(self) -> None:
        for name in ("attention_fwd", "attention_bwd", "elementwise", "ib_efficiency", "nvlink_efficiency"):
            val = getattr(self, name)
            if not 0.0 < val <= 1.0:
                raise ValueError(f"KernelRates.{name}={val} must be in (0, 1]")

    @staticmethod
    def default() -> KernelRates:
        return KernelRates()

    def with_(self, **changes) -> KernelRates:
        return replace(self, **changes)

    def with_gemm_measurements(self, measured: Iterable[MeasuredGemm]) -> KernelRates:
        return replace(self, gemm_measured=self.gemm_measured + tuple(measured))

    def to_dict(self) -> dict:
        return {
            "gemm": {
                "fp8_dense": self.gemm.fp8_dense,
                "fp8_grouped": self.gemm.fp8_grouped,
                "fp8_wgrad": self.gemm.fp8_wgrad,
                "bf16": self.gemm.bf16,
                "source": self.gemm.source,
            },
            "attention_fwd": self.attention_fwd,
            "attention_bwd": self.attention_bwd,
            "elementwise_hbm": self.elementwise,
            "ib_efficiency": self.ib_efficiency,
            "nvlink_efficiency": self.nvlink_efficiency,
            "gemm_measurements": len(self.gemm_measured),
            "source": self.source,
        }
