"""Combine by local expert: the expert outputs go back with one all-to-all per local expert, straight
from the contiguous layout, instead of being gathered into one per-peer send buffer first.

The layout holds local expert e's rows at ``[m_offsets[e], m_offsets[e] + counts[e])`` ordered by
(source rank s, token t, k): the rows for each source are already contiguous inside each expert, so
all-to-all number e can send them as they are (``send_splits[s]`` = rows of source s in expert e). The
source receives collective e's rows peer by peer into region e of one buffer; within the region of
(expert e of peer p) its pairs arrive in its own (t, k) order. So pair (t, k) with global expert
g = p * E_local + e lands at its rank in the stable sort of the source's pairs by (e, p): an index
plan built at the source from its own routing, no metadata travels.

Trade. The per-peer layout of one all-to-all needs a gather of every pair row (one memory pass over the
whole combine payload, on the cores the transport copies with); E_local collectives cost a fixed
launch each instead (measured on gloo, 4 ranks on 2 cores: 16 collectives cost +15 ms of CPU per rank on
a 470 MB combine whose gather costs 60 ms; 4 collectives cost +1.3 ms on a 8 MB combine whose gather
costs ~2 ms). Hence the dispatcher's default: by expert when a row is >= 8 KiB, or when there is one
local expert (then nothing is traded). Flat topology, contiguous layout, exact counts only. Every rank
takes the same decision: it depends only on values in the call signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_comm.row_ops import stable_argsort
from moe_comm.stages import padded_rows

__all__ = ["AUTO_MIN_ROW_BYTES", "ExpertChunkPlan", "build_plan", "chunks_to_source"]

AUTO_MIN_ROW_BYTES = 8192


@dataclass
class ExpertChunkPlan:
    """send_splits[e][s]: rows of source s in local expert e (expert side); recv_splits[e][p]: this rank's
    pairs with expert p * E_local + e (source side); region[e]: first row of collective e's receive
    region; index (T, K): row of each pair in the receive buffer (P = the zero row for unused slots)."""

    send_splits: list[list[int]]
    recv_splits: list[list[int]]
    region: list[int]
    index: torch.Tensor
    num_pairs: int


def build_plan(handle, world_size: int) -> ExpertChunkPlan:
    """The plan for a flat dispatch's handle (one DynamicStage, a ContiguousLayout)."""
    layout, (stage,) = handle.layout, handle.stages
    W, El = world_size, handle.dispatcher.num_local_experts
    dev = handle.topk_idx.device
    # Expert side: source of each received row (rows arrive source-major), then pairs per (expert, source).
    src_of_row = torch.repeat_interleave(
        torch.arange(W, device=dev), torch.tensor(stage.recv_splits, device=dev)
    )
    src = src_of_row.index_select(0, layout.pair_row)
    send = torch.bincount(layout.pair_local * W + src, minlength=El * W).view(El, W)
    # Source side: this rank's pairs, (t, k) row-major, keyed by (local expert e, peer p).
    idx = handle.topk_idx
    valid = (idx >= 0).view(-1)
    g = idx.reshape(-1)[valid]
    key = (g % El) * W + g // El
    P = key.numel()
    pos = torch.empty_like(key)
    pos[stable_argsort(key)] = torch.arange(P, device=dev)
    index = torch.full((idx.numel(),), P, dtype=torch.long, device=dev)
    index[valid] = pos
    recv = torch.bincount(key, minlength=El * W).view(El, W)
    region = [0] + recv.sum(1).cumsum(0).tolist()
    return ExpertChunkPlan(send.tolist(), recv.tolist(), region, index.view(idx.shape), P)


def chunks_to_source(comm, y: torch.Tensor, handle, plan: ExpertChunkPlan, what: str):
    """Generator (driven by comm.Chain): layout rows (num_rows, H) at the experts -> at the source,
    (received rows + a zero row, (T, K) index into them), like ``Dispatcher._pairs_to_source``."""
    y = y.contiguous()
    layout = handle.layout
    offsets = layout.m_offsets_list  # host-side: no device read
    full = padded_rows(y, plan.num_pairs)
    pending = []
    for e, counts in enumerate(layout.counts_list):  # all launched first, then waited in order
        a, b = plan.region[e], plan.region[e + 1]
        send = y[offsets[e] : offsets[e] + counts]
        pending.append(
            comm.all_to_all(
                send, plan.send_splits[e], plan.recv_splits[e], f"{what} expert {e}", out=full[a:b]
            )
        )
    for p in pending:  # noqa: UP028 - the chain sends results back, which a list iterator cannot take
        yield p
    return full, plan.index
