"""Model accounting for the plan: parameters, FLOPs per token, and the work of each block of a micro-batch.

    counts = param_counts(cfg)                          # ParamCounts(total=671.0e9, active=36.6e9, ...)
    model_flops_per_token(cfg, seq_len=4096)            # 250.5e9 (causal), the MFU numerator per token
    blocks = model_blocks(cfg, tokens=4096, seq_len=4096, ep=64)   # [embed, dense x3, moe x58, head, mtp]

Conventions (the ones DeepSeek's published figures use; see ../shared/ANCHORS.md):

* ``active`` parameters are those whose weights multiply a token's activations: attention, the dense FFN or
  the shared + top-k routed experts and the router, and the output head. The embedding table is looked up,
  not multiplied, and is not counted (36.62B for V3; DeepSeek rounds it to "37B"; ANCHORS' "6 x 36.6B").
  Multi-token-prediction (MTP) modules are not part of the main model's counts.
* Model FLOPs per token = 6 x active matmul parameters + causal attention, where attention per layer and
  token is 2 (QK^T) + 2 (PV) multiply-adds over heads x (qk_head_dim + v_head_dim) x seq_len / 2 (the causal
  half), times 3 for forward + backward. This is the MFU numerator (250 GFLOPs/token for V3 at 4K).
* The time model prices what actually runs, which is more than the model FLOPs: MTP modules, the recomputed
  MLA up-projections, FlashAttention's backward (2.5x its forward: it recomputes QK^T), and memory-bound
  element-wise work (norms, RoPE, SwiGLU, FP8 casts, permutes, residuals, the loss) counted in bytes.

A *block* is the unit the pipeline partition moves between stages: the embedding, one transformer layer
(dense or MoE), the output head with its loss, or one MTP module. Each block lists its GEMMs (shapes of one
micro-batch of ``tokens`` tokens on one GPU), its attention, its element-wise bytes, its expert-parallel
all-to-all, its parameters (replicated vs sharded over EP) and the activation bytes it keeps for backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from examples.deepseek_v3.config import ModelConfig

BF16 = 2  # bytes
FP8 = 1
FP32 = 4


@dataclass(frozen=True)
class Gemm:
    """One GEMM of a micro-batch: (m, k) x (k, n), grouped over ``groups`` experts when groups > 1.

    ``m`` is the number of rows (tokens, or token copies summed over the groups of a grouped GEMM).
    ``fp8``: the GEMM runs in FP8 (fprop, dgrad and wgrad) when the run's precision is FP8; False keeps it in
    BF16 whatever the precision (DeepSeek-V3 keeps the embedding, output head and router gate in BF16).
    ``recompute``: its forward is re-run in backward (DeepSeek-V3 recomputes the MLA up-projections).
    ``overlaps_comm``: independent of the block's own dispatch/combine (the shared experts), so it can hide
    them even when no other micro-batch is overlapped.
    """

    name: str
    m: int
    n: int
    k: int
    groups: int = 1
    fp8: bool = True
    recompute: bool = False
    overlaps_comm: bool = False

    @property
    def flops(self) -> float:
        """Multiply-add FLOPs of one pass (fprop, dgrad or wgrad each cost this much)."""
        return 2.0 * self.m * self.n * self.k


@dataclass(frozen=True)
class Attention:
    """Core attention of one micro-batch: ``tokens`` queries, each attending over ``context`` keys."""

    tokens: int
    context: int  # sequence length the queries belong to (causal: the average query sees context / 2 keys)
    heads: int
    qk_dim: int
    v_dim: int
    causal: bool = True

    @property
    def fwd_flops(self) -> float:
        keys = self.context / 2 if self.causal else self.context
        return 2.0 * self.tokens * keys * self.heads * (self.qk_dim + self.v_dim)

    @property
    def bwd_flops(self) -> float:
        """FlashAttention backward runs 5 matmuls to the forward's 2 (it recomputes QK^T)."""
        return 2.5 * self.fwd_flops


@dataclass(frozen=True)
class AllToAll:
    """The expert-parallel exchange of one MoE block: dispatch ``tokens`` x ``topk`` copies, combine back."""

    tokens: int
    hidden: int
    topk: int
    num_experts: int


