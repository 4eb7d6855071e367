"""Dispatch/combine time on a topology: the moe_comm package's cost model (DESIGN.md, principle 4).

    topo = Topology(gpus_per_node=8, nvlink_gbps=160, ib_gbps=40)
    route = Routing(num_experts=256, topk=8, ep=64, node_limit=4)
    d = dispatch_cost(topo, route, tokens=4096, hidden=7168, payload="fp8")   # CommCost(ib_bytes, .., time_s)
    c = combine_cost(topo, route, tokens=4096, hidden=7168, payload="bf16")
    exposed, hidden = overlap(d.time_s + c.time_s, compute_s=0.004)

The expert-parallel group of ``ep`` ranks spans ``ep / gpus_per_node`` nodes (one node when ep <= 8). Each
token is sent to ``topk`` experts; node-limited routing restricts them to at most ``node_limit`` nodes.

Hierarchical transfer (DeepEP's normal kernels, ``hierarchical=True``): a token crosses the inter-node link
(InfiniBand) once per target node, to the GPU with the same local index, which forwards it over NVLink to the
target GPUs of its node. The IB and NVLink stages are pipelined, so the time is that of the slower stage plus
a fixed latency. Flat transfer sends one copy per target GPU over IB (or NVLink inside the node).

Expected fan-out under balanced routing: a token's nodes are ``M = min(node_limit, nodes)`` of the EP group's
nodes, each equally likely (so its own node is among them with probability M / nodes), and its ``topk``
experts are drawn uniformly without replacement from the experts of those nodes. Then the expected number of
distinct targets among ``units`` units of ``per_unit`` experts each is
``units x (1 - C(E - per_unit, k) / C(E, k))``.
With DeepSeek-V3's numbers (8 nodes, 4-node limit, 32 experts per node, 4 per GPU, top-8): 3.63 nodes and 7.4
GPUs per token, 3.18 of the nodes remote.

Combine moves the same copies back (the forwarding GPU reduces its node's copies first, so IB again carries
one per node). In backward, dispatch's gradient is a combine and combine's gradient is a dispatch (both BF16).

Which Dispatcher this prices. The combine priced here is ``Dispatcher(combine="reduced")`` (DeepEP's
traffic: one row per token and GPU, or per token and node when hierarchical). The Dispatcher's default,
``combine="pairs"``, returns one row per (token, expert) pair so that the source sums in a fixed order
(bitwise equal to a plain all-to-all reference): ``topk`` copies per token instead of one per GPU (flat)
or per node (hierarchical) -- with DeepSeek-V3's routing 8 instead of 7.4 (1.08x) flat, and 8 instead of
3.63 across IB (2.2x) hierarchical, for the combine and for the dispatch's gradient (also a combine). The
training app (examples/deepseek_v3/moe.py, ``shard_experts``) therefore uses ``combine="reduced"`` with the
hierarchical transfer whenever its EP group spans several nodes, and ``"pairs"`` inside one node.

Bandwidths are *achieved* per GPU and per direction. The plan passes nominal x the communication kernels'
efficiency (examples/deepseek_v3/plan/rates.py); on H800: NVLink 160 GB/s (DeepSeek-V3 report, section
3.2.2; DeepEP measures 153-158 intranode) and InfiniBand 32.8 of 50 GB/s, the rate of the dispatch/combine
kernels in DeepSeek's training profile while overlapped with compute (DeepEP's isolated benchmark at EP64:
51 GB/s of "logical" bandwidth, which counts a node's own traffic too, ~45 GB/s of the bytes counted here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Payload = Literal["fp8", "bf16"]


@dataclass(frozen=True)
class Topology:
    """Per-GPU achieved bandwidths (GB/s, one direction) and node size."""

    gpus_per_node: int = 8
    nvlink_gbps: float = 160.0
    ib_gbps: float = 40.0
    latency_us: float = 20.0  # fixed cost of one dispatch or combine (notify + completion)

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1:
            raise ValueError(f"Topology.gpus_per_node={self.gpus_per_node} must be >= 1")
        if self.nvlink_gbps <= 0 or self.ib_gbps <= 0:
            raise ValueError(f"bandwidths must be > 0, got {self.nvlink_gbps=} GB/s, {self.ib_gbps=} GB/s")
        if self.latency_us < 0:
            raise ValueError(f"Topology.latency_us={self.latency_us} must be >= 0")


@dataclass(frozen=True)
class Routing:
    """Experts, top-k, expert-parallel size and the node limit of node-limited routing."""

    num_experts: int
    topk: int
    ep: int
    node_limit: int | None = None  # None: no limit

    def __post_init__(self) -> None:
        if self.ep < 1 or self.num_experts % self.ep:
            raise ValueError(f"Routing.ep={self.ep} must be >= 1 and divide num_experts={self.num_experts}")
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"Routing.topk={self.topk} must be in [1, num_experts={self.num_experts}]")
        if self.node_limit is not None and self.node_limit < 1:
            raise ValueError(f"Routing.node_limit={self.node_limit} must be >= 1 (or None)")


@dataclass(frozen=True)
class FanOut:
    """Expected distinct destinations of one token."""

    nodes: float  # distinct nodes (own node included)
    remote_nodes: float  # distinct nodes other than the token's own
    ranks: float  # distinct GPUs (own GPU included)
    remote_ranks: float  # distinct GPUs other than the token's own
    same_node_ranks: float  # distinct GPUs of the own node other than the token's own GPU


@dataclass(frozen=True)
class CommCost:
    """Bytes one GPU sends and the time of one dispatch or combine."""

    ib_bytes: float
    nvlink_bytes: float
    time_s: float
    bound: str  # "ib", "nvlink" or "none"


def _expected_distinct(units: int, per_unit: int, k: int) -> float:
    """E[#units hit] when k of units*per_unit items are drawn without replacement (module docstring)."""
    total = units * per_unit
    k = min(k, total)
    miss = math.comb(total - per_unit, k) / math.comb(total, k) if total - per_unit >= k else 0.0
    return units * (1.0 - miss)


def fan_out(routing: Routing, gpus_per_node: int) -> FanOut:
    """Expected distinct nodes and GPUs a token is sent to under balanced node-limited routing."""
    g = min(gpus_per_node, routing.ep)
    if routing.ep % g:
        raise ValueError(f"ep={routing.ep} must be a multiple of gpus_per_node={gpus_per_node} (or below it)")
    nodes = routing.ep // g
    m = nodes if routing.node_limit is None else min(routing.node_limit, nodes)
    per_rank = routing.num_experts // routing.ep
    per_node = per_rank * g
    k = routing.topk
    n_nodes = _expected_distinct(m, per_node, k)
    n_ranks = _expected_distinct(m * g, per_rank, k)
    p_own_node = m / nodes  # own node among the chosen ones
    # Given the own node is chosen, the expected number of its GPUs hit; each GPU of a chosen node is hit
    # with probability n_ranks / (m * g).
    p_rank_hit = n_ranks / (m * g)
    return FanOut(
        nodes=n_nodes,
        remote_nodes=n_nodes * (nodes - 1) / nodes,
        ranks=n_ranks,
        remote_ranks=n_ranks * (routing.ep - 1) / routing.ep,
        same_node_ranks=p_own_node * p_rank_hit * (g - 1),
    )


def payload_bytes(hidden: int, payload: Payload, topk: int) -> float:
    """Bytes of one token copy: FP8 data + an FP32 scale per 128 channels, or BF16; + expert ids, weights."""
    if payload == "fp8":
        data = hidden + 4 * math.ceil(hidden / 128)
    elif payload == "bf16":
        data = 2 * hidden
    else:
        raise ValueError(f"{payload=} must be 'fp8' or 'bf16'")
    return float(data + 8 * topk)


def _exchange(
    topo: Topology, routing: Routing, tokens: int, hidden: int, payload: Payload, hierarchical: bool
) -> CommCost:
    if tokens < 0 or hidden <= 0:
        raise ValueError(f"{tokens=} must be >= 0 and {hidden=} > 0")
    if routing.ep == 1 or tokens == 0:
        return CommCost(0.0, 0.0, 0.0, "none")
    f = fan_out(routing, topo.gpus_per_node)
    per_copy = payload_bytes(hidden, payload, routing.topk)
    g = min(topo.gpus_per_node, routing.ep)
    if hierarchical:
        ib = tokens * f.remote_nodes * per_copy
        # Every copy to a GPU other than the forwarder crosses NVLink once.
        nvl = tokens * f.ranks * per_copy * (g - 1) / g
    else:
        ib = tokens * (f.remote_ranks - f.same_node_ranks) * per_copy
        nvl = tokens * f.same_node_ranks * per_copy
    t_ib = ib / (topo.ib_gbps * 1e9)
    t_nvl = nvl / (topo.nvlink_gbps * 1e9)
    bound = "ib" if t_ib >= t_nvl else "nvlink"
    return CommCost(ib, nvl, max(t_ib, t_nvl) + topo.latency_us * 1e-6, bound)


def dispatch_cost(
    topo: Topology,
    routing: Routing,
    *,
    tokens: int,
    hidden: int,
    payload: Payload = "fp8",
    hierarchical: bool = True,
) -> CommCost:
    """One GPU's dispatch of ``tokens`` tokens (each to its top-k experts' GPUs)."""
    return _exchange(topo, routing, tokens, hidden, payload, hierarchical)


def combine_cost(
    topo: Topology,
    routing: Routing,
    *,
    tokens: int,
    hidden: int,
    payload: Payload = "bf16",
    hierarchical: bool = True,
) -> CommCost:
    """One GPU's combine: the expert outputs of its ``tokens`` tokens come back (same copies, reversed)."""
    return _exchange(topo, routing, tokens, hidden, payload, hierarchical)


def overlap(comm_s: float, compute_s: float) -> tuple[float, float]:
    """(exposed, hidden) seconds of ``comm_s`` of communication run beside ``compute_s`` of compute.

    Communication on its own SMs/stream is hidden up to the length of the independent compute beside it.
    """
    if comm_s < 0 or compute_s < 0:
        raise ValueError(f"{comm_s=} and {compute_s=} must be >= 0")
    hidden = min(comm_s, compute_s)
    return comm_s - hidden, hidden
