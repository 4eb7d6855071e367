"""Bidirectional pipeline parallelism (DualPipe, DualPipeV) with 1F1B / zero-bubble baselines.

Schedules are data (per-rank action lists); one runtime executes any schedule over torch.distributed
P2P (gloo or NCCL, unchanged) and one simulator prices any schedule.
"""
