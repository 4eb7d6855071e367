"""Where experts live and where tokens go: the expert-parallel topology and the dispatch layout.

Experts are placed contiguously: with W ranks and E experts, rank r owns experts
[r * E/W, (r+1) * E/W) (its "local experts" 0 .. E/W - 1). Ranks are grouped into nodes of
``ranks_per_node`` consecutive ranks (on gloo a node is a declared topology; on GPUs it is the set of
ranks joined by NVLink). A router with one expert group per node therefore bounds the nodes per token.

``get_dispatch_layout`` counts, for one rank's routing decision, the (token, expert) pairs per expert and
the distinct tokens per rank and per node (what crosses each link once per destination);
``bytes_across_nodes`` turns those counts into the traffic leaving the node, flat versus hierarchical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Topology", "DispatchLayout", "get_dispatch_layout", "bytes_across_nodes"]


@dataclass(frozen=True)
class Topology:
    """``world_size`` ranks in nodes of ``ranks_per_node``, ``num_experts`` experts spread evenly."""

    world_size: int
    num_experts: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        W, E, R = self.world_size, self.num_experts, self.ranks_per_node
        if W < 1:
            raise ValueError(f"world_size={W} must be >= 1")
        if E < 1 or E % W:
            raise ValueError(f"num_experts={E} must be a positive multiple of the world size {W}")
        if R < 1 or W % R:
            raise ValueError(f"ranks_per_node={R} must be >= 1 and divide the world size {W}")

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.world_size

    @property
    def experts_per_node(self) -> int:
        return self.experts_per_rank * self.ranks_per_node

    def rank_of(self, expert: torch.Tensor) -> torch.Tensor:
        """Rank owning each expert id; -1 stays -1 (an unused top-k slot)."""
        return torch.where(expert >= 0, expert // self.experts_per_rank, -1)

    def node_of(self, expert: torch.Tensor) -> torch.Tensor:
        return torch.where(expert >= 0, expert // self.experts_per_node, -1)

    def node_of_rank(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_index(self, rank: int) -> int:
        return rank % self.ranks_per_node


@dataclass
class DispatchLayout:
    """Counts for one rank's tokens (all int64 tensors on topk_idx's device).

    tokens_per_expert (E,): (token, expert) pairs per expert.
    tokens_per_rank (W,):   distinct tokens sent to each rank (one row per token and destination rank).
    tokens_per_node (N,):   distinct tokens sent to each node.
    is_token_in_rank (T, W) bool.
    """

    tokens_per_expert: torch.Tensor
    tokens_per_rank: torch.Tensor
    tokens_per_node: torch.Tensor
    is_token_in_rank: torch.Tensor


def _membership(target: torch.Tensor, n: int) -> torch.Tensor:
    """(T, K) ids in [-1, n) -> (T, n) bool: which ids each row holds (-1 ignored)."""
    T = target.shape[0]
    hit = torch.zeros(T, n + 1, dtype=torch.bool, device=target.device)
    hit.scatter_(1, torch.where(target >= 0, target, n), True)
    return hit[:, :n]


def check_topk_idx(
    topk_idx: torch.Tensor, num_experts: int, name: str = "topk_idx", values: bool = True
) -> None:
    """Raise ValueError unless topk_idx is (T, K) integer with ids in [-1, num_experts), K <= num_experts.

    ``values=False`` checks shape and dtype only (the id range needs a host synchronisation)."""
    if topk_idx.dim() != 2:
        raise ValueError(f"{name}.shape={tuple(topk_idx.shape)} must be (num_tokens, topk)")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}.dtype={topk_idx.dtype} must be torch.int64 or torch.int32")
    if topk_idx.shape[1] > num_experts:
        raise ValueError(f"top-k={topk_idx.shape[1]} ({name}.shape[1]) must be <= num_experts={num_experts}")
    if values and topk_idx.numel():
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        if lo < -1 or hi >= num_experts:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"{name} holds expert id {bad}, outside [0, {num_experts=}) (-1 marks an unused slot)"
            )


def get_dispatch_layout(topk_idx: torch.Tensor, topo: Topology) -> DispatchLayout:
    """Counts of one rank's routing (topk_idx (T, K) int64, -1 = unused slot)."""
    check_topk_idx(topk_idx, topo.num_experts)
    idx = topk_idx.long()
    valid = idx[idx >= 0]
    per_expert = torch.bincount(valid, minlength=topo.num_experts)
    in_rank = _membership(topo.rank_of(idx), topo.world_size)
    in_node = _membership(topo.node_of(idx), topo.num_nodes)
    return DispatchLayout(per_expert, in_rank.sum(0), in_node.sum(0), in_rank)


def bytes_across_nodes(topk_idx: torch.Tensor, topo: Topology, rank: int, row_bytes: int) -> dict[str, int]:
    """Bytes this rank's dispatch and combine send across nodes, flat versus hierarchical.

    Flat dispatch sends one row per (token, destination rank); hierarchical dispatch sends one row per
    (token, destination node) across the inter-node link, then fans out inside the node. The default
    combine ("pairs") returns one row per (token, expert) pair either way (the exact FP32 sum is done at
    the source); combine="reduced" returns what the dispatch sent (one row per token and rank / node).
    """
    layout = get_dispatch_layout(topk_idx, topo)
    node = topo.node_of_rank(rank)
    off_rank = torch.tensor([topo.node_of_rank(r) != node for r in range(topo.world_size)])
    off_node = torch.arange(topo.num_nodes) != node
    expert_node = torch.arange(topo.num_experts) // topo.experts_per_node
    return {
        "dispatch_flat": int(layout.tokens_per_rank.cpu()[off_rank].sum()) * row_bytes,
        "dispatch_hierarchical": int(layout.tokens_per_node.cpu()[off_node].sum()) * row_bytes,
        "combine": int(layout.tokens_per_expert.cpu()[expert_node != node].sum()) * row_bytes,
        "combine_reduced_flat": int(layout.tokens_per_rank.cpu()[off_rank].sum()) * row_bytes,
        "combine_reduced_hierarchical": int(layout.tokens_per_node.cpu()[off_node].sum()) * row_bytes,
    }
