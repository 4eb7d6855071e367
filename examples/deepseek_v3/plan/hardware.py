"""Hardware profiles for the plan: peak FLOPS, HBM, NVLink / InfiniBand per GPU, node size, SMs for comms.

    hw = get_hardware("h800")                      # the DeepSeek-V3 cluster's GPU
    hw.with_(comm_sms=24).topology(nvlink_efficiency=0.8, ib_efficiency=0.66)   # moe_comm.cost.Topology

Sources (peaks are dense, without sparsity):
* H800 SXM5: the H100 SXM5 compute die (NVIDIA H100 datasheet: 989.4 TFLOPS BF16, 1978.9 FP8, 132 SMs,
  80 GB HBM3 at 3.35 TB/s) with NVLink cut to 400 GB/s bidirectional (200 per direction). DeepSeek-V3 report
  section 3.2.2: NVLink 160 GB/s achieved, InfiniBand 50 GB/s per GPU (CX7 400 Gb/s), 8 GPUs per node,
  20 of 132 SMs given to communication; $2 per GPU-hour (section 1, cost table).
* H100 SXM5: same compute and HBM; NVLink 900 GB/s bidirectional (450 per direction); a 400 Gb/s NIC per GPU.
* H200 SXM: H100 compute; 141 GB HBM3e at 4.8 TB/s; NVLink 450 per direction; 400 Gb/s NIC.

Links are nominal here; the achieved share is a property of the communication kernels and lives with the
other kernel efficiencies (plan.rates.KernelRates: ``ib_efficiency``, ``nvlink_efficiency``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moe_comm.cost import Topology


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_tflops: float  # dense peak of the whole GPU
    fp8_tflops: float
    num_sms: int
    hbm_gb: float  # GB (1e9 bytes)
    hbm_tbps: float
    nvlink_gbps: float  # nominal, per GPU, per direction
    ib_gbps: float  # nominal, per GPU, per direction (scale-out NIC)
    gpus_per_node: int
    comm_sms: int  # SMs reserved for expert-parallel communication while it runs
    price_per_gpu_hour: float  # USD
    comm_latency_us: float = 20.0  # fixed cost of one dispatch/combine (notify + completion)
    p2p_latency_us: float = 10.0  # fixed cost of one pipeline send/receive

    def __post_init__(self) -> None:
        for name in ("bf16_tflops", "fp8_tflops", "hbm_gb", "hbm_tbps", "nvlink_gbps", "ib_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Hardware.{name}={getattr(self, name)} must be > 0")
        if not 0 <= self.comm_sms < self.num_sms:
            raise ValueError(f"Hardware.comm_sms={self.comm_sms} must be in [0, num_sms={self.num_sms})")
        if self.gpus_per_node < 1:
            raise ValueError(f"Hardware.gpus_per_node={self.gpus_per_node} must be >= 1")

    def compute_sm_fraction(self, uses_ep_comm: bool) -> float:
        """Share of SMs left to compute kernels (all of them when there is no expert-parallel traffic)."""
        return (self.num_sms - self.comm_sms) / self.num_sms if uses_ep_comm else 1.0

    def topology(self, *, nvlink_efficiency: float, ib_efficiency: float) -> Topology:
        """moe_comm.cost.Topology with achieved bandwidths (nominal x the kernels' efficiency)."""
        return Topology(
            gpus_per_node=self.gpus_per_node,
            nvlink_gbps=self.nvlink_gbps * nvlink_efficiency,
            ib_gbps=self.ib_gbps * ib_efficiency,
            latency_us=self.comm_latency_us,
        )

    def with_(self, **changes) -> Hardware:
        return replace(self, **changes)


# H800: the H100 SXM die with NVLink cut to 200 GB/s (DeepSeek-V3's cluster); H200: H100 with 141 GB HBM3e.
_H800 = Hardware(
    name="h800",
    bf16_tflops=989.4,
    fp8_tflops=1978.9,
    num_sms=132,
    hbm_gb=80.0,
    hbm_tbps=3.35,
    nvlink_gbps=200.0,
    ib_gbps=50.0,
    gpus_per_node=8,
    comm_sms=20,
    price_per_gpu_hour=2.0,
)
_H100 = replace(_H800, name="h100", nvlink_gbps=450.0)
HARDWARE: dict[str, Hardware] = {
    "h800": _H800,
    "h100": _H100,
    "h200": replace(_H100, name="h200", hbm_gb=141.0, hbm_tbps=4.8),
}


def get_hardware(name: str) -> Hardware:
    key = name.lower()
    if key not in HARDWARE:
        raise ValueError(f"hardware {name!r} is not one of {sorted(HARDWARE)}")
    return HARDWARE[key]
