"""DeepSeek-V3-style model configuration and presets (shared by the model, the training app and the plan).

Presets:
  tiny     trains on 2 CPU cores in minutes (byte-level vocabulary)
  small    a larger CPU/GPU smoke model
  v3-671b  the published DeepSeek-V3 shape (arXiv 2412.19437); never instantiated on CPU, only on the meta
           device (parameter counts) and by the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    dim: int  # hidden size
    n_layers: int  # transformer blocks of the main model (MTP modules not included)
    n_dense_layers: int  # the first blocks use a dense FFN instead of MoE
    n_heads: int
    q_lora_rank: int  # 0 = no query compression
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    dense_inter_dim: int  # FFN width of the dense blocks
    moe_inter_dim: int  # FFN width of each routed / shared expert
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int  # top-k
    n_expert_groups: int  # node-limited routing: experts split into groups (one per node at full scale)
    n_limited_groups: int  # each token reaches at most this many groups
    route_scale: float
    mtp_depth: int  # multi-token-prediction modules (shared embedding and head)
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def with_(self, **changes) -> ModelConfig:
        return replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=256,
        dim=64,
        n_layers=4,
        n_dense_layers=1,
        n_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        dense_inter_dim=128,
        moe_inter_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=1.0,
        mtp_depth=1,
        max_seq_len=128,
    ),
    "small": ModelConfig(
        name="small",
        vocab_size=256,
        dim=256,
        n_layers=8,
        n_dense_layers=1,
        n_heads=8,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        dense_inter_dim=768,
        moe_inter_dim=128,
        n_routed_experts=16,
        n_shared_experts=1,
        n_activated_experts=4,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=1.0,
        mtp_depth=1,
        max_seq_len=256,
    ),
    "v3-671b": ModelConfig(
        name="v3-671b",
        vocab_size=129280,
        dim=7168,
        n_layers=61,
        n_dense_layers=3,
        n_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        dense_inter_dim=18432,
        moe_inter_dim=2048,
        n_routed_experts=256,
        n_shared_experts=1,
        n_activated_experts=8,
        n_expert_groups=8,
        n_limited_groups=4,
        route_scale=2.5,
        mtp_depth=1,
        max_seq_len=4096,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is not one of {sorted(PRESETS)}")
    return PRESETS[name]
