"""How much communication the compute hides, computed from per-rank torch.profiler Chrome traces.

    python -m examples.deepseek_v3.overlap_report outputs/<date>/<time>/trace_rank*.json

Per rank, from the trace's complete ("X") events:
- communication: the intervals when a collective or P2P transfer actually runs. torch.profiler records
  gloo's work on gloo's own threads as ``gloo:<op>`` spans and NCCL kernels on the GPU streams
  (``nccl...``); both are taken, on whatever thread or stream they run.
- compute: the ATen operators on the threads that run the model (CPU), and the non-NCCL GPU kernels.
  On the CPU the model's threads are the ones that carry the F / B / W spans; the communication library's
  own threads are never counted as compute.
- hidden fraction = |communication intersected with compute| / |communication| (interval unions, so
  concurrent transfers are not double counted); exposed = the rest: time when the rank only waits.
  Given overall and per kind: expert all-to-all (dispatch/combine; DeepSeek-V3's "96% hidden" is this
  one), pipeline P2P and other collectives. A P2P receive posted early is in flight while its sender
  still computes, so the P2P figure measures the schedule as much as the link.
It also totals the time inside each named span the pipeline and the MoE layers mark: F, B, W, F&B
(overlapped forward and backward of two micro-batches), dispatch, combine; and the measured bubble:
the part of the trainer's ``pipeline_step`` spans (one step's forward/backward work) during which the
rank runs none of F, B, W, F&B.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

COMM_RE = re.compile(r"^(gloo:|nccl:)|nccl|ncclDevKernel|ncclKernel", re.IGNORECASE)
SPANS = ("F", "B", "W", "F&B", "dispatch", "combine")
COMM_KINDS = ("a2a", "p2p", "allreduce")
KIND_NAMES = {
    "a2a": "expert all-to-all (dispatch/combine)",
    "p2p": "pipeline P2P",
    "allreduce": "other collectives (DP gradients, ...)",
}
STEP_SPAN = "pipeline_step"  # the trainer's span around one step's forward/backward work
_SPAN_RE = re.compile(r"^(F&B|F|B|W|dispatch|combine)(\.backward)?$")
_NOT_COMPUTE = re.compile(r"^(c10d::|aten::to$|aten::_to_copy$|aten::item$|aten::_local_scalar_dense$)")


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        elif e > s:
            out.append((s, e))
    return out


def _length(iv: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in iv)


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def span_kind(name: str) -> str | None:
    """The span a record_function name stands for: F, B, W, F&B (dualpipe's ``dualpipe.<action>`` spans:
    ``FB(...)`` is F&B, a full backward ``BW`` counts as B), dispatch or combine; None for others."""
    if name.startswith("dualpipe."):
        act = name[len("dualpipe.") :]
        for prefix, kind in (("FB(", "F&B"), ("BW", "B"), ("F", "F"), ("B", "B"), ("W", "W")):
            if act.startswith(prefix) and (
                prefix.endswith("(") or len(act) == len(prefix) or not act[len(prefix)].isalpha()
            ):
                return kind
        return None
    m = _SPAN_RE.match(name)
    return m.group(1) if m else None


def comm_kind(name: str) -> str | None:
    """a2a (expert dispatch/combine), p2p (pipeline sends/receives), allreduce (collectives), or None."""
    if not COMM_RE.search(name):
        return None
    low = name.lower()
    if "all_to_all" in low or "alltoall" in low:
        return "a2a"
    if low.endswith(("send", "recv", "recv_", "sendrecv")) or "sendrecv" in low:
        return "p2p"
    return "allreduce"


def rank_overlap(events: list[dict]) -> dict:
    """Overlap figures of one rank from its trace's events (dicts with name, ph, ts, dur, tid, cat)."""
    xs = [e for e in events if e.get("ph") == "X" and "dur" in e]
    comm: dict[str, list] = defaultdict(list)
    spans, busy, steps = defaultdict(float), [], []
    model_tids = set()
    for e in xs:
        name = str(e.get("name", ""))
        iv = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        ck = comm_kind(name)
        if ck:
            comm[ck].append(iv)
        kind = span_kind(name) if e.get("cat") in ("user_annotation", "gpu_user_annotation") else None
        if kind:
            spans[kind] += iv[1] - iv[0]
            if kind in ("F", "B", "W", "F&B"):
                busy.append(iv)
            if e.get("cat") == "user_annotation":
                model_tids.add(e.get("tid"))
        elif name == STEP_SPAN and e.get("cat") == "user_annotation":
            steps.append(iv)
    compute = []
    for e in xs:
        name = str(e.get("name", ""))
        if COMM_RE.search(name) or _NOT_COMPUTE.match(name):
            continue
        iv = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        if e.get("cat") == "kernel":
            compute.append(iv)
        elif (
            e.get("cat") == "cpu_op"
            and name.startswith("aten::")
            and (not model_tids or e.get("tid") in model_tids)
        ):
            compute.append(iv)
    comp_u = _union(compute)
    all_comm = _union([iv for ivs in comm.values() for iv in ivs])
    per_kind = {}
    for k in COMM_KINDS:
        u = _union(comm.get(k, []))
        if u:
            per_kind[k] = {"comm_ms": _length(u) / 1e3, "hidden_ms": _length(_intersect(u, comp_u)) / 1e3}
    comm_t = _length(all_comm)
    hidden_t = _length(_intersect(all_comm, comp_u))
    t0 = min((iv[0] for iv in all_comm + comp_u), default=0.0)
    t1 = max((iv[1] for iv in all_comm + comp_u), default=0.0)
    return {
        "window_ms": (t1 - t0) / 1e3,
        "compute_ms": _length(comp_u) / 1e3,
        "comm_ms": comm_t / 1e3,
        "hidden_ms": hidden_t / 1e3,
        "exposed_ms": (comm_t - hidden_t) / 1e3,
        "hidden_fraction": hidden_t / comm_t if comm_t > 0 else None,
        "by_kind": per_kind,
        "step_ms": _length(_union(steps)) / 1e3,
        "busy_ms": _length(_union(busy)) / 1e3,
        "spans_ms": {k: spans[k] / 1e3 for k in SPANS if k in spans},
    }