@dataclass(frozen=True)
class Block:
    """The work of one block for one micro-batch on one GPU (see the module docstring)."""

    kind: str  # "embed" | "dense" | "moe" | "head" | "mtp"
    gemms: tuple[Gemm, ...] = ()
    attention: Attention | None = None
    elementwise_fwd_bytes: float = 0.0
    elementwise_bwd_bytes: float = 0.0
    all_to_all: AllToAll | None = None
    params_replicated: int = 0  # replicated over data parallel (dense weights, norms, router, embedding)
    params_expert: int = 0  # routed-expert weights of the whole layer; a GPU holds params_expert / ep
    activation_bytes: float = 0.0  # kept from forward to backward, per micro-batch (precision-dependent)
    model_flops: float = 0.0  # MFU-convention FLOPs of this block per micro-batch (0 for MTP)
    extras: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ParamCounts:
    total: int  # main model (no MTP)
    active: int  # per token, embedding excluded (module docstring)
    active_matmul: int  # == active (kept separate for clarity in reports)
    embedding: int
    expert: int  # routed experts, all layers
    mtp: int  # MTP modules (embedding and head shared with the main model, not counted again)
    per_layer_attention: int
    per_layer_moe: int
    per_layer_dense_ffn: int


# ---------------------------------------------------------------- parameters


def attention_params(cfg: ModelConfig) -> int:
    """MLA weights of one layer (with the q/kv low-rank norms) plus its input RMSNorm."""
    h, d = cfg.n_heads, cfg.dim
    if cfg.q_lora_rank:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    else:
        q = d * h * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    out = h * cfg.v_head_dim * d
    return q + kv + out + d


def expert_params(cfg: ModelConfig) -> int:
    """One SwiGLU expert (w1, w3: dim -> moe_inter; w2: moe_inter -> dim)."""
    return 3 * cfg.dim * cfg.moe_inter_dim


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d = cfg.dim
    attn = attention_params(cfg)
    dense_ffn = 3 * d * cfg.dense_inter_dim + d  # + post-attention RMSNorm
    gate = cfg.n_routed_experts * d
    moe = (cfg.n_routed_experts + cfg.n_shared_experts) * expert_params(cfg) + gate + d
    emb = cfg.vocab_size * d
    layers = cfg.n_dense_layers * (attn + dense_ffn) + cfg.n_moe_layers * (attn + moe)
    total = layers + 2 * emb + d  # + embedding, head and final norm
    moe_active = (cfg.n_shared_experts + cfg.n_activated_experts) * expert_params(cfg) + gate + d
    active = cfg.n_dense_layers * (attn + dense_ffn) + cfg.n_moe_layers * (attn + moe_active) + emb + d
    mtp_one = 2 * d + 2 * d * d + attn + moe + d  # enorm, hnorm, eh_proj, one MoE block, final norm
    return ParamCounts(
        total=total,
        active=active,
        active_matmul=active,
        embedding=emb,
        expert=cfg.n_moe_layers * cfg.n_routed_experts * expert_params(cfg),
        mtp=cfg.mtp_depth * mtp_one,
        per_layer_attention=attn,
        per_layer_moe=moe,
        per_layer_dense_ffn=dense_ffn,
    )


# ---------------------------------------------------------------- model FLOPs (MFU convention)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward + backward attention FLOPs per token over all layers (3x the forward, the 6N convention)."""
    keys = seq_len / 2 if causal else seq_len
    return 3 * 2.0 * keys * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.n_layers


def model_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """6 x active matmul parameters + attention: 250.5 GFLOPs for V3 at seq 4096 (causal)."""
    return 6.0 * param_counts(cfg).active_matmul + attention_flops_per_token(cfg, seq_len, causal)


# ---------------------------------------------------------------- blocks of a micro-batch


def _attention_gemms(cfg: ModelConfig, t: int) -> list[Gemm]:
    h, d = cfg.n_heads, cfg.dim
    g: list[Gemm] = []
    if cfg.q_lora_rank:
        g.append(Gemm("wq_a", t, cfg.q_lora_rank, d))
        g.append(Gemm("wq_b", t, h * cfg.qk_head_dim, cfg.q_lora_rank, recompute=True))
    else:
        g.append(Gemm("wq", t, h * cfg.qk_head_dim, d))
    g.append(Gemm("wkv_a", t, cfg.kv_lora_rank + cfg.qk_rope_head_dim, d))
    g.append(Gemm("wkv_b", t, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, recompute=True))
    g.append(Gemm("wo", t, d, h * cfg.v_head_dim))
    return g


