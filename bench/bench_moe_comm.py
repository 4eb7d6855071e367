"""Expert-parallel dispatch/combine: ours vs a plain all_to_all_single of the same bytes and vs a
Megatron-style dispatcher; bytes across nodes flat vs hierarchical; fraction of communication hidden.

    python bench/bench_moe_comm.py --out /tmp/bench_moe_comm.json              # CPU, gloo, local processes
    torchrun --nproc-per-node 8 bench/bench_moe_comm.py                        # GPUs, NCCL (rank 0 writes)

Sections (one table each, all figures in the JSON):
  comm      dispatch + combine of one micro-batch (identity experts) on ``--world`` ranks: ours (host-sync
            counts), ours (worst-case capacity, no host sync), the same bytes as two plain
            ``all_to_all_single`` calls with known splits (the lower bound: no routing, no permutation, no
            count exchange), and a Megatron-style dispatcher written here (counts exchanged, host sync,
            argsort permutation of one row per (token, expert) pair, chunk sort by local expert, reverse).
            Goal: ours <= 1.15x the plain all-to-all.
  payload   the same ratio (ours, host-sync counts, vs the plain all-to-all) per hidden size
            (``--sweep-hidden``): fixed costs (the count exchange, index plans, Python and thread hand-offs)
            dominate small rows, the memory passes (pack, expand, gather pairs, FP32 sum) large ones.
            ``combine_by_expert``: whether the combine went back by local expert (no pair gather; the
            default for rows >= 8 KiB; ``--combine-by-expert on|off`` forces it in comm and payload).
            DeepSeek-like rows: ``--sections payload --tokens 4096 --experts 64 --topk 8 --sweep-hidden 7168``
            (about 2 GB per rank). On a CPU host the ratio has a floor well above 1.15x: gloo's transport is
            itself memory copies on the same cores as our passes, and every pass adds CPU time (measured,
            H=1024, 4 ranks on 2 cores, CPU per rank: the plain transfer ~6.5 ms, one row gather over the
            combine payload ~2 ms, the FP32 k-ordered sum ~7 ms; the wall time is their total over 2 cores).
  nodes     ``--world`` ranks declared as 2 nodes: bytes that cross nodes, flat vs hierarchical, for
            DeepSeek-V3-style node-limited routing (each token reaches at most ``--node-limit`` nodes).
  overlap   two micro-batches through a chunk of ``--layers`` blocks (attention stand-in, then MoELayer), one
            after the other vs interleaved (moe_comm.overlap.interleave): hidden = (T_sequential -
            T_interleaved) / (T_sequential - T_compute), where T_compute is the same blocks' compute with no
            communication at all (routing, attention, the experts on a recorded layout): the share of the
            communication time that interleaving removes. "emulated" compute sleeps (the CPU stays free,
            as on a GPU where compute and communication use different units); "real" compute runs GEMMs
            on the same CPU cores that gloo copies with. Goal: hidden >= 80%.

CPU notes: every timing also records ``cores_busy``, the CPU seconds of all ranks (every thread: the
model's, moe_comm's communication thread, gloo's) over the wall time. On a shared CPU the transport, the
permutation passes and the "compute" run on the same cores, so overlap can only hide communication in the
cores that the sequential run leaves idle. The JSON records the machine's load average (on a shared
2-core machine the figures, the overlap most, move with it); the workers set glibc's mmap/trim
thresholds so that freed buffers are reused rather than returned to the OS (else each fresh buffer
page-faults), for every implementation alike.

Every timing: per iteration a barrier, then the op on all ranks; the iteration's time is the slowest
rank's; the median over ``--iters`` iterations is reported (after warm-up). Inputs are random, never zeros.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, reuse_freed_cpu_memory, write_results  # noqa: E402
from moe_comm import DeepSeekV3Router, Dispatcher, MoELayer, Topology, bytes_across_nodes  # noqa: E402
from moe_comm.experts import GroupedExperts  # noqa: E402
from moe_comm.overlap import interleave  # noqa: E402


# --------------------------------------------------------------------------------------------- timing
def _cpu_seconds() -> float:
    """CPU time of this process, all threads (the model's, moe_comm's communication thread, gloo's)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed_busy(fn, iters: int, warmup: int = 3, device: torch.device | None = None) -> tuple[float, float]:
    """(median over iterations of the slowest rank's time in microseconds, CPU cores busy).

    Cores busy = the CPU seconds of all ranks' processes during the timed iterations over their wall time:
    on a CPU host, how much of the machine the operation keeps busy (overlap can only fill idle cores)."""
    for _ in range(warmup):
        fn()
    samples, cpu, wall = [], 0.0, 0.0
    for _ in range(iters):
        dist.barrier()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - t0)
        cpu += _cpu_seconds() - c0
        wall += samples[-1]
    t = torch.tensor(samples, dtype=torch.float64)
    busy = torch.tensor([cpu], dtype=torch.float64)
    if device is not None and device.type == "cuda":
        t, busy = t.to(device), busy.to(device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    dist.all_reduce(busy)
    wall_max = float(t.sum())  # the slowest rank's iterations, back to back
    return statistics.median(t.cpu().tolist()) * 1e6, float(busy) / wall_max


def timed(fn, iters: int, warmup: int = 3, device: torch.device | None = None) -> float:
    """Median over iterations of the slowest rank's time, in microseconds."""
    return timed_busy(fn, iters, warmup, device)[0]


def routing(T: int, E: int, K: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return idx.to(device), (w / w.sum(1, keepdim=True)).to(device)


# ------------------------------------------------------------------------------------- baselines
def plain_all_to_all(send_rows: list[int], recv_rows: list[int], back_send: list[int], back_recv: list[int],
                     row_elems: int, pair_elems: int, dtype, device):  # fmt: skip
    """Two all_to_all_single calls moving exactly our dispatch and combine bytes (splits known)."""
    a = torch.randn(sum(send_rows), row_elems, device=device).to(dtype)
    b = torch.empty(sum(recv_rows), row_elems, device=device, dtype=dtype)
    c = torch.randn(sum(back_send), pair_elems, device=device).to(dtype)
    d = torch.empty(sum(back_recv), pair_elems, device=device, dtype=dtype)

    def run():
        dist.all_to_all_single(b, a, recv_rows, send_rows)
        dist.all_to_all_single(d, c, back_recv, back_send)

    return run


def megatron_style(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, E: int):
    """Megatron-Core's all-to-all token dispatcher, reduced to its data movement (written here)."""
    W = dist.get_world_size()
    epr = E // W
    T, K = idx.shape

    def run() -> torch.Tensor:
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)  # permute: one row per (token, expert), grouped by expert
        per_expert = torch.bincount(flat, minlength=E)
        permuted = x.index_select(0, order // K)
        recv_per_expert = torch.empty_like(per_expert)
        dist.all_to_all_single(recv_per_expert, per_expert)  # (source, local expert) counts
        send = per_expert.view(W, epr).sum(1).tolist()  # host sync
        recv_chunks = recv_per_expert.view(W, epr)
        recv = recv_chunks.sum(1).tolist()
        got = x.new_empty(sum(recv), x.shape[1])
        dist.all_to_all_single(got, permuted, recv, send)
        sizes = recv_chunks.flatten().tolist()  # sort chunks (source, expert) -> (expert, source)
        chunks = list(got.split(sizes))
        by_expert = [chunks[s * epr + e] for e in range(epr) for s in range(W)]
        y = torch.cat(by_expert)  # identity experts
        y_chunks = list(y.split([sizes[s * epr + e] for e in range(epr) for s in range(W)]))
        back = torch.cat([y_chunks[e * W + s] for s in range(W) for e in range(epr)])  # unsort
        ret = x.new_empty(permuted.shape)
        dist.all_to_all_single(ret, back, send, recv)
        out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)  # unpermute, weighted
        out.index_add_(0, order // K, ret.float() * w.flatten()[order][:, None])
        return out.to(x.dtype)

    return run


# ---------------------------------------------------------------------------------------- sections
def section_comm(cfg: dict, device) -> list[dict]:
    W, rank = dist.get_world_size(), dist.get_rank()
    T, H, E, K, dtype, iters = (
        cfg["tokens"],
        cfg["hidden"],
        cfg["experts"],
        cfg["topk"],
        cfg["dtype"],
        cfg["iters"],
    )
    x = torch.randn(T, H, device=device).to(dtype)
    idx, w = routing(T, E, K, seed=rank, device=device)
    group = dist.group.WORLD
    ours = Dispatcher(group, E, timeout=120, combine_by_expert=cfg["combine_by_expert"])
    ours_cap = Dispatcher(group, E, capacity=T, timeout=120)
    ours_red = Dispatcher(group, E, combine="reduced", timeout=120)

    def run_ours(d):
        def run():
            res = d.dispatch(x, idx, w)
            return d.combine(res.x, res.handle)

        return run

    res = ours.dispatch(x, idx, w)
    st = res.handle.stages[0]
    elt = x.element_size()
    splits = (st.send_splits, st.recv_splits, st.rev_send_splits, st.rev_recv_splits)
    plain = plain_all_to_all(*splits, H, H, dtype, device)
    mega = megatron_style(x, idx, w, E)
    t_ours, busy_ours = timed_busy(run_ours(ours), iters, device=device)
    t_cap, busy_cap = timed_busy(run_ours(ours_cap), iters, device=device)
    t_red, busy_red = timed_busy(run_ours(ours_red), iters, device=device)
    t_plain, busy_plain = timed_busy(plain, iters, device=device)
    t_mega, busy_mega = timed_busy(mega, iters, device=device)
    counts = torch.tensor([sum(st.send_splits), st.num_pairs], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    measured = [
        ("plain all_to_all_single (same bytes)", t_plain, busy_plain),
        ("ours (host-sync counts)", t_ours, busy_ours),
        ("ours (capacity, no host sync)", t_cap, busy_cap),
        ("ours (combine='reduced')", t_red, busy_red),
        ("megatron-style (argsort, per-pair rows)", t_mega, busy_mega),
    ]
    rows = [{"impl": n, "us": t, "vs_plain": t / t_plain, "cores_busy": b} for n, t, b in measured]
    for r in rows:
        r.update(section="comm", world=W, tokens=T, hidden=H, experts=E, topk=K, dtype=str(dtype))
        r["ours_vs_this"] = t_ours / r["us"]
    rows[0]["dispatch_rows_total"] = int(counts[0])
    rows[0]["pairs_total"] = int(counts[1])
    rows[0]["dispatch_bytes_per_rank"] = sum(st.send_splits) * H * elt
    return rows


def section_payload(cfg: dict, device) -> list[dict]:
    """Ours (host-sync counts, pairs combine) vs the plain all-to-all of the same bytes, per hidden size.

    What does not scale with the bytes -- the count exchange (one more collective), the index plans
    (sorts and scans of T x K ids), Python and thread hand-offs -- dominates small rows; the memory passes
    (pack, expand to the expert layout, gather the pairs, FP32 weighted sum) scale with them."""
    W, rank = dist.get_world_size(), dist.get_rank()
    T, E, K, dtype = cfg["tokens"], cfg["experts"], cfg["topk"], cfg["dtype"]
    iters = cfg["sweep_iters"]
    idx, w = routing(T, E, K, seed=rank, device=device)
    disp = Dispatcher(dist.group.WORLD, E, timeout=600, combine_by_expert=cfg["combine_by_expert"])
    rows = []
    for H in cfg["sweep_hidden"]:
        x = torch.randn(T, H, device=device).to(dtype)
        handle = disp.dispatch(x, idx, w).handle
        st, by_expert = handle.stages[0], disp.combines_by_expert(handle)
        del handle
        splits = (st.send_splits, st.recv_splits, st.rev_send_splits, st.rev_recv_splits)
        t_plain, busy_plain = timed_busy(plain_all_to_all(*splits, H, H, dtype, device), iters, 1, device)
        gc.collect()  # the plain baseline's buffers go before ours allocate (DeepSeek-sized rows: GBs)

        def run(x=x):
            res = disp.dispatch(x, idx, w)
            return disp.combine(res.x, res.handle)

        t_ours, busy_ours = timed_busy(run, iters, 1, device)
        elt = x.element_size()
        sent = (sum(st.send_splits) + st.num_pairs) * H * elt  # dispatch rows + combine pairs, this rank
        mb = torch.tensor([sent / 1e6], dtype=torch.float64, device=device)
        dist.all_reduce(mb, op=dist.ReduceOp.MAX)
        rows.append({"section": "payload", "world": W, "tokens": T, "hidden": H, "experts": E, "topk": K,
                     "dtype": str(dtype), "mb_per_rank_max": float(mb), "plain_us": t_plain,
                     "ours_us": t_ours, "ours_vs_plain": t_ours / t_plain,
                     "ours_minus_plain_us": t_ours - t_plain, "combine_by_expert": by_expert,
                     "cores_busy_plain": busy_plain, "cores_busy_ours": busy_ours})  # fmt: skip
        del x, st, run
        gc.collect()
    return rows


def section_nodes(cfg: dict, device) -> list[dict]:
    W, rank = dist.get_world_size(), dist.get_rank()
    T, H, E, K = cfg["tokens"], cfg["hidden"], cfg["experts"], cfg["topk"]
    rpn = W // 2
    torch.manual_seed(100 + rank)
    router = DeepSeekV3Router(H, E, K, num_groups=2, topk_groups=min(cfg["node_limit"], 2)).to(device)
    x = torch.randn(T, H, device=device).to(cfg["dtype"])
    with torch.no_grad():
        idx, w = router(x)
    topo = Topology(W, E, rpn)
    b = bytes_across_nodes(idx, topo, rank, H * x.element_size())
    keys = [
        "dispatch_flat",
        "dispatch_hierarchical",
        "combine",
        "combine_reduced_flat",
        "combine_reduced_hierarchical",
    ]
    tot = dict(zip(keys, torch.tensor([b[k] for k in keys], dtype=torch.float64, device=device)))
    for v in tot.values():
        dist.all_reduce(v)
    rows = []
    for hier in (False, True):
        for combine in ("pairs", "reduced"):
            d = Dispatcher(
                dist.group.WORLD, E, ranks_per_node=rpn, hierarchical=hier, combine=combine, timeout=120
            )

            def run(d=d):
                res = d.dispatch(x, idx, w)
                d.combine(res.x, res.handle)

            mode = "hierarchical" if hier else "flat"
            row = {"section": "nodes", "mode": mode, "combine": combine, "world": W, "nodes": 2}
            row["node_limit"] = min(cfg["node_limit"], 2)
            row["dispatch_bytes_across_nodes"] = int(tot[f"dispatch_{mode}"])
            reduced = tot[f"combine_reduced_{mode}"]
            row["combine_bytes_across_nodes"] = int(tot["combine"] if combine == "pairs" else reduced)
            row["us"] = timed(run, cfg["iters"], device=device)
            rows.append(row)
    for r in rows:
        r["bytes_vs_flat_pairs"] = (r["dispatch_bytes_across_nodes"] + r["combine_bytes_across_nodes"]) / (
            rows[0]["dispatch_bytes_across_nodes"] + rows[0]["combine_bytes_across_nodes"])  # fmt: skip
    return rows


class _SleepExperts(torch.nn.Module):
    """Emulated expert compute: returns its input after sleeping (the CPU stays free for gloo)."""

    def __init__(self, num_local_experts: int, seconds: float) -> None:
        super().__init__()
        self.num_local_experts, self.seconds = num_local_experts, seconds

    def forward(self, res):
        if self.seconds:
            time.sleep(self.seconds)
        return res.x


class _Attention(torch.nn.Module):
    """Stand-in for a block's attention: a sleep (emulated) or a low-rank projection pair (real GEMMs)."""

    def __init__(self, hidden: int, seconds: float | None, width: int, device) -> None:
        super().__init__()
        self.seconds = seconds
        self.a = self.b = None
        if seconds is None:
            self.a = torch.randn(hidden, width, device=device) / hidden**0.5
            self.b = torch.randn(width, hidden, device=device) / width**0.5

    def forward(self, x):
        if self.a is None:
            if self.seconds:
                time.sleep(self.seconds)
            return x
        return ((x.float() @ self.a) @ self.b).to(x.dtype)


def stack_steps(blocks, x):
    """A chunk of blocks (attention, then MoE) as one step generator: its MoE points yield Works."""
    for attn, moe in blocks:
        x = x + attn(x)
        x = x + (yield from moe.forward_steps(x))
    return x


class _Recorder(torch.nn.Module):
    """Wraps experts and keeps the last DispatchResult they saw (to replay the compute without comm)."""

    def __init__(self, experts) -> None:
        super().__init__()
        self.experts, self.num_local_experts, self.last = experts, experts.num_local_experts, None

    def forward(self, res):
        self.last = res
        return self.experts(res)


class _ComputeOnly:
    """An MoE block's compute without its communication: routing, then the experts on a recorded layout."""

    def __init__(self, layer: MoELayer, res) -> None:
        self.layer, self.res = layer, res

    def forward_steps(self, x):
        self.layer.router(x)
        self.layer.experts(self.res)
        return x
        yield  # a generator that never communicates


def section_overlap(cfg: dict, device) -> list[dict]:
    from moe_comm.layer import run_steps

    W, rank = dist.get_world_size(), dist.get_rank()
    T, H, E, K, dtype = (cfg[k] for k in ("tokens", "hidden", "experts", "topk", "dtype"))
    L, ms, iters = cfg["layers"], cfg["emulated_ms"] * 1e-3, cfg["overlap_iters"]
    torch.manual_seed(200 + rank)
    disp = Dispatcher(dist.group.WORLD, E, timeout=120)
    routers = [DeepSeekV3Router(H, E, K).to(device) for _ in range(L)]
    xa, xb = (torch.randn(T, H, device=device).to(dtype) for _ in range(2))

    def blocks(kind: str):
        out = []
        for r in routers:
            if kind == "comm only":
                attn, experts = _Attention(H, 0.0, 0, device), _SleepExperts(disp.num_local_experts, 0.0)
            elif kind == "emulated":
                attn, experts = _Attention(H, ms, 0, device), _SleepExperts(disp.num_local_experts, ms)
            else:
                attn = _Attention(H, None, cfg["attn_width"], device)
                experts = GroupedExperts(disp.num_local_experts, H, cfg["inter"], device=device)
            out.append((attn, MoELayer(r, _Recorder(experts), disp)))
        return out

    def sequential(bl):
        return lambda: (run_steps(stack_steps(bl, xa)), run_steps(stack_steps(bl, xb)))

    rows = []
    with torch.no_grad():
        t_comm = timed(sequential(blocks("comm only")), iters, device=device)
        for kind in ("emulated", "real"):
            bl = blocks(kind)
            run_steps(stack_steps(bl, xa))  # record one layout per block for the compute-only baseline
            compute_only = [(attn, _ComputeOnly(moe, moe.experts.last)) for attn, moe in bl]
            t_comp, busy_comp = timed_busy(sequential(compute_only), iters, device=device)
            t_seq, busy_seq = timed_busy(sequential(bl), iters, device=device)
            t_ovl, busy_ovl = timed_busy(
                lambda bl=bl: interleave(stack_steps(bl, xa), stack_steps(bl, xb)), iters, device=device
            )
            exposed_seq = t_seq - t_comp
            rows.append({"section": "overlap", "compute": kind, "world": W, "layers": L, "tokens": T,
                         "t_compute_us": t_comp, "t_sequential_us": t_seq, "t_interleaved_us": t_ovl,
                         "t_comm_alone_us": t_comm,
                         "hidden_fraction": (t_seq - t_ovl) / exposed_seq,
                         "cores_busy_compute": busy_comp, "cores_busy_sequential": busy_seq,
                         "cores_busy_interleaved": busy_ovl})  # fmt: skip
    return rows


def _bench_rank(rank: int, world_size: int, cfg: dict, sections: list[str]) -> list[dict]:
    torch.set_num_threads(1)
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cfg["cuda"] else torch.device("cpu")
    )
    if cfg["cuda"]:
        torch.cuda.set_device(device)
    else:
        reuse_freed_cpu_memory()
    rows: list[dict] = []
    for s in sections:
        fn = {
            "comm": section_comm,
            "payload": section_payload,
            "nodes": section_nodes,
            "overlap": section_overlap,
        }
        rows += fn[s](cfg, device)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4, help="ranks for comm/overlap (local gloo processes)")
    p.add_argument("--node-world", type=int, default=8, help="ranks for the 2-node section")
    p.add_argument(
        "--tokens", type=int, default=1024, help="tokens per rank (per micro-batch pair in overlap)"
    )
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=32, help="expert FFN width (real experts in overlap)")
    p.add_argument("--attn-width", type=int, default=128, help="rank of the real attention stand-in")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--node-limit", type=int, default=1, help="nodes per token in the node section (of 2)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=15)
    p.add_argument(
        "--emulated-ms", type=float, default=40.0, help="emulated attention / experts time per block"
    )
    p.add_argument(
        "--layers", type=int, default=8, help="blocks (attention + MoE) per micro-batch in overlap"
    )
    p.add_argument("--overlap-iters", type=int, default=9, help="timed iterations per overlap figure")
    p.add_argument(
        "--sweep-hidden", default="128,512,2048,7168", help="hidden sizes of the payload section (comma list)"
    )
    p.add_argument("--sweep-iters", type=int, default=7, help="timed iterations per payload-section row")
    p.add_argument("--sections", default="comm,payload,nodes,overlap")
    p.add_argument(
        "--combine-by-expert",
        default="auto",
        choices=["auto", "on", "off"],
        help="Dispatcher(combine_by_expert=...) of ours (host-sync) in comm and payload",
    )
    p.add_argument("--out", default=None, help="JSON path (default bench/results/ on GPU; required on CPU)")
    args = p.parse_args()
    keys = (
        "tokens",
        "hidden",
        "inter",
        "attn_width",
        "experts",
        "topk",
        "node_limit",
        "iters",
        "emulated_ms",
    )
    keys += ("layers", "overlap_iters", "sweep_iters")
    cfg = {k: getattr(args, k) for k in keys}
    cfg["sweep_hidden"] = [int(h) for h in args.sweep_hidden.split(",")]
    cfg["combine_by_expert"] = {"auto": None, "on": True, "off": False}[args.combine_by_expert]
    cfg["dtype"] = getattr(torch, args.dtype)
    sections = args.sections.split(",")
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cfg["cuda"] = under_torchrun and torch.cuda.is_available()
    if under_torchrun:
        dist.init_process_group("nccl" if cfg["cuda"] else "gloo")
        rows = _bench_rank(dist.get_rank(), dist.get_world_size(), cfg, sections)
        if dist.get_rank() != 0:
            return
    else:
        from tests.distributed import run_ranks

        rows = []
        main_sections = [s for s in sections if s != "nodes"]
        if main_sections:
            rows += run_ranks(_bench_rank, args.world, args=(cfg, main_sections), timeout=1200)[0]
        if "nodes" in sections:
            rows += run_ranks(_bench_rank, args.node_world, args=(cfg, ["nodes"]), timeout=1200)[0]
    for sec in sections:
        part = [r for r in rows if r["section"] == sec]
        print(f"\n== {sec}")
        print_table(part, [c for c in part[0] if c not in ("section",)] if part else None)
    summary = {}
    comm = {r["impl"]: r for r in rows if r["section"] == "comm"}
    if comm:
        summary["ours_vs_plain_all_to_all"] = comm["ours (host-sync counts)"]["vs_plain"]
        summary["ours_capacity_vs_plain_all_to_all"] = comm["ours (capacity, no host sync)"]["vs_plain"]
        summary["megatron_style_vs_ours"] = comm["megatron-style (argsort, per-pair rows)"]["us"] / comm[
            "ours (host-sync counts)"]["us"]  # fmt: skip
    for r in rows:
        if r["section"] == "nodes" and r["mode"] == "hierarchical":
            summary[f"hierarchical_{r['combine']}_bytes_across_nodes_vs_flat_pairs"] = r[
                "bytes_vs_flat_pairs"
            ]
        if r["section"] == "overlap":
            summary[f"hidden_fraction_{r['compute']}"] = r["hidden_fraction"]
        if r["section"] == "payload":
            summary[f"ours_vs_plain_hidden_{r['hidden']}"] = r["ours_vs_plain"]
    # Shared CPU machines: timings (the overlap most) depend on what else runs; keep the load with them.
    summary["load_average_1min_start"] = load_start
    summary["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("\nsummary:", {k: round(v, 3) for k, v in summary.items()})
    if args.out is None and not cfg["cuda"]:
        print("(CPU run: pass --out PATH to write the JSON; bench/results/ is for GPU results)")
        return
    path = write_results("bench_moe_comm", rows, summary=summary, args=vars(args), out=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
