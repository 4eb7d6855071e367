"""DeepSeek-V3 gate: sigmoid affinities, node-limited top-k, auxiliary-loss-free balancing.

For token t with hidden state u_t and expert centroids e_i (the gate weight rows), DeepSeek-V3
(arXiv 2412.19437, section 2.1.2) routes as follows:

    s_{i,t}  = sigmoid(u_t . e_i)                          affinity, computed in FP32
    b_i                                                    per-expert bias, used for SELECTION only
    group g  = experts [g*E/G, (g+1)*E/G)                  one group per node in production
    score_g  = sum of the top (K/M) values of s_{i,t} + b_i inside group g
    keep the M best groups; the other groups' experts cannot be chosen (node-limited routing)
    topk_idx = the K experts of largest s_{i,t} + b_i among the kept groups
    w_{i,t}  = route_scale * s_{i,t} / sum_{j in topk} s_{j,t}    (weights from the UNBIASED affinities)

Auxiliary-loss-free balancing: after each step the bias moves against the load error,
``b_i += rate * sign(mean_load - load_i)``, so overloaded experts become less likely to be chosen
(the paper uses rate 0.001). The loads are counted during training forward passes and may be summed
over a process group (all ranks that see different tokens) before the update.

Optional sequence-wise balance loss (complementary, tiny coefficient in the paper):

    f_i = E / (K * S) * #{t in sequence : i in topk(t)}     P_i = mean_t s'_{i,t},  s' = s / sum_j s_j
    L_bal = alpha * sum_i f_i * P_i                           averaged over the sequences of the batch

Its gradient reaches the gate weight without the caller adding anything to the loss: the value is
attached to ``topk_weights`` by an identity autograd function whose backward also emits d L_bal = 1
(the loss is available as ``router.aux_loss`` for logging).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["DeepSeekV3Router", "select_experts"]


def select_experts(
    scores: torch.Tensor,
    bias: torch.Tensor | None,
    topk: int,
    *,
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score_topk: int | None = None,
) -> torch.Tensor:
    """Node-limited top-k selection. Returns ``topk_idx`` (T, topk) int64.

    scores: (T, E) float affinities (sigmoid outputs); bias: (E,) selection bias or None.
    Experts are split into ``num_groups`` contiguous groups; each token keeps its ``topk_groups`` best
    groups (group score = sum of its ``group_score_topk`` best biased scores, default topk // topk_groups)
    and picks its top-k among their experts. Ties break towards the lower expert index (torch.topk on
    CPU is stable for equal values; the result is deterministic for a given input).
    """
    T, E = scores.shape
    _check_routing_args(E, topk, num_groups, topk_groups)
    biased = scores if bias is None else scores + bias
    if num_groups > 1 and topk_groups < num_groups:
        per_group = E // num_groups
        k_in_group = group_score_topk or max(1, topk // topk_groups)
        k_in_group = min(k_in_group, per_group)
        group_scores = biased.view(T, num_groups, per_group).topk(k_in_group, dim=-1).values.sum(-1)
        keep = group_scores.topk(topk_groups, dim=-1).indices  # (T, topk_groups)
        group_mask = torch.zeros(T, num_groups, dtype=torch.bool, device=scores.device)
        group_mask.scatter_(1, keep, True)
        expert_mask = group_mask.repeat_interleave(per_group, dim=1)
        biased = biased.masked_fill(~expert_mask, float("-inf"))
    return biased.topk(topk, dim=-1).indices


def _check_routing_args(num_experts: int, topk: int, num_groups: int, topk_groups: int) -> None:
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk={topk} must be in [1, num_experts={num_experts}]")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups={num_groups} must be >= 1 and divide num_experts={num_experts}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups={topk_groups} must be in [1, num_groups={num_groups}]")
    if topk > topk_groups * (num_experts // num_groups):
        raise ValueError(
            f"topk={topk} experts cannot be chosen from topk_groups={topk_groups} groups of "
            f"{num_experts // num_groups} experts each"
        )


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``weights``; the backward also sends gradient 1 to ``aux_loss``."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.aux_dtype = aux_loss.dtype
        return weights.view_as(weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=ctx.aux_dtype, device=grad.device)


class DeepSeekV3Router(nn.Module):
    """The DeepSeek-V3 gate as a module: ``router(x) -> (topk_idx, topk_weights)``.

    Args:
        dim: hidden size H of the tokens.
        num_experts: routed experts E.
        topk: experts per token K.
        num_groups, topk_groups: node-limited routing (G groups, each token reaches at most M groups);
            with one group per node this bounds the nodes a token is sent to.
        route_scale: factor on the normalised weights (2.5 in DeepSeek-V3).
        bias_update_rate: gamma of the auxiliary-loss-free bias update (0 disables it).
        seq_aux_loss_coef: alpha of the sequence-wise balance loss (0 disables it).

    forward(x): x (..., H) any float dtype; a 3-D input (B, S, H) defines the sequences of the balance
    loss (else the whole batch is one sequence). Returns topk_idx (N, K) int64 and topk_weights (N, K)
    float32 with N = x.numel() // H. Gating runs in FP32 whatever x's dtype.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        topk: int,
        *,
        num_groups: int = 1,
        topk_groups: int = 1,
        route_scale: float = 1.0,
        bias_update_rate: float = 1e-3,
        seq_aux_loss_coef: float = 0.0,
        group_score_topk: int | None = None,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim={dim} must be >= 1")
        _check_routing_args(num_experts, topk, num_groups, topk_groups)
        self.dim, self.num_experts, self.topk = dim, num_experts, topk
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.group_score_topk = group_score_topk
        self.route_scale = float(route_scale)
        self.bias_update_rate = float(bias_update_rate)
        self.seq_aux_loss_coef = float(seq_aux_loss_coef)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)
        # Selection bias (not a parameter: it is moved by the balancing rule, never by the optimizer).
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        # Tokens routed to each expert since the last update_bias() (training forward passes only).
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, topk={self.topk}, groups={self.num_groups}, "
            f"topk_groups={self.topk_groups}, route_scale={self.route_scale}"
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x.shape={tuple(x.shape)}: last dim must be the router's dim={self.dim}")
        seq_len = x.shape[1] if x.dim() == 3 else None
        tokens = x.reshape(-1, self.dim)
        scores = F.linear(tokens.float(), self.weight.float()).sigmoid()  # (N, E) FP32 affinities
        topk_idx = select_experts(
            scores.detach(),
            self.bias,
            self.topk,
            num_groups=self.num_groups,
            topk_groups=self.topk_groups,
            group_score_topk=self.group_score_topk,
        )
        chosen = scores.gather(1, topk_idx)
        topk_weights = chosen / chosen.sum(dim=-1, keepdim=True) * self.route_scale
        self.aux_loss = None
        if self.training:
            with torch.no_grad():
                self.load += torch.bincount(topk_idx.flatten(), minlength=self.num_experts).float()
            if self.seq_aux_loss_coef > 0 and torch.is_grad_enabled():
                self.aux_loss = self._sequence_balance_loss(scores, topk_idx, seq_len)
                topk_weights = _AttachAuxLoss.apply(topk_weights, self.aux_loss)
        return topk_idx, topk_weights

    def _sequence_balance_loss(
        self, scores: torch.Tensor, topk_idx: torch.Tensor, seq_len: int | None
    ) -> torch.Tensor:
        N, E = scores.shape
        S = seq_len or N
        B = N // S
        probs = (scores / scores.sum(dim=-1, keepdim=True)).view(B, S, E)
        counts = torch.zeros(B, E, device=scores.device, dtype=torch.float32)
        ones = torch.ones(B, S * self.topk, device=scores.device, dtype=torch.float32)
        counts.scatter_add_(1, topk_idx.view(B, S * self.topk), ones)
        f = counts * (E / (self.topk * S))
        return self.seq_aux_loss_coef * (f * probs.mean(dim=1)).sum(dim=1).mean()

    @torch.no_grad()
    def update_bias(
        self, group: dist.ProcessGroup | None = None, load: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Auxiliary-loss-free step: ``bias += rate * sign(mean(load) - load)``; resets the counted load.

        ``load`` (E,) defaults to the tokens counted since the last call; with ``group`` it is summed over
        the group's ranks first (every rank then applies the same update). Returns the load used.
        """
        load = (self.load if load is None else load.to(self.load)).clone()
        if load.shape != (self.num_experts,):
            raise ValueError(f"load.shape={tuple(load.shape)} must be (num_experts={self.num_experts},)")
        if group is not None:
            dist.all_reduce(load, group=group)
        if self.bias_update_rate > 0:
            self.bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.load.zero_()
        return load