def _attention_elementwise_fwd(cfg: ModelConfig) -> float:
    """Bytes per token moved by the attention half's element-wise ops in forward.

    RMSNorm + FP8 cast of the input (read BF16, write FP8), q/kv low-rank norms + casts, RoPE and the
    assembly of q = [q_nope, q_pe] and k = [k_nope, k_pe], v from the up-projection outputs (read + write),
    the FP8 cast of the attention output before wo, and the residual add (read 2, write 1).
    """
    d, h = cfg.dim, cfg.n_heads
    qk, v, nope = cfg.qk_head_dim, cfg.v_head_dim, cfg.qk_nope_head_dim
    b = 3 * d  # norm + cast
    b += 3 * cfg.q_lora_rank + 3 * cfg.kv_lora_rank + 4 * cfg.qk_rope_head_dim
    b += 2 * BF16 * h * qk  # q assembly with RoPE
    b += BF16 * h * (nope + v) + BF16 * h * (qk + v)  # k, v assembly from wkv_b's output
    b += 3 * h * v  # cast of the attention output
    b += 3 * BF16 * d  # residual
    return float(b)


def _ffn_elementwise_fwd(d: int, inter: int, copies: float) -> float:
    """RMSNorm + cast of the FFN input; SwiGLU + cast per copy (read 2 x inter BF16, write inter FP8)."""
    return float(3 * d + copies * 5 * inter + 3 * BF16 * d)