def overlap_report(traces: list[str | Path]) -> dict:
    """{"ranks": {rank: figures}, "hidden_fraction": overall (comm-time weighted)} from trace files."""
    ranks = {}
    for path in traces:
        m = re.search(r"rank(\d+)", Path(path).name)
        r = int(m.group(1)) if m else len(ranks)
        ranks[r] = rank_overlap(json.loads(Path(path).read_text())["traceEvents"])
    return {"ranks": dict(sorted(ranks.items())), **aggregate(list(ranks.values()))}


def aggregate(per_rank: list[dict]) -> dict:
    """Job-wide figures: hidden fraction weighted by communication time, bubble by step time."""
    comm = sum(v["comm_ms"] for v in per_rank)
    hidden = sum(v["hidden_ms"] for v in per_rank)
    step = sum(v["step_ms"] for v in per_rank)
    busy = sum(v["busy_ms"] for v in per_rank)
    by_kind = {}
    for k in COMM_KINDS:
        c = sum(v.get("by_kind", {}).get(k, {}).get("comm_ms", 0.0) for v in per_rank)
        h = sum(v.get("by_kind", {}).get(k, {}).get("hidden_ms", 0.0) for v in per_rank)
        if c > 0:
            by_kind[k] = {"comm_ms": c, "hidden_fraction": h / c}
    return {
        "comm_ms": comm,
        "hidden_fraction": hidden / comm if comm else None,
        "by_kind": by_kind,
        "bubble_fraction": max(0.0, 1 - busy / step) if step else None,
    }


def format_report(rep: dict) -> str:
    lines = [
        "overlap report (from the profiled steps' traces)",
        f"{'rank':>4} {'window ms':>10} {'compute ms':>10} {'comm ms':>8} {'hidden':>7}  spans ms",
    ]
    for r, v in rep["ranks"].items():
        hf = "n/a" if v["hidden_fraction"] is None else f"{100 * v['hidden_fraction']:.0f}%"
        spans = " ".join(f"{k}={t:.1f}" for k, t in v["spans_ms"].items())
        lines.append(
            f"{r:>4} {v['window_ms']:>10.1f} {v['compute_ms']:>10.1f} {v['comm_ms']:>8.1f} {hf:>7}  {spans}"
        )
    hf, bub = rep["hidden_fraction"], rep.get("bubble_fraction")
    if bub is not None:
        lines.append(f"measured bubble (no F/B/W inside the step's pipeline work): {100 * bub:.1f}%")
    lines.append(
        f"communication hidden behind compute: {'n/a' if hf is None else f'{100 * hf:.1f}%'} "
        f"of {rep['comm_ms']:.1f} ms"
    )
    for k, v in rep.get("by_kind", {}).items():
        lines.append(f"  {KIND_NAMES[k]}: {100 * v['hidden_fraction']:.1f}% of {v['comm_ms']:.1f} ms hidden")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="+", help="trace_rank<r>.json files")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()
    rep = overlap_report(args.traces)
    print(format_report(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
