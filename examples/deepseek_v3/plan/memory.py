"""Memory per GPU and the optimizer step (data-parallel gradient sync + AdamW) of a planned run.

    mem = memory_per_gpu(rank_blocks, layout, peak_in_flight=17, zero_stage=1)   # MemoryBreakdown (bytes)
    opt = optimizer_step(rank_blocks, layout, hw, rates, zero_stage=1)           # OptimizerStep (seconds)

Precision of the states (DeepSeek-V3 report, section 3.3): BF16 working weights (FP8 copies are transient),
FP32 gradients accumulated over the micro-batches, FP32 master weights and BF16 AdamW moments.

ZeRO stage z (Rajbhandari et al.): 0 replicates everything; 1 shards the optimizer states (master weights and
moments) over the data-parallel copies of each parameter; 2 also shards gradients; 3 also the weights.
The copies of a parameter: replicated weights are held by every pipeline (dp of them) and, under DualPipe,
twice per pipeline (ranks r and pp-1-r both hold model stages r and pp-1-r); a routed expert is held by
dp / ep pipelines (x 2 under DualPipe).

Activations: a GPU holds, at its peak, ``peak_in_flight`` micro-batches' worth of the activations of one of
its stages (the schedule simulator counts them), plus the receive buffers of two exchanges in flight.

The optimizer step after the last backward (not overlapped with the pipeline, as DeepSeek's step table lists
it separately): reduce-scatter (ZeRO >= 1; all-reduce for 0) of the FP32 gradients over the parameter's
copies, AdamW on the local shard (memory-bound), all-gather of the updated BF16 weights. Collectives are
hierarchical: NVLink inside a node for the copies that share it, then InfiniBand across nodes, each a ring
(``(n - 1) / n`` of the bytes cross each link).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from examples.deepseek_v3.plan.hardware import Hardware
from examples.deepseek_v3.plan.model import BF16, FP32, Block
from examples.deepseek_v3.plan.rates import KernelRates

WEIGHT_BYTES = BF16
GRAD_BYTES = FP32
OPTIMIZER_BYTES = FP32 + 2 * BF16  # master weights + two BF16 moments
ADAMW_TRAFFIC_BYTES = (
    22  # per parameter of the shard: read grad 4, master 4, m 2, v 2; write 4, 2, 2, BF16 w 2
)


@dataclass(frozen=True)
class Layout:
    """Where the copies of a rank's parameters live."""

    dp: int  # pipelines (data-parallel replicas of each stage)
    ep: int  # expert-parallel size (a subset of the dp pipelines)
    stage_copies: int  # copies of each model stage per pipeline (2 for DualPipe, else 1)
    gpus_per_node: int

    def __post_init__(self) -> None:
        if self.dp < 1 or self.ep < 1 or self.dp % self.ep:
            raise ValueError(f"Layout: {self.ep=} must divide {self.dp=}")

    @property
    def replicated_copies(self) -> int:
        return self.dp * self.stage_copies

    @property
    def expert_copies(self) -> int:
        return self.dp // self.ep * self.stage_copies


@dataclass(frozen=True)
class MemoryBreakdown:
    weights: float
    grads: float
    optimizer: float
    activations: float
    comm_buffers: float
    params_replicated: float  # parameters on this GPU
    params_expert: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.comm_buffers

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class OptimizerStep:
    grad_sync_s: float
    adamw_s: float
    weight_gather_s: float

    @property
    def total_s(self) -> float:
        return self.grad_sync_s + self.adamw_s + self.weight_gather_s


def _params(rank_blocks: Sequence[Sequence[Block]], ep: int) -> tuple[float, float]:
    rep = sum(b.params_replicated for stage in rank_blocks for b in stage)
    exp = sum(b.params_expert / ep for stage in rank_blocks for b in stage)
    return float(rep), float(exp)


def _check_zero(zero_stage: int) -> None:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"{zero_stage=} must be 0, 1, 2 or 3")


def memory_per_gpu(
    rank_blocks: Sequence[Sequence[Block]],
    layout: Layout,
    *,
    peak_in_flight: int,
    zero_stage: int = 1,
    comm_buffer_bytes: float = 0.0,
) -> MemoryBreakdown:
    """Bytes on one GPU holding the stages ``rank_blocks`` (one list of blocks per stage on this rank)."""
    _check_zero(zero_stage)
    if peak_in_flight < 0:
        raise ValueError(f"{peak_in_flight=} must be >= 0")
    rep, exp = _params(rank_blocks, layout.ep)

    def shard(n_rep: float, n_exp: float, sharded: bool) -> float:
        if not sharded:
            return n_rep + n_exp
        return n_rep / layout.replicated_copies + n_exp / layout.expert_copies

    act = max((sum(b.activation_bytes for b in stage) for stage in rank_blocks), default=0.0)
    return MemoryBreakdown(
        weights=WEIGHT_BYTES * shard(rep, exp, zero_stage >= 3),
        grads=GRAD_BYTES * shard(rep, exp, zero_stage >= 2),
        optimizer=OPTIMIZER_BYTES * shard(rep, exp, zero_stage >= 1),
        activations=peak_in_flight * act,
        comm_buffers=comm_buffer_bytes,
        params_replicated=rep,
        params_expert=exp,
    )


def _ring_time(nbytes: float, copies: int, gpus_per_node: int, nvlink_bps: float, ib_bps: float) -> float:
    """Hierarchical reduce-scatter (or all-gather) of ``nbytes`` per GPU over ``copies`` GPUs.

    Copies fill nodes ``gpus_per_node`` at a time: a ring inside the node over NVLink, then a ring across
    nodes over InfiniBand on the 1/g shard each GPU keeps.
    """
    if copies <= 1 or nbytes <= 0:
        return 0.0
    g = min(gpus_per_node, copies)
    nodes = max(1, copies // g)
    t = nbytes * (g - 1) / g / nvlink_bps
    t += nbytes / g * (nodes - 1) / nodes / ib_bps
    return t


def optimizer_step(
    rank_blocks: Sequence[Sequence[Block]],
    layout: Layout,
    hw: Hardware,
    rates: KernelRates,
    *,
    zero_stage: int = 1,
) -> OptimizerStep:
    """Seconds of the step's tail: gradient sync, AdamW on this GPU's shard, weight all-gather."""
    _check_zero(zero_stage)
    rep, exp = _params(rank_blocks, layout.ep)
    nvl = hw.nvlink_gbps * 1e9 * rates.nvlink_efficiency
    ib = hw.ib_gbps * 1e9 * rates.ib_efficiency
    g = hw.gpus_per_node
    # Expert copies sit in different nodes (an EP group fills whole nodes): a ring over InfiniBand only.
    rs = _ring_time(GRAD_BYTES * rep, layout.replicated_copies, g, nvl, ib)
    rs += _ring_time(GRAD_BYTES * exp, layout.expert_copies, 1, nvl, ib)
    if zero_stage == 0:
        rs *= 2  # all-reduce = reduce-scatter + all-gather of the gradients
        shard = rep + exp
        ag = 0.0
    else:
        shard = rep / layout.replicated_copies + exp / layout.expert_copies
        ag = _ring_time(WEIGHT_BYTES * rep, layout.replicated_copies, g, nvl, ib)
        ag += _ring_time(WEIGHT_BYTES * exp, layout.expert_copies, 1, nvl, ib)
    adamw = ADAMW_TRAFFIC_BYTES * shard / (hw.hbm_tbps * 1e12 * rates.elementwise)
    return OptimizerStep(grad_sync_s=rs, adamw_s=adamw, weight_gather_s=ag)
