"""Timelines: one ``Event`` per executed action, written as Chrome-trace JSON or drawn as a PNG.

The simulator and the runtime both produce ``list[Event]`` with times in seconds from the start of the
step, so a real run can be drawn beside its simulation:

    sim = simulate(schedule, costs)
    plot_timelines({"simulated": sim.timeline, "measured": pipe.timeline}, "step.png")
    write_chrome_trace(sim.timeline, "step.json")      # open in chrome://tracing or ui.perfetto.dev
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Event:
    """One action on one rank: ``op`` is an ``Op`` value ('F', 'B', 'W', 'BW', 'FB', 'SEND_F', ...);
    ``stage2``/``mb2`` are the backward half of an 'FB'. Times in seconds from the step start."""

    rank: int
    op: str
    stage: int
    mb: int
    start: float
    end: float
    stage2: int = -1
    mb2: int = -1

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def label(self) -> str:
        if self.op == "FB":
            return f"F{self.mb}|B{self.mb2}"
        return f"{self.op}{self.mb}"


# Colours per op; the Chrome names are the trace viewer's reserved colour names.
_COLOURS = {"F": "#4e79a7", "B": "#59a14f", "W": "#edc948", "BW": "#2f7d32", "FB": "#b07aa1"}
_CHROME = {"F": "thread_state_running", "B": "good", "W": "yellow", "BW": "good", "FB": "rail_animation"}


def events_to_dicts(events: Sequence[Event]) -> list[dict]:
    return [asdict(e) for e in events]


def events_from_dicts(rows: Sequence[Mapping]) -> list[Event]:
    return [Event(**dict(r)) for r in rows]


def write_chrome_trace(events: Sequence[Event], path: str | Path, *, name: str = "pipeline") -> Path:
    """Write ``events`` as Chrome-trace JSON (one thread per rank, complete events in microseconds)."""
    trace = [
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": name}},
        *(
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}}
            for r in sorted({e.rank for e in events})
        ),
    ]
    for e in events:
        item = {
            "name": e.label,
            "cat": e.op,
            "ph": "X",
            "pid": 0,
            "tid": e.rank,
            "ts": e.start * 1e6,
            "dur": max(e.duration, 0.0) * 1e6,
            "args": {"op": e.op, "stage": e.stage, "mb": e.mb, "stage2": e.stage2, "mb2": e.mb2},
        }
        if e.op in _CHROME:
            item["cname"] = _CHROME[e.op]
        trace.append(item)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": trace, "displayTimeUnit": "ms"}))
    return path


def plot_timelines(
    timelines: Mapping[str, Sequence[Event]],
    path: str | Path,
    *,
    title: str | None = None,
    max_labels: int = 400,
) -> Path:
    """Draw one panel per timeline (e.g. simulated and measured), one row per rank, compute only.

    Bars are labelled (``F3``, ``F3|B1``...) when a panel has at most ``max_labels`` bars wide enough.

    matplotlib is imported lazily (it is a dev/examples extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_timelines needs matplotlib: pip install matplotlib") from e

    panels = list(timelines.items())
    ranks = max((e.rank for _, evs in panels for e in evs), default=0) + 1
    horizon = max((e.end for _, evs in panels for e in evs), default=1.0)
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(14, 0.45 * ranks * len(panels) + 1.2), squeeze=False, sharex=True
    )
    for ax, (name, evs) in zip(axes[:, 0], panels):
        # one broken_barh per (rank, op): a few collections instead of one artist per bar
        bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for e in evs:
            if e.op in _COLOURS:
                bars.setdefault((e.rank, e.op), []).append((e.start, e.duration))
        for (rank, op), xs in bars.items():
            ax.broken_barh(xs, (rank - 0.4, 0.8), color=_COLOURS[op], ec="black", lw=0.3)
        # labels only while they stay readable (a text artist per bar dominates the drawing time)
        shown = [e for e in evs if e.op in _COLOURS and e.duration > horizon / 120]
        if len(shown) <= max_labels:
            for e in shown:
                ax.text(e.start + e.duration / 2, e.rank, e.label, ha="center", va="center", fontsize=5)
        ax.set_yticks(range(ranks))
        ax.set_yticklabels([f"rank {r}" for r in range(ranks)], fontsize=7)
        ax.set_ylim(ranks - 0.5, -0.5)
        ax.set_title(name, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("seconds from step start")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLOURS.values()]
    fig.legend(handles, list(_COLOURS), loc="upper right", ncol=len(_COLOURS), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