def _moe_elementwise_fwd(cfg: ModelConfig) -> float:
    """Routing, the FP8 cast + permute of the dispatched copies, SwiGLU per copy, the weighted combine."""
    d, k = cfg.dim, cfg.n_activated_experts
    b = _ffn_elementwise_fwd(d, cfg.moe_inter_dim, k + cfg.n_shared_experts)
    b += 2 * BF16 * d  # BF16 copy of the normed input for the router
    b += 3 * FP32 * cfg.n_routed_experts  # scores, sigmoid, top-k
    b += 3 * d + 2 * k * (d + d // 32)  # FP8 cast, then permute of the received copies (read + write)
    b += k * BF16 * d + BF16 * d  # weighted sum of the k returned copies
    b += 3 * BF16 * d  # shared + routed add
    return float(b)


# Backward moves about twice the forward's element-wise bytes (each op reads its saved input and the incoming
# gradient and writes a gradient) plus the forward of what is recomputed (norms, SwiGLU): 2x + 1x.
BWD_ELEMENTWISE_FACTOR = 3.0


def _activation_bytes_attention(cfg: ModelConfig, act: int) -> float:
    """Per token: layer input (its norm is recomputed), compressed q/kv (the up-projections are recomputed,
    so q, k, v are not kept), the attention output once (DeepSeek-V3 caches the input of the Linear after
    attention in a 1-byte format; FlashAttention's backward reads it too) and the softmax LSE."""
    d, h = cfg.dim, cfg.n_heads
    b = BF16 * d + BF16 * (cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    b += act * h * cfg.v_head_dim + FP32 * h
    return float(b)


def _activation_bytes_ffn(d: int, inter: int, copies: float, act: int) -> float:
    """Per token: FFN input (BF16, norm recomputed), per copy the FP8/BF16 GEMM input and SwiGLU input."""
    return float(BF16 * d + act * d + copies * act * (d + 2 * inter))


def model_blocks(
    cfg: ModelConfig,
    *,
    tokens: int,
    seq_len: int,
    ep: int = 1,
    act_bytes: int = FP8,
) -> list[Block]:
    """The blocks of the model in pipeline order for a micro-batch of ``tokens`` tokens on one GPU.

    ``seq_len``: the sequence the tokens belong to (attention context; ``tokens`` may be a slice of it).
    ``ep``: expert-parallel size; a GPU holds n_routed_experts / ep experts and, with balanced routing,
    computes tokens x top-k expert rows per MoE block (the copies the EP group sends it).
    ``act_bytes``: bytes per cached activation element of GEMM inputs (1 for FP8 caching, 2 for BF16).
    Order: embedding, dense layers, MoE layers, output head (+ loss), MTP modules.
    """
    if tokens <= 0 or seq_len <= 0:
        raise ValueError(f"{tokens=} and {seq_len=} must be positive")
    if cfg.n_routed_experts % ep:
        raise ValueError(f"{ep=} must divide n_routed_experts={cfg.n_routed_experts}")
    d, t, v = cfg.dim, tokens, cfg.vocab_size
    counts = param_counts(cfg)
    attn_params = counts.per_layer_attention
    attn = Attention(t, seq_len, cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim, causal=True)
    attn_model_flops = attention_flops_per_token(cfg, seq_len) / cfg.n_layers * t
    attn_fwd_bytes = _attention_elementwise_fwd(cfg) * t

    blocks: list[Block] = []
    blocks.append(
        Block(
            "embed",
            elementwise_fwd_bytes=2 * BF16 * d * t,  # gather rows, write activations
            elementwise_bwd_bytes=(BF16 + 2 * FP32) * d * t,  # scatter-add into the FP32 grad
            params_replicated=counts.embedding,
            activation_bytes=0.0,
        )
    )

    dense_gemms = (
        Gemm("ffn_w13", t, 2 * cfg.dense_inter_dim, d),
        Gemm("ffn_w2", t, d, cfg.dense_inter_dim),
    )
    for _ in range(cfg.n_dense_layers):
        fwd = attn_fwd_bytes + _ffn_elementwise_fwd(d, cfg.dense_inter_dim, 1) * t
        blocks.append(
            Block(
                "dense",
                gemms=(*_attention_gemms(cfg, t), *dense_gemms),
                attention=attn,
                elementwise_fwd_bytes=fwd,
                elementwise_bwd_bytes=BWD_ELEMENTWISE_FACTOR * fwd,
                params_replicated=attn_params + counts.per_layer_dense_ffn,
                activation_bytes=t
                * (
                    _activation_bytes_attention(cfg, act_bytes)
                    + _activation_bytes_ffn(d, cfg.dense_inter_dim, 1, act_bytes)
                ),
                model_flops=6.0 * (attn_params + counts.per_layer_dense_ffn) * t + attn_model_flops,
            )
        )

    k, inter, local = cfg.n_activated_experts, cfg.moe_inter_dim, cfg.n_routed_experts // ep
    moe_gemms = (
        Gemm("router", t, cfg.n_routed_experts, d, fp8=False),
        Gemm("shared_w13", t, 2 * inter * cfg.n_shared_experts, d, overlaps_comm=True),
        Gemm("shared_w2", t, d, inter * cfg.n_shared_experts, overlaps_comm=True),
        Gemm("experts_w13", t * k, 2 * inter, d, groups=local),
        Gemm("experts_w2", t * k, d, inter, groups=local),
    )
    moe_active = (cfg.n_shared_experts + k) * expert_params(cfg) + cfg.n_routed_experts * d + d
    moe_replicated = counts.per_layer_moe - cfg.n_routed_experts * expert_params(cfg)

    def moe_block(kind: str, extra_gemms: tuple[Gemm, ...] = (), extra_replicated: int = 0) -> Block:
        fwd = attn_fwd_bytes + _moe_elementwise_fwd(cfg) * t
        return Block(
            kind,
            gemms=(*extra_gemms, *_attention_gemms(cfg, t), *moe_gemms),
            attention=attn,
            elementwise_fwd_bytes=fwd,
            elementwise_bwd_bytes=BWD_ELEMENTWISE_FACTOR * fwd,
            all_to_all=AllToAll(t, d, k, cfg.n_routed_experts) if ep > 1 else None,
            params_replicated=attn_params + moe_replicated + extra_replicated,
            params_expert=cfg.n_routed_experts * expert_params(cfg),
            activation_bytes=t
            * (
                _activation_bytes_attention(cfg, act_bytes)
                + _activation_bytes_ffn(d, inter, k + cfg.n_shared_experts, act_bytes)
            ),
            model_flops=(6.0 * (attn_params + moe_active) * t + attn_model_flops) if kind == "moe" else 0.0,
        )

    blocks.extend(moe_block("moe") for _ in range(cfg.n_moe_layers))

    head = Gemm("head", t, v, d, fp8=False)
    loss_bytes = 2 * BF16 * v * t  # logits written by the head, read by the fused softmax cross-entropy
    blocks.append(
        Block(
            "head",
            gemms=(head,),
            elementwise_fwd_bytes=3 * BF16 * d * t + loss_bytes,  # final norm + loss
            elementwise_bwd_bytes=3 * BF16 * d * t + 2 * loss_bytes,
            params_replicated=counts.embedding + d,
            activation_bytes=t * (BF16 * d + BF16 * d),  # head input; the loss keeps only per-token stats
            model_flops=6.0 * (counts.embedding + d) * t,
        )
    )
    for _ in range(cfg.mtp_depth):
        eh = Gemm("mtp_eh_proj", t, d, 2 * d)
        mtp = moe_block("mtp", extra_gemms=(eh, head), extra_replicated=2 * d + 2 * d * d + d)
        extra = (4 * BF16 * d + 3 * BF16 * d) * t + loss_bytes  # enorm/hnorm/concat, final norm, loss
        blocks.append(
            Block(
                "mtp",
                gemms=mtp.gemms,
                attention=mtp.attention,
                elementwise_fwd_bytes=mtp.elementwise_fwd_bytes + extra,
                elementwise_bwd_bytes=mtp.elementwise_bwd_bytes + 2 * extra,
                all_to_all=mtp.all_to_all,
                params_replicated=mtp.params_replicated,
                params_expert=mtp.params_expert,
                activation_bytes=mtp.activation_bytes + t * 3 * BF16 * d,
                model_flops=0.0,
            )
        )
    return blocks
