"""Price a training run: one step (plan_step) and the whole run (plan) of a RunConfig.

    result = plan(v3_run())                      # DeepSeek-V3 on 2,048 H800
    result.metrics["step_s"], result.metrics["total_gpu_hours"]
    step = plan_step(v3_run(), seq_len=32768, global_batch=1920, micro_batch_tokens=4096)

How a step is priced (each cost model beside the thing it prices, DESIGN.md principle 4):
1. plan.model: parameters, model FLOPs per token, and the blocks of a micro-batch (GEMM shapes, attention,
   element-wise bytes, expert exchange, parameters, cached activations).
2. plan.chunks: each block's F, B, W and communication time from fp8.cost (GEMMs), attention and
   element-wise rates, and moe_comm.cost (dispatch/combine on the cluster topology), at the efficiencies
   of plan.rates (measured on DeepSeek-V3's own kernels); blocks are cut into balanced pipeline stages.
3. plan.pipeline: the schedule (dualpipe.schedules) priced by dualpipe.simulate: step time, bubble, phases,
   in-flight activations.
4. plan.memory: memory per GPU and the optimizer step (gradient sync, AdamW, weight all-gather).
5. Here: step time = pipeline makespan + optimizer step; tokens/day, MFU, GPU-hours per trillion tokens,
   and the run's total GPU-hours and dollars (pre-training + extra phases priced the same way, + a given
   budget that is not modelled, e.g. post-training).

Phases of a step are reported for the rank with the largest bubble (the simulator's bubble); DeepSeek's
table does not say which rank it shows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from examples.deepseek_v3.config import ModelConfig, get_preset
from examples.deepseek_v3.plan.chunks import ChunkCost, block_costs, fb_time, partition, stage_costs
from examples.deepseek_v3.plan.hardware import Hardware, get_hardware
from examples.deepseek_v3.plan.memory import Layout, memory_per_gpu, optimizer_step
from examples.deepseek_v3.plan.model import (
    BF16,
    FP8,
    model_blocks,
    model_flops_per_token,
    param_counts,
)
from examples.deepseek_v3.plan.pipeline import (
    OVERLAPPED,
    P2P,
    PipelineSim,
    normalise_schedule,
    num_model_stages,
    simulate_pipeline,
)
from examples.deepseek_v3.plan.rates import KernelRates
from moe_comm.cost import Routing

# DeepSeek-V3 report (arXiv 2412.19437) and "Insights into DeepSeek-V3" (ISCA '25, arXiv 2505.09343, Table 4).
PUBLISHED = {
    "params_total": 671e9,
    "params_active": 37e9,
    "gflops_per_token": 250.0,
    "step_s": 19.926,
    "bubble_s": 2.06,
    "phase_f_s": 1.13,
    "phase_b_s": 1.99,
    "phase_w_s": 0.48,
    "phase_fb_s": 13.95,
    "optimizer_s": 0.29,
    "tokens_per_day": 272.8e9,
    "tflops_causal": 385.0,
    "mfu_causal": 0.3894,
    "mfu_noncausal": 0.4373,
    "gpu_hours_per_trillion": 180e3,
    "pretrain_gpu_hours": 2664e3,
    "context_extension_gpu_hours": 119e3,
    "post_training_gpu_hours": 5e3,
    "total_gpu_hours": 2788e3,
    "total_usd": 5.576e6,
}


@dataclass(frozen=True)
class ParallelConfig:
    """How the run is laid out. ``dp = num_gpus / pp`` pipelines; expert parallelism spans ``ep`` of them."""

    num_gpus: int = 2048
    pp: int = 16
    ep: int = 64
    schedule: str = "dualpipe"
    micro_batch_tokens: int | None = None  # default: one sequence
    node_limit: int | None = None  # nodes per token; default: the model's n_limited_groups
    zero_stage: int = 1
    hierarchical: bool = True  # DeepEP-style exchange: one IB crossing per target node

    @property
    def dp(self) -> int:
        return self.num_gpus // self.pp


@dataclass(frozen=True)
class TrainingPhase:
    """Extra training priced like the main one: ``steps`` steps of ``global_batch`` x ``seq_len`` tokens."""

    name: str
    seq_len: int
    global_batch: int
    steps: int


# DeepSeek-V3 report section 4.3: 1,000 steps at 32K x 1,920, then 1,000 steps at 128K x 480.
V3_CONTEXT_EXTENSION = (
    TrainingPhase("context 32K", 32768, 1920, 1000),
    TrainingPhase("context 128K", 131072, 480, 1000),
)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    hardware: Hardware
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = "fp8"
    seq_len: int = 4096
    global_batch: int = 15360  # sequences per step
    tokens: float = 14.8e12  # pre-training token budget
    extra_phases: tuple[TrainingPhase, ...] = ()
    other_gpu_hours: float = 0.0  # e.g. post-training, given, not modelled
    rates: KernelRates = field(default_factory=KernelRates.default)
    price_per_gpu_hour: float | None = None  # default: the hardware's

    def with_(self, **changes) -> RunConfig:
        return replace(self, **changes)


def v3_run(**changes) -> RunConfig:
    """DeepSeek-V3's pre-training run: 2,048 H800, PP16 DualPipe, EP64, ZeRO-1, FP8, 14.8T tokens + extras."""
    cfg = RunConfig(
        model=get_preset("v3-671b"),
        hardware=get_hardware("h800"),
        extra_phases=V3_CONTEXT_EXTENSION,
        other_gpu_hours=PUBLISHED["post_training_gpu_hours"],
    )
    return cfg.with_(**changes)


