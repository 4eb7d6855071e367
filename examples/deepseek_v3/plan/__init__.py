"""The 2,048-GPU DeepSeek-V3 training cost from first principles, and what-ifs around it.

    python -m examples.deepseek_v3.plan                   # V3 on 2,048 H800: table vs published, JSON, PNG
    python -m examples.deepseek_v3.plan --what-if         # schedules, precision, EP, GPUs, nodes per token
    python -m examples.deepseek_v3.plan.calibrate --trace train.json   # kernel efficiencies from a profile

    from examples.deepseek_v3.plan import plan, v3_run
    result = plan(v3_run())                               # result.metrics["step_s"], ["total_gpu_hours"]

Modules, one cost concept each: ``model`` (parameters, FLOPs, the blocks of a micro-batch), ``rates``
(kernel-class efficiencies), ``hardware`` (GPU and cluster presets), ``chunks`` (F, B, W and communication
time per block, stage partition), ``pipeline`` (the schedule priced by dualpipe.simulate), ``memory``
(memory per GPU, optimizer step), ``run`` (a step and a whole run), ``cli`` (the report and what-ifs),
``calibrate`` (efficiencies from a profiler trace).
"""

from examples.deepseek_v3.plan.cli import main, what_if
from examples.deepseek_v3.plan.run import (
    PUBLISHED,
    V3_CONTEXT_EXTENSION,
    ParallelConfig,
    PlanResult,
    RunConfig,
    TrainingPhase,
    plan,
    plan_step,
    v3_run,
)

__all__ = [
    "PUBLISHED",
    "V3_CONTEXT_EXTENSION",
    "ParallelConfig",
    "PlanResult",
    "RunConfig",
    "TrainingPhase",
    "main",
    "plan",
    "plan_step",
    "v3_run",
    "what_if",
]
