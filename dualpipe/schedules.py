"""Pipeline schedules as data: one ``Action`` type, one builder per schedule family, one validator.

A schedule is, per rank, an ordered list of actions. The runtime (``dualpipe.runtime``) executes exactly
these lists and the simulator (``dualpipe.simulate``) prices exactly these lists, so what is simulated
is what runs.

Stages and chains. A *stage* is one module copy placed on one rank. A micro-batch flows through a
*chain* of stages (forward: left to right; backward: right to left). ``stage_model`` maps a stage to the
model stage whose parameters it holds (DualPipe keeps two copies of every model stage).

    schedule         stages (S)   placement (rank of stage s)         chains                 copies
    1F1B, ZB1P       PP           s                                   [0 .. PP-1]            1
    DualPipeV        2 PP         s if s < PP else 2 PP - 1 - s (V)   [0 .. 2PP-1]           1
    DualPipe         2 PP         s if s < PP else 2 PP - 1 - s       [0 .. PP-1] (first     2
                                  (stage PP + j is model stage j)     half of micro-batches),
                                                                      [PP .. 2PP-1] (second)

On every rank with two stages, local module 0 is stage ``rank`` and local module 1 is stage
``2 PP - 1 - rank``; for DualPipe that is (model stage ``rank``, model stage ``PP - 1 - rank``), the same
module pair DeepSeek's DualPipe takes.

Ops (``Op``): ``F`` forward; ``B`` backward for the stage inputs only (its weight gradient is deferred to
a later ``W``); ``W`` weight gradient; ``BW`` full backward (counts as B and W); ``FB`` forward of one
micro-batch overlapped with the full backward of another (``stage2``/``mb2``); ``SEND_F``/``RECV_F``
activations and ``SEND_B``/``RECV_B`` gradients. A message action names the stage that *computes* with
it on its own rank: ``SEND_F(s)`` carries F(s)'s output to stage s+1, ``RECV_F(s)`` is F(s)'s input,
``SEND_B(s)`` carries B(s)'s input gradient to stage s-1 and ``RECV_B(s)`` is B(s)'s output gradient.
Receives are placed ``recv_lookahead`` compute actions before their consumer (posted early); sends
directly after their producer (never queued behind compute).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, replace


class Op(str, enum.Enum):
    F = "F"
    B = "B"
    W = "W"
    BW = "BW"
    FB = "FB"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_compute(self) -> bool:
        return self in _COMPUTE

    @property
    def is_comm(self) -> bool:
        return not self.is_compute

    def __str__(self) -> str:
        return self.value


_COMPUTE = frozenset({Op.F, Op.B, Op.W, Op.BW, Op.FB})


@dataclass(frozen=True, slots=True)
class Action:
    """One step of one rank: ``op`` on (``stage``, micro-batch ``mb``); ``FB`` adds the backward half
    (``stage2``, ``mb2``); message ops name the other rank in ``peer`` (a rank of the pipeline group)."""

    op: Op
    stage: int
    mb: int
    peer: int = -1
    stage2: int = -1
    mb2: int = -1

    def __str__(self) -> str:
        if self.op is Op.FB:
            return f"FB(F{self.stage}.{self.mb},B{self.stage2}.{self.mb2})"
        if self.op.is_comm:
            return f"{self.op.value}{self.stage}.{self.mb}@{self.peer}"
        return f"{self.op.value}{self.stage}.{self.mb}"

    __repr__ = __str__


class ScheduleError(ValueError):
    """A schedule that cannot run: missing or duplicated work, unmatched messages, or a deadlock."""


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists plus the stage layout they refer to (see the module docstring)."""

    name: str
    num_ranks: int
    num_microbatches: int
    stage_rank: tuple[int, ...]
    stage_model: tuple[int, ...]
    chains: tuple[tuple[int, ...], ...]
    mb_chain: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]
    _prev: dict[int, int] = field(init=False, repr=False, compare=False)
    _next: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prev, nxt = {}, {}
        for chain in self.chains:
            for a, b in zip(chain[:-1], chain[1:]):
                nxt[a], prev[b] = b, a
        object.__setattr__(self, "_prev", prev)
        object.__setattr__(self, "_next", nxt)

    @property
    def num_stages(self) -> int:
        return len(self.stage_rank)

    @property
    def num_model_stages(self) -> int:
        return len(set(self.stage_model))

    def prev_stage(self, s: int) -> int | None:
        return self._prev.get(s)

    def next_stage(self, s: int) -> int | None:
        return self._next.get(s)

    def local_stages(self, rank: int) -> tuple[int, ...]:
        """Stages held by ``rank``, in local-module order (local 0 first)."""
        return tuple(sorted((s for s, r in enumerate(self.stage_rank) if r == rank), key=self._local_key))

    def _local_key(self, s: int) -> int:
        # local 0 is the stage a rank meets first on the way down: stage `rank` (see module docstring)
        return 0 if s < self.num_ranks else 1

    def is_first(self, s: int) -> bool:
        return self.prev_stage(s) is None

    def is_last(self, s: int) -> bool:
        return self.next_stage(s) is None

    def microbatches_of_chain(self, chain: int) -> tuple[int, ...]:
        return tuple(m for m, c in enumerate(self.mb_chain) if c == chain)

    def compute_actions(self, rank: int) -> tuple[Action, ...]:
        return tuple(a for a in self.actions[rank] if a.op.is_compute)

    def pretty(self) -> str:
        """One line per rank with the compute actions (a readable picture of the schedule)."""
        return "\n".join(
            f"rank {r}: " + " ".join(str(a) for a in self.compute_actions(r)) for r in range(self.num_ranks)
        )


