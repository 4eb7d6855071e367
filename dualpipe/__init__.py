"""Bidirectional pipeline parallelism (DualPipe, DualPipeV) with 1F1B / zero-bubble baselines.

Schedules are data (per-rank action lists, ``dualpipe.schedules``); one runtime executes any schedule
over torch.distributed P2P (gloo or NCCL, unchanged) and one simulator (``dualpipe.simulate``) prices
any schedule.
"""

from dualpipe.schedules import (
    Action,
    Op,
    Schedule,
    ScheduleError,
    build,
    build_1f1b,
    build_dualpipe,
    build_dualpipev,
    build_zb1p,
    forward_only,
    validate_schedule,
)
from dualpipe.simulate import Costs, DeadlockError, SimResult, simulate
from dualpipe.trace import Event, plot_timelines, write_chrome_trace

__all__ = [
    "Action",
    "Costs",
    "DeadlockError",
    "Event",
    "Op",
    "Schedule",
    "ScheduleError",
    "SimResult",
    "build",
    "build_1f1b",
    "build_dualpipe",
    "build_dualpipev",
    "build_zb1p",
    "forward_only",
    "plot_timelines",
    "simulate",
    "validate_schedule",
    "write_chrome_trace",
]