@dataclass
class StepPlan:
    """One training step at one sequence length (see ``plan_step``)."""

    seq_len: int
    global_batch: int
    tokens_per_step: float
    micro_batch_tokens: int
    num_microbatches: int
    stage_ranges: list[tuple[int, int]]
    stage_kinds: list[str]
    stages: list[ChunkCost]
    sim: PipelineSim
    optimizer_s: float
    optimizer_parts: dict
    step_s: float
    report_rank: int
    memory: list[dict]  # per rank
    model_flops_per_token: float
    model_flops_per_token_noncausal: float
    comm: dict

    @property
    def pipeline_s(self) -> float:
        return self.sim.result.step_time

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_step * 86400.0 / self.step_s


def _check_parallel(cfg: RunConfig, seq_len: int, global_batch: int, mbt: int | None) -> tuple[int, int]:
    p = cfg.parallel
    if p.num_gpus % p.pp:
        raise ValueError(f"num_gpus={p.num_gpus} must be a multiple of pp={p.pp}")
    if p.dp % p.ep:
        raise ValueError(f"ep={p.ep} must divide dp = num_gpus / pp = {p.dp}")
    if cfg.model.n_routed_experts % p.ep:
        raise ValueError(f"ep={p.ep} must divide n_routed_experts={cfg.model.n_routed_experts}")
    mbt = mbt or p.micro_batch_tokens or seq_len
    total = global_batch * seq_len
    if total % (p.dp * mbt):
        raise ValueError(
            f"global_batch x seq_len = {global_batch} x {seq_len} must split into dp={p.dp} pipelines x "
            f"micro-batches of {mbt} tokens"
        )
    return mbt, total // (p.dp * mbt)


