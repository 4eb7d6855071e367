"""Pipeline schedules on real processes: ours (DualPipe, DualPipeV, 1F1B, ZB1P) against PyTorch's
``torch.distributed.pipelining`` ScheduleDualPipeV and Schedule1F1B, on the same stages and micro-batches,
in one run.

    python -m bench.bench_pipeline --out /tmp/bench_pipeline.json           # both stage kinds (CPU)
    python -m bench.bench_pipeline --kind emulated --pp 8 --chunks 16 --f-ms 20

Two stage kinds:
  emulated  F, B, W sleep fixed times (B - W on the input path, W on a weight-only path, so every
            weight-split method sees the same split), so 8 ranks on 2 cores measure the schedule and
            the runtime, not core contention. Busy time is known exactly: measured bubble = step - busy.
  real      small MLP stages (Linear-GELU-Linear blocks, FP32, one thread per rank); ours with the
            default weight split ("generic") and with the opt-in Linear fast path (":linear" rows).
The model is the same for every schedule: ``2 * pp`` model halves; 1F1B, ZB1P and DualPipe put two
halves in each of ``pp`` stages, DualPipeV (ours and torch's) runs the ``2 * pp`` halves as a V.

Per schedule: median step time, measured bubble (emulated), simulated step and bubble from
``dualpipe.simulate`` with the nominal emulated costs plus the measured one-way P2P latency
(``sim_step_ms``, ``meas/sim``; ``sim_no_p2p_ms`` leaves the latency out) and, calibrated, with each
rank's measured median
action durations and the measured one-way P2P latency (this separates the runtime's own overhead
from sleep overshoot and scheduler jitter on a shared host), in-flight activation peak measured (ours)
and predicted (simulator), and ratios to torch's ScheduleDualPipeV and Schedule1F1B. Real stages also
time ``compute-only``: each rank's share of the compute (forward + backward of its two halves per
micro-batch) with no communication, on all ranks at once, in the same rounds; ``x_concurrent_floor`` is
a step over it (on a 2-core host two busy processes slow each other, so this floor sits well above the
serial ``x_compute_bound``; torch's ``x_concurrent_floor`` is the most any runtime could gain over it).
Implementations are timed round-robin, one step each per round. Targets: emulated step within
5% of the simulator; real stages at least 1.25x faster than torch's ScheduleDualPipeV.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bench.common import print_table, reuse_freed_cpu_memory, write_results
from dualpipe import Costs, DualPipe, DualPipeV, Pipeline1F1B, PipelineZB1P, build, simulate
from tests.distributed import run_ranks

OURS = {"dualpipe": DualPipe, "dualpipev": DualPipeV, "1f1b": Pipeline1F1B, "zb1p": PipelineZB1P}


# ------------------------------------------------------------------------------------------------------
# stages


class _SleepInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f_s, bi_s):  # type: ignore[override]
        time.sleep(f_s)
        ctx.bi_s = bi_s
        return x * 1.0

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        time.sleep(ctx.bi_s)
        return g, None, None


class _SleepWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, w_s):  # type: ignore[override]
        ctx.w_s, ctx.shape = w_s, w.shape
        return (w * 0).sum()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        time.sleep(ctx.w_s)
        return g.new_zeros(ctx.shape), None


class Emulated(nn.Module):
    """F sleeps ``f``; the input backward sleeps ``b - w``; the weight backward sleeps ``w``."""

    def __init__(self, f: float, b: float, w: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.f, self.bi, self.w = f, b - w, w

    def forward(self, x):
        return _SleepInput.apply(x, self.f, self.bi) + _SleepWeight.apply(self.weight, self.w)


class MLP(nn.Module):
    def __init__(self, d: int, blocks: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            for _ in range(blocks)
        )

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _half(cfg: dict, i: int) -> nn.Module:
    """Model half i of 2 * pp (the unit every schedule splits the model into)."""
    if cfg["kind"] == "emulated":
        f, b, w = (cfg[k] / 2 for k in ("f", "b", "w"))  # a half costs half a stage
        return Emulated(f, b, w)
    return MLP(cfg["d"], cfg["blocks_per_half"], seed=i)


def _stage(cfg: dict, s: int, n: int) -> nn.Module:
    """Stage s of n: 2pp / n consecutive halves."""
    k = 2 * cfg["pp"] // n
    return nn.Sequential(*(_half(cfg, s * k + j) for j in range(k)))


def _loss(out, y):
    return ((out - y) ** 2).mean()


# ------------------------------------------------------------------------------------------------------
# runners (one process per pipeline rank)


def _ours(cfg: dict, impl: str, rank: int, pp: int):
    name, _, split = impl.partition(":")  # "dualpipev:linear" -> weight_split="linear"
    if name == "dualpipe":
        mods = (_stage(cfg, rank, pp), _stage(cfg, pp - 1 - rank, pp))
    elif name == "dualpipev":
        mods = (_stage(cfg, rank, 2 * pp), _stage(cfg, 2 * pp - 1 - rank, 2 * pp))
    else:
        mods = _stage(cfg, rank, pp)
    pipe = OURS[name](
        mods, weight_split=split or cfg["weight_split"], timeout_s=120, early_send=cfg["early_send"]
    )
    x, y = cfg["x"], cfg["y"]
    is_first = rank == 0 or (name == "dualpipe" and rank == pp - 1)

    def step():
        for p in pipe.parameters():
            p.grad = None
        args = (x,) if is_first else ()
        pipe.step(*args, num_chunks=cfg["chunks"], criterion=_loss, labels=(y,))
        return dict(pipe.stats, timeline=pipe.timeline)

    while pipe.early_send is None:  # early_send="auto": its trial steps, before any timed round
        step()
    return step


def _torch(cfg: dict, name: str, rank: int, pp: int):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

    dev = torch.device("cpu")
    if name == "torch-dualpipev":
        n = 2 * pp
        stages = [PipelineStage(_stage(cfg, s, n), s, n, dev) for s in (rank, 2 * pp - 1 - rank)]
        sched = ScheduleDualPipeV(stages, n_microbatches=cfg["chunks"], loss_fn=_loss)
        first, last = rank == 0, rank == 0
    else:
        stages = PipelineStage(_stage(cfg, rank, pp), rank, pp, dev)
        sched = Schedule1F1B(stages, n_microbatches=cfg["chunks"], loss_fn=_loss)
        first, last = rank == 0, rank == pp - 1
    mods = [s.submod for s in (stages if isinstance(stages, list) else [stages])]
    x, y = cfg["x"], cfg["y"]

    def step():
        for m in mods:
            for p in m.parameters():
                p.grad = None
        kw: dict[str, Any] = {}
        if last:
            kw = dict(target=y, losses=[])
        sched.step(*((x,) if first else ()), **kw)
        return {}

    return step


def _floor(cfg: dict, name: str, rank: int, pp: int):
    """Compute only: this rank's share of the model (the same two halves as a DualPipeV rank: every
    schedule gives each rank 2 halves' work per micro-batch), forward then full backward per micro-batch,
    no communication, on every rank at once -- the floor for any runtime on this host. The serial bound
    (``_compute_bound``, one process alone) is lower when concurrent processes slow each other (shared
    caches, memory bandwidth, a virtual machine's siblings)."""
    mods = [_stage(cfg, s, 2 * pp) for s in (rank, 2 * pp - 1 - rank)]
    xs = [x.clone().requires_grad_() for x in torch.tensor_split(cfg["x"], cfg["chunks"])]
    ys = torch.tensor_split(cfg["y"], cfg["chunks"])

    def step():
        for m in mods:
            for p in m.parameters():
                p.grad = None
        for x, y in zip(xs, ys):
            for m in mods:
                _loss(m(x), y).backward()
        return {}

    return step


def _rank(rank: int, world: int, cfg: dict) -> list[dict]:
    """Build every implementation, then time them round-robin (one step each per round), so that load
    drifting on a shared host hits all of them alike. Every implementation runs with glibc reusing freed
    memory instead of returning it to the OS (``bench.common.reuse_freed_cpu_memory``), as a GPU caching
    allocator would: otherwise each fresh weight gradient page-faults (~10% of a real-stage step)."""
    torch.set_num_threads(1)
    reuse_freed_cpu_memory()
    latency = _ping(rank, cfg["x"][: max(1, cfg["x"].shape[0] // cfg["chunks"])])
    kinds = {"torch": _torch, "compute": _floor}
    steps = [kinds.get(name.partition("-")[0], _ours)(cfg, name, rank, world) for name in cfg["impls"]]
    rows = [
        dict(impl=name, rank=rank, times=[], stats=[], cpu_main=[], cpu_other=[]) for name in cfg["impls"]
    ]
    for it in range(cfg["warmup"] + cfg["iters"]):
        for step, row in zip(steps, rows):
            dist.barrier()
            t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
            st = step()
            c1, p1 = time.thread_time(), time.process_time()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if it >= cfg["warmup"]:
                row["times"].append(float(t))
                row["stats"].append(st)
                # CPU this rank spent in the step: on the calling thread, and on the process's other
                # threads (the runtime's and the backend's communication threads)
                row["cpu_main"].append(c1 - c0)
                row["cpu_other"].append((p1 - p0) - (c1 - c0))
    for row in rows:
        row["latency"] = latency
    return rows


def _ping(rank: int, x: torch.Tensor, n: int = 30) -> float:
    """Median one-way time of a micro-batch-sized message between ranks 0 and 1 (our P2P path)."""
    from dualpipe.p2p import P2P

    p2p = P2P(None, 60.0)
    buf = x.detach().clone()
    rtts = []
    for _ in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            p2p.wait(p2p.isend(buf, 1, 5), 1, "ping")
            p2p.wait(p2p.irecv(buf, 1, 6), 1, "ping")
        elif rank == 1:
            p2p.wait(p2p.irecv(buf, 0, 5), 0, "ping")
            p2p.wait(p2p.isend(buf, 0, 6), 0, "ping")
        rtts.append(time.perf_counter() - t0)
    p2p.close()
    return statistics.median(rtts) / 2


def _calibrated(timelines: list[list], latency: float) -> list[Costs]:
    """Per-rank costs from the measured action durations (medians) and the measured P2P latency."""
    out = []
    for tl in timelines:
        # a B whose W was fused into it (the W is a zero-length event) ran a full backward: count it as BW
        fused = {(e.stage, e.mb) for e in tl if e.op == "W" and e.duration < 1e-4}
        tl = [
            replace(e, op="BW") if e.op == "B" and (e.stage, e.mb) in fused else e
            for e in tl
            if not (e.op == "W" and (e.stage, e.mb) in fused)
        ]
        med = {op: statistics.median(e.duration for e in tl if e.op == op) for op in {e.op for e in tl}}
        w = med.get("W", 0.0)
        b = med["BW"] if "BW" in med else med.get("B", 0.0) + w
        b = max(b, w)
        out.append(Costs(f=med["F"], b=b, w=w, fb=med.get("FB"), p2p_latency=latency))
    return out


# ------------------------------------------------------------------------------------------------------
# the run


def run(kind: str, args: argparse.Namespace) -> list[dict]:
    pp = args.pp if kind == "emulated" else args.pp_real
    chunks = args.chunks if kind == "emulated" else args.chunks_real
    iters = args.iters if kind == "emulated" else args.iters_real
    cfg: dict[str, Any] = dict(
        kind=kind,
        pp=pp,
        chunks=chunks,
        warmup=args.warmup,
        iters=iters,
        early_send={"auto": "auto", "on": True, "off": False}[args.early_send],
    )
    if kind == "emulated":
        cfg.update(f=args.f_ms / 1e3, b=args.b_ms / 1e3, w=args.w_ms / 1e3, weight_split="generic")
        cfg["x"] = torch.randn(
            chunks * 2, 8, requires_grad=True
        )  # a differentiable input: stage 0 runs B too
        cfg["y"] = torch.randn(chunks * 2, 8)
    else:
        cfg.update(d=args.d, blocks_per_half=args.blocks, weight_split=args.weight_split)
        cfg["x"] = torch.randn(chunks * args.rows, args.d)
        cfg["y"] = torch.randn(chunks * args.rows, args.d)
    impls = ["dualpipe", "dualpipev", "1f1b", "zb1p", "torch-dualpipev", "torch-1f1b"]
    if kind == "real" and cfg["weight_split"] != "linear":  # also the opt-in Linear fast path
        impls[4:4] = ["dualpipev:linear", "zb1p:linear"]
    if kind == "real":  # timed in the same rounds, so it sees the same load
        impls.append("compute-only")
    if args.impls:  # a subset; torch's DualPipeV always (every ratio is to it)
        unknown = sorted(set(args.impls) - set(impls))
        if unknown:
            raise SystemExit(f"--impls: {unknown} are not among the {kind}-stage rows {impls}")
        impls = [i for i in impls if i in args.impls or i == "torch-dualpipev"]
    cfg["impls"] = impls
    per_rank = run_ranks(_rank, pp, args=(cfg,), timeout=1800, pg_timeout=600)
    bound = _compute_bound(cfg) if kind == "real" else None
    rows = []
    for i, name in enumerate(impls):
        times = per_rank[0][i]["times"]
        med = statistics.median(times)
        row: dict[str, Any] = dict(kind=kind, impl=name, pp=pp, chunks=chunks, step_ms=med * 1e3)
        row["step_min_ms"] = min(times) * 1e3
        # medians over the steps, the busiest rank: where a step's time goes besides the compute
        for k in ("cpu_main", "cpu_other"):
            row[k + "_ms"] = max(statistics.median(r[i][k]) for r in per_rank) * 1e3
        sched_name = name.replace("torch-", "").partition(":")[0]
        if kind == "emulated":
            k = 2 if sched_name == "dualpipev" else 1  # DualPipeV: 2pp stages of half the cost
            c = Costs(f=cfg["f"] / k, b=cfg["b"] / k, w=cfg["w"] / k)
            # ours priced as our runtime runs an F&B (early sends: the activation leaves after the forward
            # half, the gradient is awaited at the backward half; --no-early-send: the plain model)
            ours = not name.startswith("torch")
            halves = ours and per_rank[0][i]["stats"][-1]["early_send"]
            sim = simulate(build(sched_name, pp, chunks), c, fb_halves=halves)
            # the nominal prediction: the emulated costs plus the measured one-way P2P latency (a real
            # transfer takes time; the costs alone would assume it is free)
            lat = per_rank[0][i]["latency"]
            sim_lat = simulate(build(sched_name, pp, chunks), replace(c, p2p_latency=lat), fb_halves=halves)
            # every schedule gives each rank one stage's worth of work per micro-batch
            row["busy_ms"] = chunks * (cfg["f"] + cfg["b"]) * 1e3
            row["bubble_meas"] = 1 - row["busy_ms"] / row["step_ms"]
            row["sim_no_p2p_ms"] = sim.step_time * 1e3
            row["sim_step_ms"] = sim_lat.step_time * 1e3
            row["bubble_sim"] = sim_lat.bubble_fraction
            row["meas/sim_no_p2p"] = row["step_ms"] / row["sim_no_p2p_ms"]
            row["meas/sim"] = row["step_ms"] / row["sim_step_ms"]
            row["act_peak_pred"] = max(sim.peak_activations)
            if not name.startswith("torch"):
                tls = [r[i]["stats"][-1]["timeline"] for r in per_rank]
                cal_costs = _calibrated(tls, per_rank[0][i]["latency"])
                cal = simulate(build(sched_name, pp, chunks), cal_costs, fb_halves=halves)
                row["p2p_lat_ms"] = per_rank[0][i]["latency"] * 1e3
                row["sim_cal_ms"] = cal.step_time * 1e3
                row["meas/sim_cal"] = row["step_ms"] / row["sim_cal_ms"]
        if not name.startswith(("torch", "compute")):  # our pipelines' own statistics
            row["early_send"] = per_rank[0][i]["stats"][-1]["early_send"]
            peaks = [r[i]["stats"][-1]["peak_activations"] for r in per_rank]
            row["act_peak_meas"] = max(peaks)
            bubbles = [statistics.median(s["bubble"] for s in r[i]["stats"]) for r in per_rank]
            stepw = [statistics.median(s["schedule_time"] for s in r[i]["stats"]) for r in per_rank]
            row["bubble_rank_max"] = max(b / t for b, t in zip(bubbles, stepw))
            if kind == "real":
                row["act_peak_pred"] = max(
                    simulate(build(sched_name, pp, chunks), Costs(1, 2, 1)).peak_activations
                )
        if bound is not None:
            row["x_compute_bound"] = med / bound
        rows.append(row)
    by = {r["impl"]: r["step_ms"] for r in rows}
    for r in rows:
        r["vs_torch_dualpipev"] = by["torch-dualpipev"] / r["step_ms"]
        if "torch-1f1b" in by:
            r["vs_torch_1f1b"] = by["torch-1f1b"] / r["step_ms"]
        if "compute-only" in by:
            r["x_concurrent_floor"] = r["step_ms"] / by["compute-only"]
    return rows


def _compute_bound(cfg: dict) -> float:
    """Serial forward+backward of every half on every micro-batch, one thread, divided by pp."""
    torch.set_num_threads(1)
    halves = [_half(cfg, i) for i in range(2 * cfg["pp"])]
    xs = torch.tensor_split(cfg["x"], cfg["chunks"])
    ys = torch.tensor_split(cfg["y"], cfg["chunks"])
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for x, y in zip(xs, ys):
            h = x
            for m in halves:
                h = m(h)
            _loss(h, y).backward()
        best = min(best, time.perf_counter() - t0)
    return best / cfg["pp"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["emulated", "real", "both"], default="both")
    ap.add_argument("--pp", type=int, default=8, help="ranks for emulated stages")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--f-ms", type=float, default=40.0)
    ap.add_argument("--b-ms", type=float, default=80.0)
    ap.add_argument("--w-ms", type=float, default=40.0)
    ap.add_argument("--pp-real", type=int, default=2, help="ranks for real stages (one core each)")
    ap.add_argument("--chunks-real", type=int, default=8)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--rows", type=int, default=16, help="rows per micro-batch (real stages)")
    ap.add_argument("--blocks", type=int, default=1, help="MLP blocks per model half (real stages)")
    ap.add_argument("--weight-split", default="generic", choices=["generic", "linear", "none"])
    ap.add_argument(
        "--early-send",
        choices=["auto", "on", "off"],
        default="auto",
        help="our DualPipe/DualPipeV: an F&B's activation leaves after its forward half (on), with its "
        "gradient at the end (off), or whichever the pipeline timed faster on its first steps (auto, the "
        "default; those steps run before the timed rounds)",
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5, help="timed rounds, emulated stages (~2.5 s a step)")
    ap.add_argument("--iters-real", type=int, default=30, help="timed rounds, real stages (noisy host)")
    ap.add_argument("--impls", nargs="+", default=None, help="time only these rows (and torch-dualpipev)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/, for GPU results)")
    args = ap.parse_args()
    rows: list[dict] = []
    load_before = os.getloadavg()
    for kind in ("emulated", "real") if args.kind == "both" else (args.kind,):
        got = run(kind, args)
        print(f"\n{kind} stages")
        print_table(got)
        rows += got
    # a shared host's load moves absolute times; the ratios come from round-robin timing in one run
    summary: dict[str, Any] = {"loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]}
    emu = [r for r in rows if r["kind"] == "emulated" and not r["impl"].startswith("torch")]
    if emu:
        summary["emulated_max_abs_dev_from_sim"] = max(abs(r["meas/sim"] - 1) for r in emu)
        summary["emulated_max_abs_dev_from_calibrated_sim"] = max(abs(r["meas/sim_cal"] - 1) for r in emu)
    real = [r for r in rows if r["kind"] == "real" and not r["impl"].startswith(("torch", "compute"))]
    if real:
        summary["real_speedup_vs_torch_dualpipev"] = {r["impl"]: r["vs_torch_dualpipev"] for r in real}
        # the most any runtime could gain over torch's DualPipeV: its step over the compute-only floor
        floor = [r for r in rows if r["impl"] == "compute-only"]
        tdv = [r for r in rows if r["kind"] == "real" and r["impl"] == "torch-dualpipev"]
        if floor and tdv:
            summary["real_torch_dualpipev_x_concurrent_floor"] = tdv[0]["x_concurrent_floor"]
    print("\nsummary:", summary)
    out = write_results("bench_pipeline", rows, summary=summary, args=vars(args), out=args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
