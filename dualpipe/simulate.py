"""Price any schedule: ``simulate(schedule, costs) -> SimResult``.

Model. Every rank runs its action list in order, one compute action at a time. A compute action starts
when the rank is free and its inputs are there: a forward needs the previous stage's activation, a
backward the next stage's gradient (local stages hand over in place). Sends are asynchronous (they never
wait for compute) and a transfer starts once the data is sent *and* the receive is posted; it then takes
``p2p_latency + activation_bytes / p2p_bandwidth`` (transfers do not queue behind each other on a link:
pipeline traffic is far below link bandwidth). All ranks start at t = 0.

Costs are seconds per action (per rank if a sequence is given, per model stage with ``StageCosts``:
a DualPipe or DualPipeV rank holds two different stages), in the notation of the DeepSeek-V3
report: ``f`` forward of one chunk, ``b`` its *full* backward (inputs and weights), ``w`` the weight part
of ``b`` (so a split input-only backward costs ``b - w``), ``fb`` a forward and a full backward of two
chunks run overlapped (default ``f + b``: no overlap gain).

Results (``SimResult``): the timeline, the step time, per-rank busy time and bubble (step time - busy),
peak in-flight activations per rank in units of one stage's activations for one micro-batch (counted
from the start of F to the end of its input backward, the convention of DeepSeek-V3's Table 2; the
count held until W is also reported), and parameter copies (stage modules per rank).

DeepSeek-V3's Table 2 (bubble 1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W), DualPipe and DualPipeV
(PP/2-1)(F&B+B-3W); activations PP, PP, PP+1, PP+1) comes out exactly as the largest per-rank bubble
when the input backward costs as much as the forward (``b - w == f``), ``w <= f`` and
``f + w <= fb <= f + b``: the regime those formulas are derived for (tests/dualpipe/test_schedules.py).
Outside it the simulator is the reference and the formulas are approximations.

    from dualpipe.schedules import build_dualpipe
    from dualpipe.simulate import Costs, simulate
    r = simulate(build_dualpipe(16, 40), Costs(f=1.13, b=1.99, w=0.48, fb=2.9))
    r.step_time, max(r.bubble), max(r.peak_activations)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dualpipe.schedules import Action, Op, Schedule, ScheduleError
from dualpipe.trace import Event, plot_timelines, write_chrome_trace
from dualpipe.validate import message_key


class DeadlockError(ScheduleError):
    """No rank can make progress although some still have work: names each blocked rank's next action."""


@dataclass(frozen=True)
class Costs:
    """Seconds per action on one rank (see the module docstring for the notation)."""

    f: float
    b: float
    w: float = 0.0
    fb: float | None = None
    p2p_latency: float = 0.0
    p2p_bandwidth: float = math.inf
    activation_bytes: float = 0.0

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "p2p_latency", "activation_bytes"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"Costs.{name}={v!r} must be finite and >= 0")
        if self.w > self.b:
            raise ValueError(
                f"Costs.w={self.w} must be <= b={self.b} (w is the weight part of the full backward)"
            )
        if self.fb is not None and not (self.fb >= 0 and math.isfinite(self.fb)):
            raise ValueError(f"Costs.fb={self.fb!r} must be finite and >= 0")
        if not self.p2p_bandwidth > 0:
            raise ValueError(f"Costs.p2p_bandwidth={self.p2p_bandwidth!r} must be > 0 (bytes per second)")

    @property
    def overlapped(self) -> float:
        return self.f + self.b if self.fb is None else self.fb

    @property
    def transfer(self) -> float:
        return self.p2p_latency + self.activation_bytes / self.p2p_bandwidth

    def duration(self, op: Op) -> float:
        return {Op.F: self.f, Op.B: self.b - self.w, Op.W: self.w, Op.BW: self.b, Op.FB: self.overlapped}[op]


@dataclass(frozen=True)
class StageCosts:
    """Costs per model stage, for ranks that hold two different stages (DualPipe, DualPipeV).

    ``stages[m]`` prices every action of model stage ``m`` (its ``f``, ``b``, ``w``; its transfers are
    the sending stage's ``p2p_latency``/``p2p_bandwidth``/``activation_bytes``). An F&B of forward stage
    ``m`` and backward stage ``n`` takes ``fb[(m, n)]`` when given, else ``f_m + b_n`` less the mean of
    the two stages' overlap gains (``f + b - fb`` of each; 0 where ``fb`` is unset), which is each
    stage's own ``fb`` when ``m == n``.
    """

    stages: Sequence[Costs]
    fb: Mapping[tuple[int, int], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.stages or not all(isinstance(c, Costs) for c in self.stages):
            raise ValueError(f"StageCosts.stages must be a non-empty sequence of Costs, got {self.stages!r}")
        for key, v in self.fb.items():
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"StageCosts.fb[{key}]={v!r} must be finite and >= 0")

    def pair(self, m: int, n: int) -> float:
        """Seconds of an F&B of forward model stage ``m`` and backward model stage ``n``."""
        if (m, n) in self.fb:
            return self.fb[(m, n)]
        a, b = self.stages[m], self.stages[n]
        gain = (a.f + a.b - a.overlapped + b.f + b.b - b.overlapped) / 2
        return max(a.f + b.b - gain, 0.0)


