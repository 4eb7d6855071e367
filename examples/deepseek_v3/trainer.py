"""One rank's training loop for any PP x DP x EP layout (the process group already exists).

    result = train(spec)            # spec: RunSpec (model, layout, train settings, precision, logger)
    result["losses"]                # the global mean loss of every step, identical on every rank

Per step: the step's global batch (a pure function of seed and step, data.py) is cut into ``dp * ep``
shards, this rank's shard into ``num_chunks`` micro-batches; forward/backward runs them (through the
pipeline runtime when pp > 1), then gradients are averaged over the data-parallel replicas, clipped by
their global norm, AdamW steps, and the routers' balancing biases move by the sign of the global expert
load error. The loss of each micro-batch is scaled by 1 / num_chunks and gradients are averaged over the
``dp * ep`` shards, so every layout computes the gradient of the same global mean loss as one process.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from examples.deepseek_v3 import checkpoint as ckpt
from examples.deepseek_v3.config import ModelConfig
from examples.deepseek_v3.data import TokenCorpus, shard_rows
from examples.deepseek_v3.layout import Groups, Layout, build_groups, check_layout
from examples.deepseek_v3.metrics import flops_per_token, peak_flops
from examples.deepseek_v3.model import build_model, layer_ranges, lm_loss, split_stages
from examples.deepseek_v3.moe import shard_experts
from examples.deepseek_v3.observe import RunLogger, measured_window, schedule_bubble, start_profiler
from moe_comm import DeepSeekV3Router

PRECISIONS = ("fp32", "bf16", "fp8")


@dataclass
class TrainSettings:
    steps: int = 60
    batch_size: int = 8  # sequences per step, whole job
    seq_len: int = 64
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    bias_update_speed: float = 1e-3  # aux-loss-free balancing rate (DeepSeek-V3: 0.001)
    seed: int = 0
    data_path: str | None = None
    log_every: int = 10
    ckpt_every: int = 0  # 0: no checkpoints
    ckpt_dir: str | None = None
    keep_ckpts: int = 2
    resume: bool = True
    profile_start: int = -1  # first profiled step (-1: no profiling)
    profile_steps: int = 2
    peak_tflops: float | None = None
    weight_split: str = "generic"  # zero-bubble W split of the pipeline: generic | linear | none
    pp_timeout_s: float = 300.0
    crash_in_checkpoint_at: int = -1  # tests only: the process dies while writing this step's checkpoint


@dataclass
class RunSpec:
    model: ModelConfig
    layout: Layout
    train: TrainSettings = field(default_factory=TrainSettings)
    precision: str = "fp32"
    out_dir: str = "."
    wandb: dict | None = None  # {"project": ..., "mode": ...} to enable


def lr_at(t: TrainSettings, step: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


def _is_expert_param(name: str) -> bool:
    return ".experts." in name


class RankModel:
    """This rank's stages (m0[, m1]), built from the whole model so every layout starts identical."""

    def __init__(self, spec: RunSpec, rank: int, groups: Groups | None, device: torch.device):
        cfg, lay = spec.model, spec.layout
        self.spec, self.rank, self.groups, self.device = spec, rank, groups, device
        self.pp_rank, self.dp_rank, self.ep_rank = lay.coords(rank)
        full = build_model(cfg, seed=spec.train.seed)
        ranges = layer_ranges(cfg.n_layers, lay.num_stages)
        self.stage_ids = lay.stages_of(self.pp_rank)
        by_id = split_stages(full, ranges, keep=self.stage_ids)
        self.stages: list[nn.Module] = [by_id[i] for i in self.stage_ids]
        del full
        expert_backend = "fp8" if spec.precision == "fp8" else "native"
        if lay.ep > 1 or expert_backend != "native":
            for st in self.stages:
                shard_experts(st, groups.ep if groups else None, self.ep_rank, lay.ep, backend=expert_backend)
        if spec.precision == "fp8":
            from fp8 import convert_to_fp8

            for st in self.stages:
                convert_to_fp8(st)
        for st in self.stages:
            st.to(device)
            st.train()
        # DualPipe holds two mirrored copies of different stages; every stage lives on one rank as m0.
        self.owned = self.stages[:1] if lay.schedule == "dualpipe" and lay.pp > 1 else self.stages
        self.params = [p for st in self.stages for p in st.parameters()]
        self.routers = [m for st in self.stages for m in st.modules() if isinstance(m, DeepSeekV3Router)]
        for r in self.routers:
            r.bias_update_rate = spec.train.bias_update_speed

    def named_params(self, stages: list[nn.Module] | None = None):
        for st in stages if stages is not None else self.stages:
            yield from st.named_parameters()