def plan_step(
    cfg: RunConfig,
    *,
    seq_len: int | None = None,
    global_batch: int | None = None,
    micro_batch_tokens: int | None = None,
) -> StepPlan:
    """Price one step of ``cfg``; ``seq_len``, ``global_batch``, ``micro_batch_tokens`` override the config's
    (a context-extension phase keeps the main phase's micro-batch tokens: a long sequence is cut into
    micro-batches whose queries attend over the whole sequence, as context parallelism would give)."""
    seq_len = seq_len or cfg.seq_len
    global_batch = global_batch or cfg.global_batch
    p, hw, m = cfg.parallel, cfg.hardware, cfg.model
    schedule = normalise_schedule(p.schedule)
    mbt, n_mb = _check_parallel(cfg, seq_len, global_batch, micro_batch_tokens)
    if cfg.precision not in ("fp8", "bf16"):
        raise ValueError(f"precision={cfg.precision!r} must be 'fp8' or 'bf16'")
    act = FP8 if cfg.precision == "fp8" else BF16
    blocks = model_blocks(m, tokens=mbt, seq_len=seq_len, ep=p.ep, act_bytes=act)
    node_limit = p.node_limit if p.node_limit is not None else (m.n_limited_groups or None)
    routing = Routing(m.n_routed_experts, m.n_activated_experts, p.ep, node_limit)
    costs = block_costs(
        blocks, hw, cfg.rates, precision=cfg.precision, routing=routing, hierarchical=p.hierarchical
    )
    n_stages = num_model_stages(schedule, p.pp)
    ranges = partition(costs, n_stages, overlapped=schedule in OVERLAPPED)
    stages = stage_costs(costs, ranges)

    # Pipeline sends cross nodes when a stage's dp GPUs fill whole nodes.
    cross_node = p.dp >= hw.gpus_per_node
    link = (
        hw.ib_gbps * cfg.rates.ib_efficiency if cross_node else hw.nvlink_gbps * cfg.rates.nvlink_efficiency
    )
    p2p = P2P(hw.p2p_latency_us * 1e-6, link * 1e9, mbt * m.dim * BF16)
    sim = simulate_pipeline(schedule, stages, pp=p.pp, num_microbatches=n_mb, p2p=p2p)

    layout = Layout(
        dp=p.dp, ep=p.ep, stage_copies=2 if schedule == "dualpipe" else 1, gpus_per_node=hw.gpus_per_node
    )
    buffers = 2.0 * mbt * m.n_activated_experts * m.dim * BF16 if p.ep > 1 else 0.0
    memory, opt_parts = [], []
    for r, held in enumerate(sim.rank_stages):
        rank_blocks = [blocks[ranges[s][0] : ranges[s][1]] for s in held]
        mem = memory_per_gpu(
            rank_blocks,
            layout,
            peak_in_flight=sim.result.peak_activations[r],
            zero_stage=p.zero_stage,
            comm_buffer_bytes=buffers,
        )
        memory.append(mem.to_dict())
        opt_parts.append(optimizer_step(rank_blocks, layout, hw, cfg.rates, zero_stage=p.zero_stage))
    opt = max(opt_parts, key=lambda o: o.total_s)
    report_rank = max(range(p.pp), key=lambda r: (sim.result.bubble[r], -r))

    moe = [c for c, b in zip(costs, blocks) if b.kind == "moe"]
    comm = {}
    if moe:
        c = moe[0]
        fb = fb_time(c, c)
        comm = {
            "per_moe_layer_fwd_s": c.comm_f,
            "per_moe_layer_bwd_s": c.comm_b,
            "per_moe_layer_compute_fwd_bwd_s": c.compute_f + c.compute_b,
            "hidden_in_fb_fraction": min(1.0, (c.compute_f + c.compute_b) / (c.comm_f + c.comm_b))
            if c.comm_f + c.comm_b > 0
            else 1.0,
            "exposed_alone_fwd_s": c.exposed_f,
            "exposed_alone_bwd_s": c.exposed_b,
            "fb_pair_s": fb,
            "ib_bytes_per_layer": c.ib_bytes,
            "nvlink_bytes_per_layer": c.nvlink_bytes,
        }
    return StepPlan(
        seq_len=seq_len,
        global_batch=global_batch,
        tokens_per_step=float(global_batch * seq_len),
        micro_batch_tokens=mbt,
        num_microbatches=n_mb,
        stage_ranges=ranges,
        stage_kinds=[_describe(blocks[a:b]) for a, b in ranges],
        stages=stages,
        sim=sim,
        optimizer_s=opt.total_s,
        optimizer_parts=asdict(opt),
        step_s=sim.result.step_time + opt.total_s,
        report_rank=report_rank,
        memory=memory,
        model_flops_per_token=model_flops_per_token(m, seq_len),
        model_flops_per_token_noncausal=model_flops_per_token(m, seq_len, causal=False),
        comm=comm,
    )


