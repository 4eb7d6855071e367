"""Bidirectional pipeline parallelism (DualPipe, DualPipeV) with 1F1B / zero-bubble baselines.

Schedules are data (per-rank action lists, ``dualpipe.schedules``); one runtime (``dualpipe.runtime``,
driven by the pipelines of ``dualpipe.pipeline``) executes any schedule over torch.distributed P2P and
one simulator (``dualpipe.simulate``) prices any schedule. ``dualpipe.overlap`` is the hook that lets a
module mark communication points so one micro-batch's communication runs under another's compute;
``dualpipe.weight_split`` holds the zero-bubble weight-gradient policies.
"""

from dualpipe.overlap import (
    CommPoint,
    Completed,
    OverlapFn,
    PendingComm,
    interleave,
    pieces,
    run_pieces,
    sequential,
)
from dualpipe.p2p import PeerError
from dualpipe.pipeline import DualPipe, DualPipeV, Pipeline, Pipeline1F1B, PipelineZB1P, gather_timeline
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
from dualpipe.simulate import Costs, DeadlockError, SimResult, StageCosts, simulate
from dualpipe.trace import Event, plot_timelines, write_chrome_trace
from dualpipe.tuning import EarlySendTuner
from dualpipe.weight_split import defer_weight_work, enable_linear_fast_path

__all__ = [
    "CommPoint",
    "Completed",
    "DualPipe",
    "DualPipeV",
    "EarlySendTuner",
    "OverlapFn",
    "PeerError",
    "PendingComm",
    "Pipeline",
    "Pipeline1F1B",
    "PipelineZB1P",
    "defer_weight_work",
    "enable_linear_fast_path",
    "gather_timeline",
    "interleave",
    "pieces",
    "run_pieces",
    "sequential",
    "Action",
    "Costs",
    "StageCosts",
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