# --------------------------------------------------------------------------------------------------------
# Layouts


def _check_counts(name: str, pp: int, num_microbatches: int, *, min_mb: int, even_pp: bool = False) -> None:
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"{name}: pp={pp!r} must be a positive int")
    if even_pp and pp % 2:
        raise ValueError(f"{name}: pp={pp} must be even (DualPipe pairs rank r with rank pp-1-r)")
    if not isinstance(num_microbatches, int) or num_microbatches < min_mb:
        raise ValueError(
            f"{name}: num_microbatches={num_microbatches!r} must be an int >= {min_mb} (pp={pp})"
        )


def _layout_linear(pp: int, m: int) -> dict:
    return dict(
        stage_rank=tuple(range(pp)),
        stage_model=tuple(range(pp)),
        chains=(tuple(range(pp)),),
        mb_chain=(0,) * m,
    )


def _v_rank(s: int, pp: int) -> int:
    return s if s < pp else 2 * pp - 1 - s


def _layout_v(pp: int, m: int) -> dict:
    return dict(
        stage_rank=tuple(_v_rank(s, pp) for s in range(2 * pp)),
        stage_model=tuple(range(2 * pp)),
        chains=(tuple(range(2 * pp)),),
        mb_chain=(0,) * m,
    )


def _layout_dual(pp: int, m: int) -> dict:
    return dict(
        stage_rank=tuple(_v_rank(s, pp) for s in range(2 * pp)),
        stage_model=tuple(s % pp for s in range(2 * pp)),
        chains=(tuple(range(pp)), tuple(range(pp, 2 * pp))),
        mb_chain=tuple(0 if i < m // 2 else 1 for i in range(m)),
    )


# --------------------------------------------------------------------------------------------------------
# Compute orders (one list of compute actions per rank); communication is added by `_with_comm`.


class _Counters:
    """Per-rank bookkeeping while a builder emits compute actions: next micro-batch per (phase, op) and
    the FIFO of backward passes whose weight gradient is still owed."""

    def __init__(self, phase_stage: tuple[int, ...], phase_mbs: tuple[tuple[int, ...], ...]):
        self.stage = phase_stage
        self.mbs = phase_mbs
        self.nf = [0] * len(phase_stage)
        self.nb = [0] * len(phase_stage)
        self.owed_w: list[tuple[int, int]] = []
        self.out: list[Action] = []

    def _take(self, counts: list[int], phase: int) -> tuple[int, int]:
        mb = self.mbs[phase][counts[phase]]
        counts[phase] += 1
        return self.stage[phase], mb

    def f(self, phase: int) -> None:
        s, m = self._take(self.nf, phase)
        self.out.append(Action(Op.F, s, m))

    def b(self, phase: int, split: bool) -> None:
        s, m = self._take(self.nb, phase)
        if split:
            self.out.append(Action(Op.B, s, m))
            self.owed_w.append((s, m))
        else:
            self.out.append(Action(Op.BW, s, m))

    def w(self) -> None:
        s, m = self.owed_w.pop(0)
        self.out.append(Action(Op.W, s, m))

    def fb(self, f_phase: int, b_phase: int) -> None:
        s, m = self._take(self.nf, f_phase)
        s2, m2 = self._take(self.nb, b_phase)
        self.out.append(Action(Op.FB, s, m, stage2=s2, mb2=m2))


def _order_1f1b(pp: int, m: int, rank: int, zero_bubble: bool) -> list[Action]:
    """1F1B: warm up with (pp-1-rank) forwards, then alternate F and B, then drain the backwards.

    ZB1P (zero-bubble H1, Qi et al. 2023) keeps that order but splits every backward into B and W, and
    rank r keeps r W's owed through the steady state: later ranks run their forwards and input backwards
    earlier, so activations reach the last stage and gradients come back sooner, and the owed W's fill
    the cool-down gaps. Rank r holds at most pp - r micro-batches until their W, so peak memory stays
    that of 1F1B (pp on rank 0).
    """
    c = _Counters((rank,), (tuple(range(m)),))
    warmup = min(pp - 1 - rank, m)
    keep_owed = rank if zero_bubble else 0
    for _ in range(warmup):
        c.f(0)
    for _ in range(m - warmup):
        c.f(0)
        c.b(0, split=zero_bubble)
        if len(c.owed_w) > keep_owed:
            c.w()
    for _ in range(warmup):
        c.b(0, split=zero_bubble)
        if c.owed_w:
            c.w()
    while c.owed_w:
        c.w()
    return c.out


def _order_dual(
    n: int, h: int, c_per_phase: int, phase_stage: tuple[int, int], phase_mbs, turn_rank: bool
) -> list[Action]:
    """The eight phases of DeepSeek's DualPipe figure for one rank.

    ``n`` ranks in a half (DualPipe: pp/2; DualPipeV: pp), ``h`` this rank's position in its half,
    ``c_per_phase`` micro-batches per phase. Phase 0 is the direction whose entry is nearer to this rank
    (it starts first), phase 1 the other one. ``turn_rank``: the rank where the two directions meet
    (DualPipe: the two middle ranks; DualPipeV: the last rank, where the V turns).
    """
    c = _Counters(phase_stage, phase_mbs)
    # 1. warm up the near direction: nF0
    for _ in range(2 * (n - h - 1)):
        c.f(0)
    # 2. both directions start: nF0F1
    for _ in range(h + 1):
        c.f(0)
        c.f(1)
    # 3. first backwards of the far direction with zero-bubble W: nB1W1F1
    for _ in range(n - h - 1):
        c.b(1, split=True)
        c.w()
        c.f(1)
    # 4. main step, overlapped pairs: nF0B1F1B0
    for i in range(c_per_phase - 2 * n + h + 1):
        if i == 0 and turn_rank:
            # The turning rank runs its first pair back to back (not overlapped) so that F0's output
            # leaves as early as possible: the other direction is waiting for it.
            c.f(0)
            c.b(1, split=False)
        else:
            c.fb(0, 1)
        c.fb(1, 0)
    # 5. the near direction has no forward left: nB1F1B0
    for _ in range(n - h - 1):
        c.b(1, split=False)
        c.fb(1, 0)
    # 6. drain the backwards; the second half of them defer W: nB1B0
    split = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        c.b(1, split=split)
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        c.b(0, split=split)
    # 7. fill the gaps with owed W's: nWB0
    for _ in range(n - h - 1):
        c.w()
        c.b(0, split=True)
    # 8. the remaining W's: nW
    while c.owed_w:
        c.w()
    return c.out


# --------------------------------------------------------------------------------------------------------
# Communication


def _with_comm(
    layout: dict, orders: list[list[Action]], recv_lookahead: int
) -> tuple[tuple[Action, ...], ...]:
    """Insert SEND_* right after each producer and RECV_* ``recv_lookahead`` computes before each consumer."""
    stage_rank = layout["stage_rank"]
    prev, nxt = {}, {}
    for chain in layout["chains"]:
        for a, b in zip(chain[:-1], chain[1:]):
            nxt[a], prev[b] = b, a

    def remote(s: int | None, rank: int) -> int | None:
        return None if s is None or stage_rank[s] == rank else stage_rank[s]

    out = []
    for rank, order in enumerate(orders):
        before: list[list[Action]] = [[] for _ in order]
        after: list[list[Action]] = [[] for _ in order]
        f_pos: dict[tuple[int, int], int] = {}
        for i, a in enumerate(order):
            parts = []
            if a.op in (Op.F, Op.FB):
                parts.append(("F", a.stage, a.mb))
            if a.op in (Op.B, Op.BW):
                parts.append(("B", a.stage, a.mb))
            if a.op is Op.FB:
                parts.append(("B", a.stage2, a.mb2))
            for kind, s, m in parts:
                if kind == "F":
                    f_pos[(s, m)] = i
                    src, dst = remote(prev.get(s), rank), remote(nxt.get(s), rank)
                    if src is not None:
                        before[max(0, i - recv_lookahead)].append(Action(Op.RECV_F, s, m, peer=src))
                    if dst is not None:
                        after[i].append(Action(Op.SEND_F, s, m, peer=dst))
                else:
                    src, dst = remote(nxt.get(s), rank), remote(prev.get(s), rank)
                    if src is not None:
                        # a gradient receive needs the forward's output shapes: never before F(s, m)
                        j = max(i - recv_lookahead, f_pos.get((s, m), -1) + 1)
                        (before[j] if j <= i else after[i]).append(Action(Op.RECV_B, s, m, peer=src))
                    if dst is not None:
                        after[i].append(Action(Op.SEND_B, s, m, peer=dst))
        seq: list[Action] = []
        for i, a in enumerate(order):
            seq += before[i]
            seq.append(a)
            seq += after[i]
        out.append(tuple(seq))
    return tuple(out)


def _assemble(name: str, layout: dict, orders, m: int, recv_lookahead: int, validate: bool) -> Schedule:
    sched = Schedule(
        name=name,
        num_ranks=len(orders),
        num_microbatches=m,
        actions=_with_comm(layout, orders, recv_lookahead),
        **layout,
    )
    if validate:
        validate_schedule(sched)
    return sched


# --------------------------------------------------------------------------------------------------------
# Builders


def build_1f1b(pp: int, num_microbatches: int, *, recv_lookahead: int = 1, validate: bool = True) -> Schedule:
    """1F1B (PipeDream-flush) on ``pp`` ranks, one stage each, full backwards (BW)."""
    _check_counts("1F1B", pp, num_microbatches, min_mb=1)
    orders = [_order_1f1b(pp, num_microbatches, r, zero_bubble=False) for r in range(pp)]
    layout = _layout_linear(pp, num_microbatches)
    return _assemble("1F1B", layout, orders, num_microbatches, recv_lookahead, validate)


def build_zb1p(pp: int, num_microbatches: int, *, recv_lookahead: int = 1, validate: bool = True) -> Schedule:
    """ZB1P (zero-bubble H1): 1F1B order and memory, backwards split into B and deferred W."""
    _check_counts("ZB1P", pp, num_microbatches, min_mb=1)
    orders = [_order_1f1b(pp, num_microbatches, r, zero_bubble=True) for r in range(pp)]
    layout = _layout_linear(pp, num_microbatches)
    return _assemble("ZB1P", layout, orders, num_microbatches, recv_lookahead, validate)


def build_dualpipe(
    pp: int, num_microbatches: int, *, recv_lookahead: int = 1, validate: bool = True
) -> Schedule:
    """DualPipe on ``pp`` ranks (even): micro-batches [0, m/2) enter at rank 0, [m/2, m) at rank pp-1.

    Needs ``num_microbatches`` even and >= 2 * pp (each direction fills its pipeline once).
    """
    _check_counts("DualPipe", pp, num_microbatches, min_mb=2 * pp, even_pp=True)
    if num_microbatches % 2:
        raise ValueError(f"DualPipe: num_microbatches={num_microbatches} must be even (half per direction)")
    layout = _layout_dual(pp, num_microbatches)
    n, half = pp // 2, num_microbatches // 2
    down, up = tuple(range(half)), tuple(range(half, num_microbatches))
    orders = []
    for r in range(pp):
        h = min(r, pp - 1 - r)
        down_stage, up_stage = r, 2 * pp - 1 - r
        if r < n:  # the down direction enters nearer to this rank
            phases, mbs = (down_stage, up_stage), (down, up)
        else:
            phases, mbs = (up_stage, down_stage), (up, down)
        orders.append(_order_dual(n, h, half, phases, mbs, turn_rank=(h == n - 1)))
    return _assemble("DualPipe", layout, orders, num_microbatches, recv_lookahead, validate)


def build_dualpipev(
    pp: int, num_microbatches: int, *, recv_lookahead: int = 1, validate: bool = True
) -> Schedule:
    """DualPipeV ("cut-in-half" DualPipe) on ``pp`` ranks and 2 * pp stages placed as a V.

    Needs ``num_microbatches`` >= 2 * pp.
    """
    _check_counts("DualPipeV", pp, num_microbatches, min_mb=2 * pp)
    layout = _layout_v(pp, num_microbatches)
    mbs = tuple(range(num_microbatches))
    orders = [
        _order_dual(pp, r, num_microbatches, (r, 2 * pp - 1 - r), (mbs, mbs), turn_rank=(r == pp - 1))
        for r in range(pp)
    ]
    return _assemble("DualPipeV", layout, orders, num_microbatches, recv_lookahead, validate)


BUILDERS: dict[str, Callable[..., Schedule]] = {
    "1f1b": build_1f1b,
    "zb1p": build_zb1p,
    "dualpipe": build_dualpipe,
    "dualpipev": build_dualpipev,
}


def build(name: str, pp: int, num_microbatches: int, **kw) -> Schedule:
    """Build a schedule by name: one of ``BUILDERS`` (case-insensitive)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in BUILDERS:
        raise ValueError(f"schedule name={name!r} is not one of {sorted(BUILDERS)}")
    return BUILDERS[key](pp, num_microbatches, **kw)


def forward_only(schedule: Schedule) -> Schedule:
    """The same schedule without backward work (for ``torch.no_grad()`` steps): FB becomes F."""
    acts = []
    for rank_actions in schedule.actions:
        keep = []
        for a in rank_actions:
            if a.op in (Op.F, Op.SEND_F, Op.RECV_F):
                keep.append(a)
            elif a.op is Op.FB:
                keep.append(Action(Op.F, a.stage, a.mb))
        acts.append(tuple(keep))
    return replace(schedule, name=schedule.name + "/forward", actions=tuple(acts))


# Validation lives in dualpipe/validate.py (re-exported here; it needs the types above).
from dualpipe.validate import message_key, validate_schedule  # noqa: E402

__all__ = [
    "Action",
    "BUILDERS",
    "Op",
    "Schedule",
    "ScheduleError",
    "build",
    "build_1f1b",
    "build_dualpipe",
    "build_dualpipev",
    "build_zb1p",
    "forward_only",
    "message_key",
    "validate_schedule",
]