def _describe(blocks) -> str:
    out, last, n = [], None, 0
    for b in [*blocks, None]:
        kind = b.kind if b is not None else None
        if kind == last:
            n += 1
            continue
        if last is not None:
            out.append(f"{n}x{last}" if n > 1 else last)
        last, n = kind, 1
    return "+".join(out)


@dataclass
class PlanResult:
    config: RunConfig
    step: StepPlan
    phases: list[tuple[TrainingPhase, StepPlan]]
    metrics: dict

    def to_dict(self) -> dict:
        s = self.step
        r = s.report_rank
        c = self.config
        return {
            "config": {
                "model": c.model.name,
                "hardware": asdict(c.hardware),
                "parallel": asdict(c.parallel),
                "precision": c.precision,
                "seq_len": c.seq_len,
                "global_batch": c.global_batch,
                "tokens": c.tokens,
                "extra_phases": [asdict(ph) for ph in c.extra_phases],
                "other_gpu_hours": c.other_gpu_hours,
                "rates": c.rates.to_dict(),
            },
            "metrics": self.metrics,
            "stages": [
                {
                    "blocks": list(rg),
                    "kinds": k,
                    "f_s": st.f,
                    "b_s": st.b,
                    "w_s": st.w,
                    "fb_self_s": fb_time(st, st),
                    "compute_f_s": st.compute_f,
                    "compute_b_s": st.compute_b,
                    "comm_f_s": st.comm_f,
                    "comm_b_s": st.comm_b,
                }
                for rg, k, st in zip(s.stage_ranges, s.stage_kinds, s.stages)
            ],
            "ranks": [
                {
                    "rank": i,
                    "stages": list(s.sim.rank_stages[i]),
                    "phases_s": s.sim.phases[i],
                    "chunks": s.sim.counts[i],
                    "memory_bytes": s.memory[i],
                }
                for i in range(len(s.sim.phases))
            ],
            "report_rank": r,
            "comm_per_moe_layer": s.comm,
            "optimizer": s.optimizer_parts,
            "phases": [
                {
                    "phase": asdict(ph),
                    "step_s": sp.step_s,
                    "gpu_hours": self.metrics["phase_gpu_hours"][ph.name],
                }
                for ph, sp in self.phases
            ],
        }


def _comm_per_step(step: StepPlan, rank: int) -> dict:
    """Expert-exchange seconds one rank runs in a step and the share hidden behind compute.

    Chunks alone expose what their shared experts do not hide; chunks in F&B pairs expose what the pair's
    compute does not (rank-average of the stages it holds, as the simulator's costs).
    """
    held = [step.stages[i] for i in step.sim.rank_stages[rank]]
    n = len(held)
    comm_f = sum(c.comm_f for c in held) / n
    comm_b = sum(c.comm_b for c in held) / n
    exp_f = sum(c.exposed_f for c in held) / n
    exp_b = sum(c.exposed_b for c in held) / n
    pairs = [(x, y) for x in held for y in held if x is not y] or [(held[0], held[0])]
    exp_fb = sum(max(0.0, x.comm_f + y.comm_b - (x.compute_f + y.compute_b)) for x, y in pairs) / len(pairs)
    c = step.sim.counts[rank]
    n_fb = c.get("F&B", 0)
    total = (c.get("F", 0) + n_fb) * comm_f + (c.get("B", 0) + n_fb) * comm_b
    exposed = c.get("F", 0) * exp_f + c.get("B", 0) * exp_b + n_fb * exp_fb
    return {
        "comm_per_step_s": total,
        "comm_exposed_per_step_s": exposed,
        "comm_hidden_fraction": 1.0 - exposed / total if total > 0 else 1.0,
    }