@dataclass
class SimResult:
    schedule: str
    num_ranks: int
    num_microbatches: int
    timeline: list[Event]
    transfers: list[Event]
    step_time: float
    busy: list[float]
    bubble: list[float]
    peak_activations: list[int]
    peak_activations_until_w: list[int]
    param_copies: int
    model_copies: int
    extra: dict = field(default_factory=dict)

    @property
    def bubble_fraction(self) -> float:
        """Largest per-rank bubble as a fraction of the step time."""
        return max(self.bubble) / self.step_time if self.step_time > 0 else 0.0

    def write_chrome_trace(self, path: str | Path) -> Path:
        return write_chrome_trace(self.timeline + self.transfers, path, name=f"{self.schedule} (simulated)")

    def plot(self, path: str | Path, measured: Sequence[Event] | None = None) -> Path:
        panels = {f"{self.schedule} simulated": self.timeline}
        if measured is not None:
            panels[f"{self.schedule} measured"] = list(measured)
        title = (
            f"{self.schedule}: {self.num_ranks} ranks, {self.num_microbatches} micro-batches, "
            f"step {self.step_time:.4g} s, bubble {self.bubble_fraction:.1%}"
        )
        return plot_timelines(panels, path, title=title)


def _per_rank(costs: Costs | Sequence[Costs], n: int) -> list[Costs]:
    if isinstance(costs, Costs):
        return [costs] * n
    costs = list(costs)
    if len(costs) != n or not all(isinstance(c, Costs) for c in costs):
        raise ValueError(
            f"costs must be one Costs or a sequence of {n} Costs (one per rank), got {len(costs)}"
        )
    return costs


def _pricing(s: Schedule, costs: Costs | Sequence[Costs] | StageCosts):
    """(duration(rank, action), forward-half duration(rank, action), transfer(sender rank, stage))."""
    if isinstance(costs, StageCosts):
        sc = costs
        if len(sc.stages) != s.num_model_stages:
            raise ValueError(
                f"StageCosts has {len(sc.stages)} stages but {s.name} has {s.num_model_stages} model stages"
            )
        for m, n in sc.fb:
            if not (0 <= m < s.num_model_stages and 0 <= n < s.num_model_stages):
                raise ValueError(f"StageCosts.fb key {(m, n)} out of range [0, {s.num_model_stages})")
        model = s.stage_model

        def duration(r: int, a: Action) -> float:
            c = sc.stages[model[a.stage]]
            if a.op is Op.FB:
                return sc.pair(model[a.stage], model[a.stage2])
            return c.duration(a.op)

        def fwd_half(r: int, a: Action) -> float:
            return min(sc.stages[model[a.stage]].f, duration(r, a))

        def transfer(src: int, stage: int) -> float:
            return sc.stages[model[stage]].transfer

        return duration, fwd_half, transfer
    per_rank = _per_rank(costs, s.num_ranks)
    return (
        lambda r, a: per_rank[r].duration(a.op),
        lambda r, a: min(per_rank[r].f, per_rank[r].overlapped),
        lambda src, stage: per_rank[src].transfer,
    )


