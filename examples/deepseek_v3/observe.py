"""What a run shows: the tqdm bar and metric lines on rank 0, wandb (optional), profiled windows.

    logger = RunLogger(spec, active=rank == 0, start=0)   # tqdm bar; wandb when spec.wandb is set
    prof = start_profiler(device)                         # CPU (+ CUDA) activity on every thread
    figures = measured_window(trace_path, distributed)    # bubble and hidden communication, all ranks
    schedule_bubble(pipe, num_chunks, png)                # the simulator's bubble at measured F/B/W times

wandb is imported lazily and only when enabled (``logger=wandb``); without a WANDB_API_KEY it runs offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from examples.deepseek_v3.overlap_report import COMM_KINDS, aggregate, rank_overlap


def measured_window(trace: Path, distributed: bool) -> dict[str, float]:
    """Bubble and hidden communication of one profiled window, summed over all ranks (a collective)."""
    r = rank_overlap(json.loads(trace.read_text())["traceEvents"])
    kinds = COMM_KINDS
    vals = [r["comm_ms"], r["hidden_ms"], r["step_ms"], r["busy_ms"]]
    for k in kinds:
        d = r["by_kind"].get(k, {})
        vals += [d.get("comm_ms", 0.0), d.get("hidden_ms", 0.0)]
    v = torch.tensor(vals, dtype=torch.float64)
    if distributed:
        dist.all_reduce(v)
    v = v.tolist()
    summed = dict(zip(("comm_ms", "hidden_ms", "step_ms", "busy_ms"), v[:4]))
    summed["by_kind"] = {k: {"comm_ms": v[4 + 2 * i], "hidden_ms": v[5 + 2 * i]} for i, k in enumerate(kinds)}
    agg = aggregate([summed])
    out = {k: agg[k] for k in ("hidden_fraction", "bubble_fraction") if agg[k] is not None}
    out.update({f"hidden_{k}": d["hidden_fraction"] for k, d in agg["by_kind"].items()})
    return out


def start_profiler(device: torch.device):
    """CPU (+ CUDA) activity on every thread: communication libraries run their transfers on their own
    threads (gloo's workers, moe_comm's communication thread), which the overlap report needs to see."""
    from torch._C._profiler import _ExperimentalConfig

    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(
        activities=acts, experimental_config=_ExperimentalConfig(profile_all_threads=True)
    )
    prof.start()
    return prof


class RunLogger:
    """tqdm bar and metric lines on rank 0; wandb when enabled (imported lazily, offline without a key)."""

    def __init__(self, spec: Any, active: bool, start: int):
        self.active, self.bar_ = active, None
        self.run = None
        if not active:
            return
        from tqdm import tqdm

        self.bar_ = tqdm(total=spec.train.steps, initial=start, desc="train", dynamic_ncols=True)
        if spec.wandb:
            self.run = _wandb_init(spec)

    def bar(self, m: dict) -> None:
        if self.bar_ is not None:
            self.bar_.set_postfix(loss=f"{m['loss']:.3f}")
            self.bar_.update(1)

    def log(self, m: dict) -> None:
        if not self.active:
            return
        line = (
            f"step {m['step']:>5} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
            f"{m['tokens_per_s']:,.0f} tok/s | "
            f"MFU {100 * m['mfu']:.2f}%"
        )
        if "bubble_fraction" in m:
            line += f" | bubble {100 * m['bubble_fraction']:.1f}%"
            if "bubble_schedule" in m:
                line += f" (schedule {100 * m['bubble_schedule']:.1f}%)"
        if "hidden_fraction" in m:
            line += f" | comm hidden {100 * m['hidden_fraction']:.0f}%"
            parts = [
                f"{k} {100 * m['hidden_' + k]:.0f}%"
                for k in ("a2a", "p2p", "allreduce")
                if f"hidden_{k}" in m
            ]
            line += f" ({', '.join(parts)})" if parts else ""
        self.bar_.write(line)
        if self.run is not None:
            self.run.log(m, step=m["step"])

    def close(self) -> None:
        if self.bar_ is not None:
            self.bar_.close()
        if self.run is not None:
            self.run.finish()


def _wandb_init(spec: Any):
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            "logger=wandb needs the wandb package: pip install wandb (or -e '.[examples]')"
        ) from e
    cfg = dict(spec.wandb or {})
    mode = cfg.pop("mode", None) or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(mode=mode, dir=spec.out_dir, config={"model": vars(spec.model)}, **cfg)


def schedule_bubble(pipe: Any, num_chunks: int, png: Path | None = None) -> float:
    """The bubble the schedule alone would leave with this step's measured action times.

    Prices the pipeline's schedule with dualpipe's simulator, fed with each rank's mean F, B, W and F&B
    durations of the last step (``pipe.timeline``), and returns the mean per-rank bubble fraction; the
    gap to the measured bubble is what the runtime adds (waits on transfers and peers, Python work).
    With ``png``, pipeline rank 0 draws the measured timeline beside the simulated one. A collective
    over the pipeline group.
    """
    from dualpipe.pipeline import gather_timeline
    from dualpipe.simulate import Costs

    def mean(op: str) -> float | None:
        d = [e.duration for e in pipe.timeline if e.op == op]
        return sum(d) / len(d) if d else None

    w = mean("W") or 0.0
    b = (mean("B") + w) if mean("B") is not None else (mean("BW") or 0.0)
    mine = (mean("F") or 0.0, max(b, w), w, mean("FB"))
    every: list[Any] = [None] * pipe.pp
    dist.all_gather_object(every, mine, group=pipe.group)
    timeline = gather_timeline(pipe)
    sim = pipe.simulate(num_chunks, [Costs(f=c[0], b=c[1], w=c[2], fb=c[3]) for c in every])
    if png is not None and pipe.rank == 0:
        sim.plot(png, measured=timeline)
    return sum(sim.bubble) / (sim.step_time * len(sim.bubble)) if sim.step_time > 0 else 0.0
