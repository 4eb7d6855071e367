"""The training app's use of moe_comm (examples/deepseek_v3/moe.py): which dispatcher each EP topology gets
(inside one node: flat, bitwise-exact pairs combine; across nodes: hierarchical, reduced combine, what the
plan prices), and that both give the single-process model's logits."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.distributed import run_ranks
from tests.moe_comm.reference import assert_close


def _tokens(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, 256, (2, 9), generator=g)


def _rank(rank: int, world_size: int) -> dict:
    from examples.deepseek_v3.config import get_preset
    from examples.deepseek_v3.model import build_model
    from examples.deepseek_v3.moe import ep_ranks_per_node, moe_layers, shard_experts

    cfg = get_preset("tiny")
    out = {"detected": ep_ranks_per_node(dist.group.WORLD)}
    for name, rpn in (("auto", None), ("two nodes", 2)):
        model = build_model(cfg, seed=0)
        shard_experts(model, dist.group.WORLD, rank, world_size, ranks_per_node=rpn)
        d = moe_layers(model)[0].dispatcher
        with torch.no_grad():
            logits = model(_tokens(rank))[0]
        out[name] = {"mode": (d.topo.ranks_per_node, d.hierarchical, d.combine_mode), "logits": logits}
    return out


def test_app_dispatcher_mode_per_topology():
    from examples.deepseek_v3.config import get_preset
    from examples.deepseek_v3.model import build_model

    W = 4
    outs = run_ranks(_rank, W)
    model = build_model(get_preset("tiny"), seed=0)
    for r, o in enumerate(outs):
        assert o["detected"] == W  # one host: one node
        assert o["auto"]["mode"] == (W, False, "pairs")
        assert o["two nodes"]["mode"] == (2, True, "reduced")
        with torch.no_grad():
            ref = model(_tokens(r))[0]
        for name in ("auto", "two nodes"):
            assert_close(o[name]["logits"], ref, 1e-5, 1e-5, f"{name} rank {r}")