def simulate(
    schedule: Schedule,
    costs: Costs | Sequence[Costs] | StageCosts,
    *,
    check: bool = True,
    fb_halves: bool = False,
) -> SimResult:
    """Run ``schedule`` on the cost model; raise ``DeadlockError`` if it cannot finish.

    ``costs``: one ``Costs`` for every rank, one per rank, or ``StageCosts`` (one per model stage, and
    per (forward stage, backward stage) F&B pair).

    ``check``: validate the schedule first (``validate_schedule``, which itself simulates with unit
    costs; pass ``check=False`` for schedules already validated). ``fb_halves``: price an F&B action as
    the runtime runs it with early sends (``dualpipe.coalesce.early_sends``, the pipelines' default):
    the forward half first, its activation leaving ``f`` after the start instead of at the end, and
    the backward half waiting for its gradient only when it starts. Off by default: the plain model,
    an F&B needs both inputs at its start and sends at its end (DeepSeek-V3's bubble formulas hold).
    """
    if check:
        from dualpipe.schedules import validate_schedule

        validate_schedule(schedule)
    s = schedule
    duration, fwd_half, transfer = _pricing(s, costs)
    n = s.num_ranks
    pos = [0] * n
    clock = [0.0] * n
    busy = [0.0] * n
    live = [0] * n
    live_w = [0] * n
    peak = [0] * n
    peak_w = [0] * n
    sent: dict[tuple, tuple[float, int]] = {}
    posted: dict[tuple, float] = {}
    arrival: dict[tuple, float] = {}
    finished: dict[tuple[str, int, int], float] = {}  # ('F'|'B', stage, mb) -> end time
    timeline: list[Event] = []
    transfers: list[Event] = []
    early: frozenset = frozenset()
    if fb_halves:
        from dualpipe.coalesce import early_sends

        early = early_sends(s)
    fwd_half_end: dict[tuple, float] = {}  # early message key -> when its F&B's forward half ended

    def deliver(key: tuple) -> None:
        if key in sent and key in posted and key not in arrival:
            t_send, src = sent[key]
            t0 = max(t_send, posted[key])
            sender = s.prev_stage(key[1]) if key[0] == "F" else s.next_stage(key[1])
            arrival[key] = t0 + transfer(src, sender)
            op = "SEND_F" if key[0] == "F" else "SEND_B"
            transfers.append(Event(src, op, key[1], key[2], t0, arrival[key]))

    def ready_time(rank: int, kind: str, st: int, mb: int) -> float | None:
        """When the input of F/B part (st, mb) is available on ``rank``; None if not yet known."""
        other = s.prev_stage(st) if kind == "F" else s.next_stage(st)
        if other is None:
            return 0.0
        if s.stage_rank[other] == rank:
            return finished.get((kind, other, mb))
        return arrival.get((kind, st, mb))

    progressed = True
    while progressed:
        progressed = False
        for r in range(n):
            acts = s.actions[r]
            while pos[r] < len(acts):
                a = acts[pos[r]]
                if a.op in (Op.SEND_F, Op.SEND_B):
                    key = message_key(a, s)
                    sent[key] = (fwd_half_end.pop(key, clock[r]), r)
                    deliver(key)
                elif a.op in (Op.RECV_F, Op.RECV_B):
                    key = message_key(a, s)
                    posted[key] = clock[r]
                    deliver(key)
                else:
                    needs = []
                    if a.op in (Op.F, Op.FB):
                        needs.append(("F", a.stage, a.mb))
                    if a.op in (Op.B, Op.BW):
                        needs.append(("B", a.stage, a.mb))
                    if a.op is Op.FB:
                        needs.append(("B", a.stage2, a.mb2))
                    times = [ready_time(r, *nd) for nd in needs]
                    if any(t is None for t in times):
                        break
                    d = duration(r, a)
                    if a.op is Op.FB and fb_halves:  # the backward half's gradient is awaited after f
                        start = max(clock[r], times[0])
                        half = fwd_half(r, a)
                        end = max(start + half, times[1]) + d - half
                        start = end - d  # drawn (and counted busy) without the wait inside
                    else:
                        start = max([clock[r], *times])
                        end = start + d
                    _account(a, live, live_w, peak, peak_w, r)
                    for kind, st, mb in needs:
                        finished[(kind, st, mb)] = end
                    if a.op is Op.FB and early:
                        nxt = s.next_stage(a.stage)
                        if nxt is not None and ("F", nxt, a.mb) in early:
                            # sent when the forward half ended (before any wait for the gradient)
                            fwd_half_end[("F", nxt, a.mb)] = max(clock[r], times[0]) + fwd_half(r, a)
                    clock[r] = end
                    busy[r] += end - start
                    timeline.append(Event(r, a.op.value, a.stage, a.mb, start, end, a.stage2, a.mb2))
                pos[r] += 1
                progressed = True
    stuck = [r for r in range(n) if pos[r] < len(s.actions[r])]
    if stuck:
        lines = [f"rank {r} waits at #{pos[r]} {s.actions[r][pos[r]]}" for r in stuck]
        raise DeadlockError(f"{s.name} (pp={n}, m={s.num_microbatches}) deadlocks:\n  " + "\n  ".join(lines))
    step = max(clock) if n else 0.0
    per_rank_stages = [len(s.local_stages(r)) for r in range(n)]
    return SimResult(
        schedule=s.name,
        num_ranks=n,
        num_microbatches=s.num_microbatches,
        timeline=timeline,
        transfers=transfers,
        step_time=step,
        busy=busy,
        bubble=[step - b for b in busy],
        peak_activations=peak,
        peak_activations_until_w=peak_w,
        param_copies=max(per_rank_stages, default=0),
        model_copies=s.num_stages // max(1, s.num_model_stages),
    )


def _account(a: Action, live: list, live_w: list, peak: list, peak_w: list, r: int) -> None:
    """In-flight activation counts in program order: F adds one at its start; the input backward frees
    it at its end (``live``); ``live_w`` keeps it until the weight gradient is done."""
    if a.op in (Op.F, Op.FB):
        live[r] += 1
        live_w[r] += 1
        peak[r] = max(peak[r], live[r])
        peak_w[r] = max(peak_w[r], live_w[r])
    if a.op in (Op.B, Op.BW, Op.FB):
        live[r] -= 1
    if a.op in (Op.W, Op.BW, Op.FB):
        live_w[r] -= 1
