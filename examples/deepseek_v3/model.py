"""A DeepSeek-V3-style transformer, written as pipeline stages.

    cfg = get_preset("tiny")
    model = build_model(cfg, seed=0)                          # one stage holding everything
    logits, mtp_logits = model(tokens)                        # tokens (B, T) int64 -> (B, T, V), (B, T-1, V)
    stages = split_stages(model, layer_ranges(cfg, 4))        # 4 stages, global parameter names kept

Pieces (DeepSeek-V3 technical report, arXiv 2412.19437, section 2):
- MLA: queries through a low-rank bottleneck (``wq_a`` -> RMSNorm -> ``wq_b``), keys and values through
  a shared compressed latent (``wkv_a`` -> RMSNorm -> ``wkv_b``); RoPE is decoupled: a small
  ``qk_rope_head_dim`` part of each query head and one rotary key shared by all heads carry the
  positions, the rest (``qk_nope_head_dim``) carries none.
- DeepSeekMoE (examples.deepseek_v3.moe, built from moe_comm's MoELayer): shared experts + routed
  experts behind the V3 sigmoid gate; the first ``n_dense_layers`` blocks use a dense SwiGLU FFN instead.
- RMSNorm in FP32; multi-token prediction (MTP) of depth ``mtp_depth``: module k combines the previous
  depth's hidden state at position i with the embedding of token i+k+1 and predicts token i+k+2, sharing
  the embedding and the output head with the main model.

Pipeline form: a :class:`Stage` owns blocks ``[lo, hi)`` under their global names (``layers.<i>``); the
first stage also owns the embedding, the last one the final norm, the head and the MTP modules. Stages
pass ``(h, h0)``: the hidden state and the embedding output ``h0``, which the MTP modules on the last
stage need (they "share the embedding" by receiving its output, so no parameter is tied across ranks).
Without MTP the boundary is ``(h,)``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from examples.deepseek_v3.config import ModelConfig
from examples.deepseek_v3.moe import build_moe
from moe_comm import MoELayer

INIT_STD = 0.02
Pieces = Generator[Any, Any, Any]  # a forward_pieces generator (dualpipe.overlap)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in FP32 and returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_cos_sin(seq_len: int, rope_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (seq_len, rope_dim // 2): pairs (x[2j], x[2j+1]) rotate by pos * theta^(-2j/d)."""
    inv = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim))
    ang = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim. x (B, H, T, d); cos/sin (T, d/2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class MLA(nn.Module):
    """Multi-head latent attention with decoupled RoPE, causal. x (B, T, dim) -> (B, T, dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.nope, self.rope, self.vdim = (
            cfg.n_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
        self.kv_rank = cfg.kv_lora_rank
        qdim = cfg.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, qdim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, qdim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(
            cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False
        )
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)
        cos, sin = rope_cos_sin(cfg.max_seq_len, cfg.qk_rope_head_dim, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if t > self.cos.shape[0]:
            raise ValueError(f"sequence length {t} > max_seq_len={self.cos.shape[0]}")
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(b, t, self.n_heads, self.nope + self.rope).transpose(1, 2)  # (B, H, T, dq)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        kv_lat, k_pe = self.wkv_a(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.wkv_b(self.kv_norm(kv_lat)).view(b, t, self.n_heads, self.nope + self.vdim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.vdim], dim=-1)
        cos, sin = self.cos[:t], self.sin[:t]
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin).expand(
            b, self.n_heads, t, self.rope
        )  # one key, all heads
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale = qk_head_dim ** -0.5
        return self.wo(o.transpose(1, 2).reshape(b, t, self.n_heads * self.vdim))


class MLP(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). x (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(norm(h)), then + ffn(norm(h)); dense FFN or MoE by layer id."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn: nn.Module = (
            MLP(cfg.dim, cfg.dense_inter_dim) if layer_id < cfg.n_dense_layers else build_moe(cfg)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h))
        return h + self.ffn(self.ffn_norm(h))

    def forward_pieces(self, h: torch.Tensor, *extra: torch.Tensor) -> Pieces:
        """The same forward for dualpipe's overlap hook: the MoE's dispatch and combine are the points.

        ``extra`` tensors (and the residual) ride through every point as the MoE layer's ``carry`` so that
        the graph is cut cleanly there; returns ``(h, *extra)``.
        """
        h = h + self.attn(self.attn_norm(h))
        if not isinstance(self.ffn, MoELayer):
            return (h + self.ffn(self.ffn_norm(h)), *extra)
        out, (h, *extra) = yield from self.ffn.forward_pieces(self.ffn_norm(h), carry=(h, *extra))
        return (h + out, *extra)


class MTPModule(nn.Module):
    """One multi-token-prediction depth: block(proj([norm(emb(t_{i+k+1})); norm(h_i)])), then its own norm."""

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, cfg.n_layers + depth)  # an MoE block, as in the main model's deep layers
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        """h_prev (B, T', dim) at positions i, emb_next (B, T', dim) of tokens i+k+1 -> (B, T', dim)."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h)

    def forward_pieces(self, h_prev: torch.Tensor, emb_next: torch.Tensor, *extra: torch.Tensor) -> Pieces:
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return (yield from self.block.forward_pieces(h, *extra))


class Stage(nn.Module):
    """Blocks ``[lo, hi)`` of the model (global names ``layers.<i>``) plus the ends it owns.

    forward, first stage:   tokens (B, T) int64          -> (h, h0) or (h,) without MTP
    forward, middle stage:  h (B, T, dim), h0 (B, T, dim) -> (h, h0)
    forward, last stage:    (h, h0)                       -> (logits (B, T, V), *mtp_logits (B, T-1-k, V))
    A single stage that is both first and last maps tokens to logits (the whole model).
    """

    def __init__(self, cfg: ModelConfig, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        if not 0 <= lo < hi <= cfg.n_layers:
            raise ValueError(
                f"stage layers [{lo}, {hi}) must be a non-empty range within n_layers={cfg.n_layers}"
            )
        self.cfg, self.lo, self.hi, self.first, self.last = cfg, lo, hi, first, last
        if first:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(lo, hi)})
        if last:
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
            self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(cfg.mtp_depth))

    def _start(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.first:
            (tokens,) = inputs
            h = self.embed(tokens)
            return h, h
        if self.cfg.mtp_depth > 0:
            h, h0 = inputs
            return h, h0
        (h,) = inputs
        return h, None

    def _boundary(self, h: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if h0 is None:
            return (h,)
        # view_as: never hand the input tensor itself back as an output (keeps autograd graphs per stage)
        return h, h0.view_as(h0)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, h0 = self._start(inputs)
        for block in self.layers.values():
            h = block(h)
        if not self.last:
            return self._boundary(h, h0)
        logits = self.head(self.norm(h))
        outs = [logits]
        hk = h
        for k, mtp in enumerate(self.mtp):
            hk = mtp(hk[:, :-1], h0[:, k + 1 :])
            outs.append(self.head(mtp.norm(hk)))
        return tuple(outs)

    def forward_pieces(self, *inputs: torch.Tensor) -> Pieces:
        """``forward`` as pieces for dualpipe's overlap hook (one piece per stretch between MoE points)."""
        h, h0 = self._start(inputs)
        extra = () if h0 is None else (h0,)
        for block in self.layers.values():
            h, *extra = yield from block.forward_pieces(h, *extra)
        h0 = extra[0] if extra else None
        if not self.last:
            return self._boundary(h, h0)
        hk, mtp_outs = h, []
        for k, mtp in enumerate(self.mtp):
            hk, h, h0, *mtp_outs = yield from mtp.forward_pieces(hk[:, :-1], h0[:, k + 1 :], h, h0, *mtp_outs)
            mtp_outs.append(self.head(mtp.norm(hk)))
        return (self.head(self.norm(h)), *mtp_outs)


def lm_loss(
    *outputs: torch.Tensor, targets: torch.Tensor, mtp_weight: float = 0.3, scale: float = 1.0
) -> torch.Tensor:
    """(CE(logits, targets) + mtp_weight / D * sum_k CE(mtp_k, targets[:, k+1:])) * scale, FP32.

    outputs: logits (B, T, V) and D MTP logits (B, T-1-k, V); targets (B, T) int64 (the next tokens).
    """
    logits, mtp = outputs[0], outputs[1:]
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    if mtp:
        extra = sum(
            F.cross_entropy(m.float().flatten(0, 1), targets[:, k + 1 :].flatten()) for k, m in enumerate(mtp)
        )
        loss = loss + mtp_weight / len(mtp) * extra
    return loss * scale


def init_weights(module: nn.Module, std: float = INIT_STD) -> None:
    """Normal(0, std) for every matrix (Linears, embedding, stacked experts, gate); norms at 1; biases 0."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, 0.0, std)
        elif name.endswith("norm.weight"):
            nn.init.ones_(p)
        else:
            nn.init.zeros_(p)


def build_model(cfg: ModelConfig, seed: int = 0, device: torch.device | str | None = None) -> Stage:
    """The whole model as one stage, initialised from ``seed`` (the same on every rank and layout)."""
    with torch.device(device or "cpu"):
        model = Stage(cfg, 0, cfg.n_layers, first=True, last=True)
    if torch.device(device or "cpu").type != "meta":
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        with torch.no_grad():
            init_weights(model)
        torch.random.set_rng_state(gen_state)
    return model


def layer_ranges(n_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Equal contiguous blocks of layers per stage. Raises ValueError unless num_stages divides n_layers."""
    if num_stages < 1 or n_layers % num_stages != 0:
        raise ValueError(
            f"model.n_layers={n_layers} must be divisible by the number of pipeline stages {num_stages}"
        )
    per = n_layers // num_stages
    return [(s * per, (s + 1) * per) for s in range(num_stages)]


def split_stages(
    model: Stage, ranges: list[tuple[int, int]], keep: list[int] | None = None
) -> dict[int, Stage]:
    """Cut a whole-model stage into stages that share (not copy) its modules; global names are kept.

    ``keep`` lists the stage indices to build (default all). Returns {stage index: Stage}.
    """
    cfg = model.cfg
    n = len(ranges)
    out: dict[int, Stage] = {}
    for s in keep if keep is not None else range(n):
        lo, hi = ranges[s]
        with torch.device("meta"):
            st = Stage(cfg, lo, hi, first=s == 0, last=s == n - 1)
        if st.first:
            st.embed = model.embed
        st.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in range(lo, hi)})
        if st.last:
            st.norm, st.head, st.mtp = model.norm, model.head, model.mtp
        out[s] = st
    return out


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from a meta-device model (nothing allocated).

    total: the main model (embedding, blocks, final norm, head; MTP excluded, as DeepSeek's 671B);
    mtp: the MTP modules; active: what one token uses in the main model (all non-routed parameters and
    ``n_activated_experts`` of the routed experts per MoE layer); active_matmul: active minus the embedding.
    """
    model = build_model(cfg, device="meta")
    total = mtp = routed = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            mtp += p.numel()
            continue
        total += p.numel()
        if ".experts." in name:
            routed += p.numel()
    active = total - routed + routed * cfg.n_activated_experts // cfg.n_routed_experts
    emb = cfg.vocab_size * cfg.dim
    return {"total": total, "mtp": mtp, "active": active, "active_matmul": active - emb}
