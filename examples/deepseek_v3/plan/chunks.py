"""Per-chunk F, B, W and F&B times: blocks priced by fp8.cost and moe_comm.cost, then split into stages.

    bc = block_costs(blocks, hw, rates, precision="fp8", routing=Routing(256, 8, ep=64, node_limit=4))
    stages = partition(bc, pp=16)                       # contiguous, balanced by standalone F + B time
    st = stage_costs(bc, stages)                         # one StageCost per pipeline stage
    st[3].f, st[3].b, st[3].w, fb_time(st[3], st[12])   # seconds for one micro-batch

Time of one block for one micro-batch (all compute on the SMs left by communication):

    compute_f = sum(GEMM fprop) + attention fwd + element-wise fwd bytes / (HBM x eff)
    compute_b = sum(GEMM dgrad + wgrad + recomputed fprop) + attention bwd + element-wise bwd bytes / ...
    compute_w = sum(GEMM wgrad)                           (the weight part of compute_b)
    comm_f    = dispatch (FP8 or BF16 payload) + combine (BF16)        moe_comm.cost, EP traffic only
    comm_b    = combine of the dispatch's gradient + dispatch of the combine's gradient (both BF16)

A chunk run alone (F, B, W of a stage) hides its own communication only behind the compute that does not
depend on it (the shared experts): ``f = compute_f + max(0, comm_f - shared_f)``. Two chunks run as an
overlapped DualPipe pair (one forward, one backward of another micro-batch) hide each other's
communication: ``F&B = max(compute_f + compute_b, comm_f + comm_b)`` -- communication runs on its own SMs
and stream, so the pair takes its compute time unless the exchange is longer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from examples.deepseek_v3.plan.hardware import Hardware
from examples.deepseek_v3.plan.model import Block
from examples.deepseek_v3.plan.rates import KernelRates
from fp8.cost import GemmCostModel
from moe_comm.cost import Routing, combine_cost, dispatch_cost

PRECISIONS = ("fp8", "bf16")


@dataclass(frozen=True)
class ChunkCost:
    """Seconds of one block (or a stage of blocks) for one micro-batch; see the module docstring."""

    compute_f: float = 0.0
    compute_b: float = 0.0  # full backward (input + weight gradients)
    compute_w: float = 0.0  # weight-gradient part of compute_b
    comm_f: float = 0.0
    comm_b: float = 0.0
    shared_f: float = 0.0  # compute of the chunk that does not wait for its own communication
    shared_b: float = 0.0
    gemm_s: float = 0.0  # of compute_f + compute_b: GEMMs
    attention_s: float = 0.0  # attention kernels
    elementwise_s: float = 0.0  # memory-bound kernels
    ib_bytes: float = 0.0  # EP bytes over InfiniBand (fwd + bwd)
    nvlink_bytes: float = 0.0

    def __add__(self, other: ChunkCost) -> ChunkCost:
        return ChunkCost(*(a + b for a, b in zip(_fields(self), _fields(other))))

    @property
    def f(self) -> float:
        """Forward run alone: its communication is exposed beyond the shared-expert compute."""
        return self.compute_f + max(0.0, self.comm_f - self.shared_f)

    @property
    def b(self) -> float:
        """Full backward run alone."""
        return self.compute_b + max(0.0, self.comm_b - self.shared_b)

    @property
    def w(self) -> float:
        return self.compute_w

    @property
    def exposed_f(self) -> float:
        return self.f - self.compute_f

    @property
    def exposed_b(self) -> float:
        return self.b - self.compute_b


def _fields(c: ChunkCost) -> tuple[float, ...]:
    return (
        c.compute_f,
        c.compute_b,
        c.compute_w,
        c.comm_f,
        c.comm_b,
        c.shared_f,
        c.shared_b,
        c.gemm_s,
        c.attention_s,
        c.elementwise_s,
        c.ib_bytes,
        c.nvlink_bytes,
    )


def fb_time(forward: ChunkCost, backward: ChunkCost) -> float:
    """A forward of one chunk overlapped with the full backward of another (DualPipe's F&B)."""
    return max(forward.compute_f + backward.compute_b, forward.comm_f + backward.comm_b)


def block_costs(
    blocks: Sequence[Block],
    hw: Hardware,
    rates: KernelRates,
    *,
    precision: str = "fp8",
    routing: Routing | None = None,
    hierarchical: bool = True,
) -> list[ChunkCost]:
    """Price every block for one micro-batch on one GPU (module docstring).

    ``precision``: "fp8" runs the FP8-capable GEMMs in FP8 and dispatches FP8; "bf16" runs everything in
    BF16. ``routing``: the expert-parallel routing (None or ep == 1: no communication).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{precision=} must be one of {PRECISIONS}")
    uses_ep = routing is not None and routing.ep > 1
    smf = hw.compute_sm_fraction(uses_ep)
    gemm = GemmCostModel(
        peak_fp8_tflops=hw.fp8_tflops,
        peak_bf16_tflops=hw.bf16_tflops,
        hbm_tbps=hw.hbm_tbps,
        efficiency=rates.gemm,
        sm_fraction=smf,
        measured=rates.gemm_measured,
    )
    attn_fwd_rate = hw.bf16_tflops * 1e12 * smf * rates.attention_fwd
    attn_bwd_rate = hw.bf16_tflops * 1e12 * smf * rates.attention_bwd
    mem_rate = hw.hbm_tbps * 1e12 * rates.elementwise
    topo = hw.topology(nvlink_efficiency=rates.nvlink_efficiency, ib_efficiency=rates.ib_efficiency)
    out = []
    for blk in blocks:
        gf = gb = gw = sf = sb = 0.0
        for g in blk.gemms:
            dtype = "fp8" if (g.fp8 and precision == "fp8") else "bf16"
            fprop = gemm.time_s(g.m, g.n, g.k, kind="fprop", dtype=dtype, groups=g.groups)
            dgrad = gemm.time_s(g.m, g.n, g.k, kind="dgrad", dtype=dtype, groups=g.groups)
            wgrad = gemm.time_s(g.m, g.n, g.k, kind="wgrad", dtype=dtype, groups=g.groups)
            gf += fprop
            gb += dgrad + (fprop if g.recompute else 0.0)
            gw += wgrad
            if g.overlaps_comm:
                sf += fprop
                sb += dgrad + wgrad
        af = ab = 0.0
        if blk.attention is not None:
            af = blk.attention.fwd_flops / attn_fwd_rate
            ab = blk.attention.bwd_flops / attn_bwd_rate
        ef = blk.elementwise_fwd_bytes / mem_rate
        eb = blk.elementwise_bwd_bytes / mem_rate
        cf = cb = ib = nvl = 0.0
        if uses_ep and blk.all_to_all is not None:
            a2a = blk.all_to_all
            disp_payload = "fp8" if precision == "fp8" else "bf16"
            parts = [
                dispatch_cost(
                    topo,
                    routing,
                    tokens=a2a.tokens,
                    hidden=a2a.hidden,
                    payload=disp_payload,
                    hierarchical=hierarchical,
                ),
                combine_cost(
                    topo,
                    routing,
                    tokens=a2a.tokens,
                    hidden=a2a.hidden,
                    payload="bf16",
                    hierarchical=hierarchical,
                ),
            ]
            back = combine_cost(
                topo, routing, tokens=a2a.tokens, hidden=a2a.hidden, payload="bf16", hierarchical=hierarchical
            )
            cf = parts[0].time_s + parts[1].time_s
            cb = 2 * back.time_s
            ib = parts[0].ib_bytes + parts[1].ib_bytes + 2 * back.ib_bytes
            nvl = parts[0].nvlink_bytes + parts[1].nvlink_bytes + 2 * back.nvlink_bytes
        out.append(
            ChunkCost(
                compute_f=gf + af + ef,
                compute_b=gb + gw + ab + eb,
                compute_w=gw,
                comm_f=cf,
                comm_b=cb,
                shared_f=sf,
                shared_b=sb,
                gemm_s=gf + gb + gw,
                attention_s=af + ab,
                elementwise_s=ef + eb,
                ib_bytes=ib,
                nvlink_bytes=nvl,
            )
        )
    return out


def partition(costs: Sequence[ChunkCost], pp: int, *, overlapped: bool = False) -> list[tuple[int, int]]:
    """Split blocks into ``pp`` contiguous, non-empty stages minimising the largest stage time.

    The stage time is what the schedule mostly runs: ``F&B`` of the stage with itself for schedules that
    overlap chunk pairs (``overlapped``: DualPipe, DualPipeV), else the standalone ``F + B``.
    Returns ``[(start, end), ...]`` block ranges. Exact (dynamic programming over split points).
    """
    n = len(costs)
    if not 1 <= pp <= n:
        raise ValueError(f"{pp=} must be in [1, number of blocks={n}]")
    w = [fb_time(c, c) if overlapped else c.f + c.b for c in costs]
    prefix = [0.0]
    for x in w:
        prefix.append(prefix[-1] + x)
    inf = float("inf")
    # best[s][i]: minimal max-stage time placing the first i blocks into s stages
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for s in range(1, pp + 1):
        for i in range(s, n - (pp - s) + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i] - 1e-15:
                    best[s][i], cut[s][i] = v, j
    ranges, i = [], n
    for s in range(pp, 0, -1):
        j = cut[s][i]
        ranges.append((j, i))
        i = j
    return ranges[::-1]


def stage_costs(costs: Sequence[ChunkCost], ranges: Sequence[tuple[int, int]]) -> list[ChunkCost]:
    out = []
    for start, end in ranges:
        total = ChunkCost()
        for c in costs[start:end]:
            total = total + c
        out.append(total)
    return out