def plan(cfg: RunConfig, *, with_phases: bool = True) -> PlanResult:
    """Price the run: the main step, the extra phases, and the totals (module docstring)."""
    step = plan_step(cfg)
    hw, p = cfg.hardware, cfg.parallel
    counts = param_counts(cfg.model)
    price = cfg.price_per_gpu_hour if cfg.price_per_gpu_hour is not None else hw.price_per_gpu_hour
    seconds_per_token = step.step_s / step.tokens_per_step
    gpu_h_per_t = p.num_gpus * seconds_per_token * 1e12 / 3600.0
    pretrain_h = gpu_h_per_t * cfg.tokens / 1e12
    phases, phase_h = [], {}
    if with_phases:
        for ph in cfg.extra_phases:
            sp = plan_step(
                cfg,
                seq_len=ph.seq_len,
                global_batch=ph.global_batch,
                micro_batch_tokens=step.micro_batch_tokens,
            )
            phases.append((ph, sp))
            phase_h[ph.name] = ph.steps * sp.step_s * p.num_gpus / 3600.0
    total_h = pretrain_h + sum(phase_h.values()) + cfg.other_gpu_hours
    r = step.report_rank
    peak = p.num_gpus * hw.bf16_tflops * 1e12
    tokens_per_s = step.tokens_per_step / step.step_s
    mem_peak = max(m["total"] for m in step.memory)
    metrics = {
        "params_total": counts.total,
        "params_active": counts.active,
        "params_mtp": counts.mtp,
        "gflops_per_token": step.model_flops_per_token / 1e9,
        "gflops_per_token_noncausal": step.model_flops_per_token_noncausal / 1e9,
        "micro_batches": step.num_microbatches,
        "step_s": step.step_s,
        "pipeline_s": step.pipeline_s,
        "optimizer_s": step.optimizer_s,
        "bubble_s": step.sim.phases[r]["bubble"],
        "bubble_fraction": step.sim.phases[r]["bubble"] / step.step_s,
        "bubble_busiest_rank_s": step.pipeline_s - max(step.sim.result.busy),
        "report_rank": r,
        "phase_f_s": step.sim.phases[r].get("F", 0.0),
        "phase_b_s": step.sim.phases[r].get("B", 0.0),
        "phase_w_s": step.sim.phases[r].get("W", 0.0),
        "phase_fb_s": step.sim.phases[r].get("F&B", 0.0),
        "tokens_per_step": step.tokens_per_step,
        "tokens_per_day": step.tokens_per_day,
        "tflops_causal": step.model_flops_per_token * tokens_per_s / p.num_gpus / 1e12,
        "mfu_causal": step.model_flops_per_token * tokens_per_s / peak,
        "mfu_noncausal": step.model_flops_per_token_noncausal * tokens_per_s / peak,
        "gpu_hours_per_trillion": gpu_h_per_t,
        "days_per_trillion": 1e12 / step.tokens_per_day,
        "pretrain_gpu_hours": pretrain_h,
        "phase_gpu_hours": phase_h,
        "context_extension_gpu_hours": sum(phase_h.values()),
        "other_gpu_hours": cfg.other_gpu_hours,
        "total_gpu_hours": total_h,
        "total_usd": total_h * price,
        "price_per_gpu_hour": price,
        "memory_peak_gb": mem_peak / 1e9,
        "memory_fits": mem_peak <= hw.hbm_gb * 1e9,
        "peak_in_flight_microbatches": max(step.sim.result.peak_activations),
        "comm_hidden_in_fb": step.comm.get("hidden_in_fb_fraction", 1.0),
        **_comm_per_step(step, r),
    }
    return PlanResult(cfg, step, phases, metrics)