def _all_reduce_grads(params: list[torch.Tensor], group: dist.ProcessGroup | None, divide: int) -> None:
    """Sum the gradients over ``group`` in one flat buffer, then divide (gloo and NCCL alike)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if group is not None:
        dist.all_reduce(flat, group=group)
    if divide != 1:
        flat.div_(divide)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class Trainer:
    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        world = dist.get_world_size() if self.distributed else 1
        t, lay = spec.train, spec.layout
        check_layout(lay, spec.model, world, t.batch_size, t.seq_len)
        if spec.precision not in PRECISIONS:
            raise ValueError(f"precision={spec.precision!r} must be one of {PRECISIONS}")
        self.groups = build_groups(lay) if self.distributed else None
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.model = RankModel(spec, self.rank, self.groups, self.device)
        _, dp_rank, ep_rank = lay.coords(self.rank)
        self.shard = dp_rank * lay.ep + ep_rank
        self.corpus = TokenCorpus.load(t.data_path, spec.model.vocab_size)
        decay = [p for n, p in self.model.named_params() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_params() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            foreach=False,
        )
        self.state = ckpt.training_state(self.model.stages, self.opt)
        self.start_step = 0
        if t.ckpt_dir and t.resume:
            found = ckpt.latest_checkpoint(t.ckpt_dir)
            if found is not None:
                meta = ckpt.load_checkpoint(found[0], self.state)
                self.start_step = int(meta["step"])
        self.pipeline = None
        if lay.pp > 1:
            from dualpipe.pipeline import DualPipe, DualPipeV, Pipeline1F1B, PipelineZB1P

            cls = {"dualpipev": DualPipeV, "dualpipe": DualPipe, "1f1b": Pipeline1F1B, "zb1p": PipelineZB1P}
            mods = self.model.stages
            self.pipeline = cls[lay.schedule](
                mods if len(mods) > 1 else mods[0],
                process_group=self.groups.pp,
                num_stages=lay.num_stages,
                weight_split=t.weight_split,
                timeout_s=t.pp_timeout_s,
            )

    # ---- one step ---------------------------------------------------------------------------------
    def _autocast(self):
        if self.spec.precision in ("bf16", "fp8"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_backward(self, tokens: torch.Tensor) -> tuple[float, int]:
        """Run this rank's share of the step; returns (sum of unscaled chunk losses here, their count)."""
        lay, t = self.spec.layout, self.spec.train
        scale = 1.0 / lay.num_chunks
        if self.pipeline is not None:
            # every rank passes the shard's tokens; the pipeline uses them where a chain starts or ends
            def criterion(*outs_and_labels: torch.Tensor) -> torch.Tensor:
                *outs, targets = outs_and_labels
                return lm_loss(*outs, targets=targets, mtp_weight=t.mtp_weight, scale=scale)

            with self._autocast():
                loss, _ = self.pipeline.step(
                    tokens[:, :-1], num_chunks=lay.num_chunks, criterion=criterion, labels=(tokens[:, 1:],)
                )
            # DualPipe returns every micro-batch's loss on both ends: count them once (pipeline rank 0)
            if loss is None or (lay.schedule == "dualpipe" and self.model.pp_rank != 0):
                return 0.0, 0
            return float(loss.double().sum()) / scale, loss.numel()
        total, count = 0.0, 0
        model = self.model.stages[0]
        for mb in tokens.chunk(lay.num_chunks):
            with record_function("F"), self._autocast():
                loss = lm_loss(*model(mb[:, :-1]), targets=mb[:, 1:], mtp_weight=t.mtp_weight)
            with record_function("B"):
                (loss * scale).backward()
            total += loss.item()
            count += 1
        return total, count

    def _reduce_and_clip(self) -> float:
        lay, g = self.spec.layout, self.groups
        dense = [p for n, p in self.model.named_params() if not _is_expert_param(n)]
        experts = [p for n, p in self.model.named_params() if _is_expert_param(n)]
        with record_function("grad_allreduce"):
            _all_reduce_grads(dense, g.data if g else None, lay.data_shards)
            _all_reduce_grads(experts, g.dp if g else None, lay.data_shards)
        # Global norm: each parameter counted once over the whole job (dense replicas over dp*ep,
        # expert replicas over dp, DualPipe's mirrored copies over 2).
        owned = list(self.model.named_params(self.model.owned))
        sq = torch.zeros((), dtype=torch.float64)
        for n, p in owned:
            if p.grad is not None:
                w = lay.dp if _is_expert_param(n) else lay.data_shards
                sq += p.grad.detach().double().pow(2).sum().cpu() / w
        if self.distributed:
            dist.all_reduce(sq)
        norm = float(sq.sqrt())
        if self.spec.train.grad_clip > 0:
            coef = min(1.0, self.spec.train.grad_clip / (norm + 1e-6))
            if coef < 1.0:
                for p in self.model.params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return norm

    def _update_router_bias(self) -> None:
        """Aux-loss-free balancing: each router's bias moves by the sign of its load error over the job.

        The load of a router is summed over the data-parallel replicas of its stage (one all-reduce for
        all routers of the rank) and, with DualPipe, over the stage's two copies, which see different
        micro-batches (one per direction) and must keep the same bias.
        """
        lay, cfg = self.spec.layout, self.spec.model
        per_stage = [[m for m in st.modules() if isinstance(m, DeepSeekV3Router)] for st in self.model.stages]
        routers = [r for rs in per_stage for r in rs]
        load = torch.zeros(0, cfg.n_routed_experts)
        if routers:
            load = torch.stack([r.load for r in routers])
            if self.groups is not None and self.groups.data is not None:
                dist.all_reduce(load, group=self.groups.data)
        if lay.schedule == "dualpipe" and lay.pp > 1:
            n_max = cfg.n_layers // lay.num_stages + cfg.mtp_depth  # routers of a stage, at most
            buf = torch.zeros(lay.pp, n_max, cfg.n_routed_experts, dtype=torch.float32)
            offset = 0
            for sid, rs in zip(self.model.stage_ids, per_stage):
                buf[sid, : len(rs)] = load[offset : offset + len(rs)]
                offset += len(rs)
            dist.all_reduce(buf, group=self.groups.pp)
            load = torch.cat([buf[sid, : len(rs)] for sid, rs in zip(self.model.stage_ids, per_stage)])
        for r, ld in zip(routers, load):
            r.update_bias(load=ld)

    def step(self, step: int) -> dict[str, float]:
        t, lay = self.spec.train, self.spec.layout
        for group in self.opt.param_groups:
            group["lr"] = lr_at(t, step)
        batch = self.corpus.global_batch(step, t.batch_size, t.seq_len, seed=t.seed)
        tokens = shard_rows(batch, self.shard, lay.data_shards).to(self.device)
        with record_function("pipeline_step"):
            total, count = self._forward_backward(tokens)
        norm = self._reduce_and_clip()
        with record_function("optimizer"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self._update_router_bias()
        stats = torch.tensor([total, count], dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(stats)
        return {"loss": float(stats[0] / stats[1]), "grad_norm": norm, "lr": lr_at(t, step)}

    def save(self, step: int, meta: dict) -> None:
        t = self.spec.train
        writer = None
        if t.crash_in_checkpoint_at == step:
            writer = _CrashingWriter(ckpt.checkpoint_path(t.ckpt_dir, step))
        ckpt.save_checkpoint(
            t.ckpt_dir, step, self.state, meta=meta, keep=t.keep_ckpts, storage_writer=writer
        )


class _CrashingWriter(torch.distributed.checkpoint.FileSystemWriter):
    """Test fault: writes this rank's data files, then the process dies before DCP's metadata and marker."""

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        fut.wait()
        import os

        os._exit(17)


def train(spec: RunSpec, progress: bool = True) -> dict[str, Any]:
    """Train on this rank; returns {"losses", "grad_norms", "start_step", "last" (metrics), ...}.

    Metrics every ``log_every`` steps (rank 0 prints, all ranks return them): loss, tokens/s and MFU over
    the window's unprofiled steps, and, from a profile of the window's last step aggregated over all
    ranks, the measured bubble and the fraction of communication hidden behind compute (overlap_report).
    Steps ``[profile_start, profile_start + profile_steps)`` are also written as Chrome traces.
    """
    tr = Trainer(spec)
    t, lay = spec.train, spec.layout
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank0 = tr.rank == 0
    tokens_per_step = t.batch_size * t.seq_len
    fpt = flops_per_token(spec.model, t.seq_len)
    peak, peak_src = peak_flops(tr.device, t.peak_tflops)
    logger = RunLogger(spec, rank0 and progress, tr.start_step)
    losses: list[float] = []
    grad_norms: list[float] = []
    window_s, window_steps = 0.0, 0
    trace_steps = (
        range(t.profile_start, t.profile_start + t.profile_steps) if t.profile_start >= 0 else range(0)
    )
    trace_last = trace_steps[-1] if len(trace_steps) else -1
    prof, sample = None, {}
    last: dict[str, float] = {}
    for step in range(tr.start_step, t.steps):
        log_now = (step + 1) % t.log_every == 0 or step + 1 == t.steps
        sampled = log_now and step not in trace_steps and window_steps > 0  # keep one unprofiled step
        if prof is None and (step in trace_steps or sampled):
            prof = start_profiler(tr.device)
        t0 = time.perf_counter()
        m = tr.step(step)
        if prof is None:
            window_s += time.perf_counter() - t0
            window_steps += 1
        elif sampled or step == trace_last or step + 1 == t.steps:
            prof.stop()
            kept = step in trace_steps  # a sampled window's trace is read back and deleted
            path = out / f"trace_rank{tr.rank}.json" if kept else Path(tempfile.mkstemp(suffix=".json")[1])
            prof.export_chrome_trace(str(path))
            prof = None
            sample = measured_window(path, tr.distributed)
            if not kept:
                path.unlink()
            if tr.pipeline is not None:  # the schedule's own bubble at the measured action times
                png = out / "timeline.png" if step == trace_last and tr.shard == 0 else None
                sb = torch.tensor(schedule_bubble(tr.pipeline, lay.num_chunks, png), dtype=torch.float64)
                if tr.distributed:
                    dist.all_reduce(sb)
                sample["bubble_schedule"] = float(sb) / lay.world_size
        losses.append(m["loss"])
        grad_norms.append(m["grad_norm"])
        logger.bar(m)
        if log_now:
            tps = tokens_per_step * window_steps / window_s if window_steps else float("nan")
            last = {**m, "step": step + 1, "tokens_per_s": tps, "mfu": fpt * tps / (peak * lay.world_size)}
            last.update(sample)
            logger.log(last)
            window_s, window_steps = 0.0, 0
        if t.ckpt_dir and t.ckpt_every and (step + 1) % t.ckpt_every == 0:
            tr.save(step + 1, {"loss": m["loss"]})
    logger.close()
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "start_step": tr.start_step,
        "last": last,
        "peak_source": peak_src,
    }
