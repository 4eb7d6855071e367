"""Checkpoints with torch.distributed.checkpoint (DCP): layout-free names, written, then marked complete.

    state = training_state(stages, optimizer)                 # {global name: tensor view}, shared storage
    save_checkpoint(root, step, state, meta={"loss": 3.1})    # collective over the default group
    found = latest_checkpoint(root)                           # (path, meta) of the newest COMPLETE one
    load_checkpoint(found[0], state)                          # in place into the model and optimizer

Names are the whole model's parameter names whatever the layout: pipeline stages keep their global names
(``layers.<i>...``) and stacked routed-expert weights are saved one expert at a time
(``layers.<i>.ffn.experts.<global expert id>.w1``), so a checkpoint written under one PP x DP x EP layout
loads under another. Replicas (the dense weights on every data-parallel rank, DualPipe's mirrored copies)
share names and DCP writes them once.

Protocol: every rank writes its shard with ``dcp.save`` into ``step_<step>/``; when that returns on all
ranks (a barrier), rank 0 writes ``COMPLETE`` (a JSON file, written to a temporary name and renamed, so it
exists whole or not at all). ``latest_checkpoint`` only ever returns a directory holding that marker: a run
killed while writing leaves a directory without it, which is ignored (and removed by the next save).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

MARKER = "COMPLETE"


def _expert_offsets(module: nn.Module) -> dict[str, int]:
    """{qualified name of a stacked-expert module: global id of its first expert}."""
    out = {}
    for name, m in module.named_modules():
        off = getattr(m, "expert_offset", None)
        if off is not None:
            out[name] = off
    return out


def _split(offsets: dict[str, int], name: str, t: torch.Tensor, suffix: str = "") -> dict[str, torch.Tensor]:
    """{global name: view}: a stacked expert tensor (E_local, ...) becomes one view per global expert id."""
    owner, _, leaf = name.rpartition(".")
    if owner in offsets and t.dim() >= 1:
        return {f"{owner}.{offsets[owner] + j}.{leaf}{suffix}": t[j] for j in range(t.shape[0])}
    return {f"{name}{suffix}": t}


def training_state(stages: list[nn.Module], optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Model parameters, persistent buffers and AdamW moments of this rank's stages, by global name.

    The optimizer state is created here if it does not exist yet (zeros, step 0: what AdamW's first step
    would create), so a fresh run can load into it.
    """
    state: dict[str, Any] = {}
    for stage in stages:
        offsets = _expert_offsets(stage)
        tensors = {n: p.data for n, p in stage.named_parameters()}
        tensors.update({n: b for n, b in stage.named_buffers() if _is_persistent(stage, n)})
        for n, t in tensors.items():
            state.update({f"model.{k}": v for k, v in _split(offsets, n, t).items()})
        if optimizer is None:
            continue
        for name, p in stage.named_parameters():
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state[f"optim.{name}.step"] = st["step"]
            for moment in ("exp_avg", "exp_avg_sq"):
                state.update(
                    {f"optim.{k}": v for k, v in _split(offsets, name, st[moment], "." + moment).items()}
                )
    return state


def _is_persistent(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    m = module.get_submodule(owner) if owner else module
    return leaf not in m._non_persistent_buffers_set


def checkpoint_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def latest_checkpoint(root: str | Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint under ``root`` and its marker's metadata, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    for path in sorted(root.glob("step_*"), reverse=True):
        if is_complete(path):
            return path, json.loads((path / MARKER).read_text())
    return None


def save_checkpoint(
    root: str | Path,
    step: int,
    state: dict[str, Any],
    meta: dict | None = None,
    keep: int = 2,
    storage_writer: dcp.StorageWriter | None = None,
) -> Path:
    """Write ``state`` as checkpoint ``step`` under ``root``, then mark it complete; keep the newest ``keep``.

    Collective over the default process group when one exists (every rank calls it).
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    path = checkpoint_path(root, step)
    if rank == 0:
        if path.exists():  # a leftover of a killed save, or an older run's: never mix files
            shutil.rmtree(path)
        path.mkdir(parents=True)
    if distributed:
        dist.barrier()
    dcp.save(state, checkpoint_id=path, storage_writer=storage_writer)
    if distributed:
        dist.barrier()  # every rank's files are on disk before the marker exists
    if rank == 0:
        tmp = path / f".{MARKER}.tmp"
        with open(tmp, "w") as f:
            json.dump({"step": step, **(meta or {})}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / MARKER)
        _prune(Path(root), keep)
    if distributed:
        dist.barrier()
    return path


def _prune(root: Path, keep: int) -> None:
    """Remove incomplete directories and all but the newest ``keep`` complete checkpoints."""
    complete = [p for p in sorted(root.glob("step_*")) if is_complete(p)]
    for p in sorted(root.glob("step_*")):
        if not is_complete(p) or p in complete[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path, state: dict[str, Any]) -> dict:
    """Load a complete checkpoint in place into ``state``; returns its metadata. Refuses incomplete ones."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint {str(path)!r} has no {MARKER} marker: it was never finished")
    dcp.load(state, checkpoint_id=path)
    return json.loads((path / MARKER).read_text())
