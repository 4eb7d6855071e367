"""Expert-parallel dispatch/combine over all-to-all: node-limited routing, FP8 payloads, overlap.

    router = DeepSeekV3Router(dim, num_experts, topk, num_groups=nodes, topk_groups=M)
    disp = Dispatcher(ep_group, num_experts, ranks_per_node=8)        # None: local mode, EP=1
    layer = MoELayer(router, GroupedExperts(disp.num_local_experts, dim, inter), disp, shared_experts=mlp)

``HAS_CUDA_EXT`` tells whether ``moe_comm._C`` (permute/unpermute kernels) was built; evaluated lazily.
"""

from __future__ import annotations

from fp8._ext import has_extension
from moe_comm.comm import PeerError
from moe_comm.dispatcher import Dispatcher, DispatchHandle, DispatchResult, Work
from moe_comm.experts import GroupedExperts
from moe_comm.layer import MoELayer
from moe_comm.layout import DispatchLayout, Topology, bytes_across_nodes, get_dispatch_layout
from moe_comm.overlap import interleave, overlapped_forward
from moe_comm.routing import DeepSeekV3Router, select_experts

__all__ = [
    "DeepSeekV3Router",
    "DispatchHandle",
    "DispatchLayout",
    "DispatchResult",
    "Dispatcher",
    "GroupedExperts",
    "MoELayer",
    "PeerError",
    "Topology",
    "Work",
    "bytes_across_nodes",
    "get_dispatch_layout",
    "interleave",
    "overlapped_forward",
    "select_experts",
]


def __getattr__(name: str):
    if name == "HAS_CUDA_EXT":
        return has_extension("moe_comm")
    raise AttributeError(f"module 'moe_comm' has no attribute {name!r}")
