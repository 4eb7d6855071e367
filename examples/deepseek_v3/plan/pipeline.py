"""Thin adapter from per-stage chunk costs to dualpipe's schedule simulator (the only pipeline simulator).

    sim = simulate_pipeline("dualpipe", stage_costs, num_microbatches=120, p2p=P2P(10e-6, 32.8e9, 58.7e6))
    sim.result.step_time, sim.phases[0]      # dualpipe.simulate.SimResult; seconds per phase on rank 0

Stages held by each rank (dualpipe.schedules): 1F1B and ZB1P put model stage r on rank r; DualPipe puts
model stages r and pp-1-r on rank r; DualPipeV splits the model into 2 pp stages and puts r and 2pp-1-r on
rank r. The step is priced per stage (``dualpipe.simulate.StageCosts``): every chunk runs at its own
stage's F, B and W, and an F&B at the cost of its (forward stage, backward stage) pair. ``rank_costs``
keeps the older per-rank view (a rank holding two stages gets the mean of their F, B and W, and for F&B
the mean over its two pairings): exact for each rank's totals, not for the order the chunks alternate in.

Phases of a rank (DeepSeek's step table): ``F`` forward chunks run alone, ``B`` backward chunks run alone
(full or input-only), ``W`` weight-gradient chunks, ``F&B`` overlapped pairs, ``bubble`` idle time
(step time - busy).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from dualpipe.schedules import build
from dualpipe.simulate import Costs, SimResult, StageCosts, simulate
from examples.deepseek_v3.plan.chunks import ChunkCost, fb_time

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
OVERLAPPED = ("dualpipe", "dualpipev")  # schedules with F&B pairs: their stages are balanced on F&B time
_PHASE = {"F": "F", "B": "B", "BW": "B", "W": "W", "FB": "F&B"}


@dataclass(frozen=True)
class P2P:
    """Pipeline send/receive: fixed latency (s), achieved bandwidth (bytes/s), bytes per micro-batch."""

    latency_s: float
    bandwidth: float
    activation_bytes: float


@dataclass
class PipelineSim:
    schedule: str
    result: SimResult
    rank_stages: list[tuple[int, ...]]  # model stages held by each rank
    phases: list[dict[str, float]]  # per rank: seconds in F, B, W, F&B, bubble
    counts: list[dict[str, int]]  # per rank: number of chunks in F, B, W, F&B


def normalise_schedule(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SCHEDULES:
        raise ValueError(f"schedule {name!r} is not one of {SCHEDULES}")
    return key


def num_model_stages(schedule: str, pp: int) -> int:
    """How many stages the model is cut into: 2 pp for DualPipeV, else pp."""
    return 2 * pp if normalise_schedule(schedule) == "dualpipev" else pp


def rank_stages(schedule: str, pp: int) -> list[tuple[int, ...]]:
    s = normalise_schedule(schedule)
    if s in ("1f1b", "zb1p"):
        return [(r,) for r in range(pp)]
    if s == "dualpipe":
        return [(r, pp - 1 - r) for r in range(pp)]
    return [(r, 2 * pp - 1 - r) for r in range(pp)]


def rank_costs(schedule: str, stages: Sequence[ChunkCost], pp: int, p2p: P2P | None = None) -> list[Costs]:
    """``dualpipe.simulate.Costs`` for each rank (module docstring)."""
    s = normalise_schedule(schedule)
    need = num_model_stages(s, pp)
    if len(stages) != need:
        raise ValueError(f"{s} on pp={pp} needs {need} stage costs, got {len(stages)}")
    out = []
    for held in rank_stages(s, pp):
        cs = [stages[i] for i in held]
        f = sum(c.f for c in cs) / len(cs)
        b = sum(c.b for c in cs) / len(cs)
        w = sum(c.w for c in cs) / len(cs)
        fb = None
        if s in OVERLAPPED:
            pairs = [(x, y) for x in cs for y in cs if x is not y] or [(cs[0], cs[0])]
            fb = sum(fb_time(x, y) for x, y in pairs) / len(pairs)
        kw = {}
        if p2p is not None:
            kw = dict(
                p2p_latency=p2p.latency_s, p2p_bandwidth=p2p.bandwidth, activation_bytes=p2p.activation_bytes
            )
        out.append(Costs(f=f, b=b, w=min(w, b), fb=fb, **kw))
    return out


def pipeline_stage_costs(
    schedule: str, stages: Sequence[ChunkCost], pp: int, p2p: P2P | None = None
) -> StageCosts:
    """``dualpipe.simulate.StageCosts``: one ``Costs`` per model stage, F&B priced per stage pair."""
    s = normalise_schedule(schedule)
    need = num_model_stages(s, pp)
    if len(stages) != need:
        raise ValueError(f"{s} on pp={pp} needs {need} stage costs, got {len(stages)}")
    kw = {}
    if p2p is not None:
        kw = dict(
            p2p_latency=p2p.latency_s, p2p_bandwidth=p2p.bandwidth, activation_bytes=p2p.activation_bytes
        )
    costs = [Costs(f=c.f, b=c.b, w=min(c.w, c.b), **kw) for c in stages]
    fb = {}
    if s in OVERLAPPED:
        for held in rank_stages(s, pp):
            for x in held:
                for y in held:
                    fb[(x, y)] = fb_time(stages[x], stages[y])
    return StageCosts(costs, fb)


def simulate_pipeline(
    schedule: str, stages: Sequence[ChunkCost], *, pp: int, num_microbatches: int, p2p: P2P | None = None
) -> PipelineSim:
    """Build ``schedule`` with dualpipe.schedules and price it with dualpipe.simulate."""
    s = normalise_schedule(schedule)
    sched = build(s, pp, num_microbatches)
    result = simulate(sched, pipeline_stage_costs(s, stages, pp, p2p), check=False)
    phases = [defaultdict(float) for _ in range(pp)]
    counts = [defaultdict(int) for _ in range(pp)]
    for e in result.timeline:
        name = _PHASE.get(e.op)
        if name is None:
            continue
        phases[e.rank][name] += e.end - e.start
        counts[e.rank][name] += 1
    for r in range(pp):
        phases[r]["bubble"] = result.bubble[r]
    return PipelineSim(
        schedule=s,
        result=result,
        rank_stages=rank_stages(s, pp),
        phases=[dict(p) for p in phases],
        counts=[dict(c) for c in counts],
    )
