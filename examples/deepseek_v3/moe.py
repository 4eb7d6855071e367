"""DeepSeekMoE for the example model: shared experts + routed experts behind the V3 gate.

TEMPORARY local gate and experts, used until ``moe_comm`` (router, MoELayer, Dispatcher) lands; then this
module becomes a thin adapter over it.

Gate (DeepSeek-V3 report, eqs. 12-16): s = sigmoid(x W_g^T) per expert (FP32). Selection uses s + b, where
b is a per-expert bias that only steers selection (auxiliary-loss-free balancing, updated between steps
by ``update_bias``); experts are split into ``n_expert_groups`` groups, a group scores the sum of its top-2
biased affinities, each token keeps its best ``n_limited_groups`` groups and picks top-k experts among
them. Weights are the unbiased s of the chosen experts, normalised to sum 1 and scaled by ``route_scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from examples.deepseek_v3.config import ModelConfig


class V3Gate(nn.Module):
    """Router: x (N, dim) -> topk_idx (N, k) int64, topk_weights (N, k) float32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, g = cfg.n_routed_experts, cfg.n_expert_groups
        if e % g != 0 or not 1 <= cfg.n_limited_groups <= g:
            raise ValueError(f"n_routed_experts={e} must split into n_expert_groups={g} >= n_limited_groups")
        self.topk, self.groups, self.topk_groups, self.scale = (
            cfg.n_activated_experts,
            g,
            cfg.n_limited_groups,
            cfg.route_scale,
        )
        self.weight = nn.Parameter(torch.empty(e, cfg.dim))
        self.register_buffer("bias", torch.zeros(e))  # selection-only bias (aux-loss-free balancing)
        self.register_buffer("load", torch.zeros(e), persistent=False)  # tokens per expert since last update

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, e = x.shape[0], self.weight.shape[0]
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # (N, E)
        sel = scores.detach() + self.bias
        if self.groups > 1:
            grouped = sel.view(n, self.groups, e // self.groups)
            group_score = grouped.topk(min(2, e // self.groups), dim=-1).values.sum(-1)  # (N, G)
            keep = group_score.topk(self.topk_groups, dim=-1).indices
            mask = torch.zeros(n, self.groups, dtype=torch.bool, device=x.device).scatter_(1, keep, True)
            sel = sel.masked_fill(~mask.repeat_interleave(e // self.groups, dim=1), float("-inf"))
        idx = sel.topk(self.topk, dim=-1).indices
        w = scores.gather(1, idx)
        w = w / w.sum(-1, keepdim=True) * self.scale
        if self.training and torch.is_grad_enabled():
            self.load += torch.bincount(idx.flatten(), minlength=e).to(self.load.dtype)
        return idx, w

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, speed: float) -> None:
        """b_i += speed * sign(mean(load) - load_i): overloaded experts become less attractive."""
        self.bias += speed * torch.sign(load.float().mean() - load.float())


class GroupedExperts(nn.Module):
    """``n`` SwiGLU experts with stacked weights w1, w3 (n, inter, dim) and w2 (n, dim, inter)."""

    def __init__(self, n: int, dim: int, inter_dim: int, expert_offset: int = 0):
        super().__init__()
        self.expert_offset = expert_offset  # global id of expert 0 here (checkpoint names use global ids)
        self.w1 = nn.Parameter(torch.empty(n, inter_dim, dim))
        self.w3 = nn.Parameter(torch.empty(n, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, inter_dim))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x (M, dim) grouped by expert, ``counts[j]`` rows for expert j -> (M, dim)."""
        outs = []
        for j, part in enumerate(x.split(counts)):
            h = F.silu(part @ self.w1[j].T) * (part @ self.w3[j].T)
            outs.append(h @ self.w2[j].T)
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])


class MoE(nn.Module):
    """shared(x) + sum_k w_k * expert_{idx_k}(x), per token. x (..., dim) -> (..., dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from examples.deepseek_v3.model import MLP

        self.n_experts = cfg.n_routed_experts
        self.gate = V3Gate(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, w = self.gate(x)
        k = idx.shape[1]
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        token = order // k
        y = self.experts(x[token], counts)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, token, y.float() * w.flatten()[order, None])
        out = out.to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)
