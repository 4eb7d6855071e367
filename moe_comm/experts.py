"""Routed experts of one rank, computed on the dispatch layout.

``GroupedExperts(num_local_experts, dim, inter_dim)`` holds E_local SwiGLU experts (DeepSeek-V3's FFN):

    y_e(x) = (silu(x @ w1[e].T) * (x @ w3[e].T)) @ w2[e].T        w1, w3: (E_local, I, H); w2: (E_local, H, I)

``experts(res)`` takes a ``DispatchResult`` and returns y in the same layout (so ``combine`` can take it):
  contiguous layout  one GEMM chain per expert over its rows [m_offsets[e], m_offsets[e+1]) (the padding
                     rows are zero and SwiGLU has no bias, so their outputs are zero too);
  masked layout      batched GEMMs over (E_local, capacity, H).
Backends (``backend=``):
  "native"  the GEMMs in the parameters' dtype (BF16 or FP32), plain autograd;
  "fp8"     the three GEMMs through ``fp8.grouped_gemm_contiguous`` (1x128 activations, 128x128 weights,
            FP32 accumulation), the FP8 dispatch payload consumed as is; backward in the parameters'
            dtype (the dgrad/wgrad of the dequantized operands).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_comm.dispatcher import DispatchResult

__all__ = ["GroupedExperts", "swiglu_reference"]


def swiglu_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One expert: x (M, H) -> (M, H) = (silu(x w1^T) * (x w3^T)) w2^T, in x's dtype."""
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


class GroupedExperts(nn.Module):
    """E_local SwiGLU experts; see the module docstring. Parameters are (E_local, ...) stacked tensors."""

    def __init__(
        self,
        num_local_experts: int,
        dim: int,
        inter_dim: int,
        *,
        backend: str = "native",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if min(num_local_experts, dim, inter_dim) < 1:
            raise ValueError(f"{num_local_experts=}, {dim=}, {inter_dim=} must all be >= 1")
        if backend not in ("native", "fp8"):
            raise ValueError(f"backend={backend!r} must be 'native' or 'fp8'")
        self.num_local_experts, self.dim, self.inter_dim, self.backend = (
            num_local_experts,
            dim,
            inter_dim,
            backend,
        )
        kw = {"dtype": dtype, "device": device}
        self.w1 = nn.Parameter(torch.empty(num_local_experts, inter_dim, dim, **kw))
        self.w3 = nn.Parameter(torch.empty(num_local_experts, inter_dim, dim, **kw))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, dim, inter_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[-1]))

    def extra_repr(self) -> str:
        n, d, i, b = self.num_local_experts, self.dim, self.inter_dim, self.backend
        return f"experts={n}, dim={d}, inter_dim={i}, backend={b}"

    def forward(
        self, res: DispatchResult | torch.Tensor, m_offsets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """res: a DispatchResult; or a tensor (rows, H) with m_offsets (E_local + 1,); or (E_local, C, H)."""
        if isinstance(res, DispatchResult):
            if self.backend == "fp8":
                return self._forward_fp8(res)
            x, m_offsets = res.dequantized(self.w1.dtype), res.m_offsets
        else:
            x = res
        if x.dim() == 3:  # masked layout
            if x.shape[0] != self.num_local_experts or x.shape[2] != self.dim:
                raise ValueError(
                    f"x.shape={tuple(x.shape)} must be (E_local={self.num_local_experts}, C, {self.dim})"
                )
            x = x.to(self.w1.dtype)
            h = F.silu(torch.bmm(x, self.w1.transpose(1, 2))) * torch.bmm(x, self.w3.transpose(1, 2))
            return torch.bmm(h, self.w2.transpose(1, 2))
        if m_offsets is None or m_offsets.numel() != self.num_local_experts + 1:
            raise ValueError(
                f"m_offsets must be given with E_local + 1 = {self.num_local_experts + 1} entries"
            )
        bounds = m_offsets.tolist()
        if bounds[-1] != x.shape[0] or x.shape[-1] != self.dim:
            raise ValueError(f"x.shape={tuple(x.shape)} must be (m_offsets[-1]={bounds[-1]}, dim={self.dim})")
        x = x.to(self.w1.dtype)
        outs = [
            swiglu_reference(x[bounds[e] : bounds[e + 1]], self.w1[e], self.w2[e], self.w3[e])
            for e in range(self.num_local_experts)
        ]
        return torch.cat(outs) if outs else x.new_zeros(0, self.dim)

    def _forward_fp8(self, res: DispatchResult) -> torch.Tensor:
        from moe_comm.fp8_experts import fp8_grouped_swiglu

        return fp8_grouped_swiglu(res, self.w1, self.w2, self.w3)
