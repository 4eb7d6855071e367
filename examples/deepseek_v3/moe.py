"""DeepSeekMoE for the example model, built from moe_comm: V3 router, routed + shared experts, dispatcher.

    layer = build_moe(cfg)                       # local (EP=1): every routed expert here, no communication
    shard_experts(stage, ep_group, ep_rank, ep)  # EP: keep this rank's experts, dispatch over ep_group

Gate (DeepSeek-V3 report, eqs. 12-16; ``moe_comm.DeepSeekV3Router``): sigmoid affinities per expert in FP32;
selection adds a per-expert bias moved only by the auxiliary-loss-free balancing rule; experts are split
into ``n_expert_groups`` groups, a group scores the sum of its top-2 biased affinities, each token keeps its
best ``n_limited_groups`` groups (node-limited routing) and picks top-k experts among them; the weights are
the unbiased affinities of the chosen experts, normalised and scaled by ``route_scale``.

Routed experts are stacked SwiGLU weights (``moe_comm.GroupedExperts``); their ``expert_offset`` (the global
id of the first local expert) names them in checkpoints, so checkpoints do not depend on the EP size.
"""

from __future__ import annotations

import itertools
import socket

import torch
import torch.distributed as dist
from torch import nn

from examples.deepseek_v3.config import ModelConfig
from moe_comm import DeepSeekV3Router, Dispatcher, GroupedExperts, MoELayer


def build_moe(cfg: ModelConfig) -> MoELayer:
    """A local MoE layer (all experts, EP=1); the balancing rate is set by the trainer (0 here)."""
    from examples.deepseek_v3.model import MLP

    router = DeepSeekV3Router(
        cfg.dim,
        cfg.n_routed_experts,
        cfg.n_activated_experts,
        num_groups=cfg.n_expert_groups,
        topk_groups=cfg.n_limited_groups,
        route_scale=cfg.route_scale,
        bias_update_rate=0.0,
        group_score_topk=2,
    )
    experts = GroupedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
    experts.expert_offset = 0
    shared = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
    return MoELayer(router, experts, None, shared_experts=shared)


def moe_layers(module: nn.Module) -> list[MoELayer]:
    return [m for m in module.modules() if isinstance(m, MoELayer)]


@torch.no_grad()
def shard_experts(
    module: nn.Module,
    group: dist.ProcessGroup | None,
    ep_rank: int,
    ep: int,
    *,
    backend: str = "native",
    timeout: float = 300.0,
    ranks_per_node: int | None = None,
) -> None:
    """In place: every MoE layer of ``module`` keeps routed experts [ep_rank * E / ep, (ep_rank + 1) * E / ep)
    (copied from its full set) and dispatches over ``group`` (the expert-parallel group, ``ep`` ranks).

    ``backend="fp8"`` dispatches tokens as FP8 (1x128 scales, as DeepSeek-V3 does) and runs the routed
    experts' GEMMs through fp8.grouped_gemm_contiguous on that payload; the combine stays high precision.

    Nodes: ``ranks_per_node`` consecutive EP ranks share a node (default: found from the host names). When
    the group spans several nodes the dispatcher is hierarchical with ``combine="reduced"`` -- a token
    crosses the inter-node link once per node both ways, DeepEP's traffic, which is what the plan prices
    (moe_comm/cost.py); inside one node it keeps the bitwise-exact ``combine="pairs"``.
    """
    rpn = ep
    if group is not None and ep > 1:
        rpn = ranks_per_node if ranks_per_node is not None else ep_ranks_per_node(group)
    multi_node = rpn < ep
    for layer in moe_layers(module):
        full = layer.experts
        e = full.w1.shape[0]
        if e % ep:
            raise ValueError(f"{e} routed experts must be divisible by parallel.ep={ep}")
        n = e // ep
        lo = ep_rank * n
        local = GroupedExperts(
            n, full.dim, full.inter_dim, backend=backend, dtype=full.w1.dtype, device=full.w1.device
        )
        for name in ("w1", "w2", "w3"):
            getattr(local, name).copy_(getattr(full, name)[lo : lo + n])
        local.expert_offset = lo
        layer.experts = local
        layer.payload = "fp8" if backend == "fp8" else "native"  # FP8 experts read the FP8 dispatch payload
        if group is not None and ep > 1:
            layer.dispatcher = Dispatcher(
                group, e, ranks_per_node=rpn, combine="reduced" if multi_node else "pairs", timeout=timeout
            )


def ep_ranks_per_node(group: dist.ProcessGroup) -> int:
    """Ranks per node of ``group`` from its members' host names (one all_gather): the size of the blocks of
    consecutive ranks on one host when they are equal, else the group size (treated as one node)."""
    hosts: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    blocks = [len(list(run)) for _, run in itertools.groupby(hosts)]
    if len(set(blocks)) == 1 and len(blocks) == len(set(hosts)):
        return blocks[0]
    return len(hosts)
