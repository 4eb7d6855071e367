"""Throughput accounting: model FLOPs per token, the peak they are compared with, MFU.

    fpt = flops_per_token(cfg, seq_len)        # training FLOPs per token (forward + backward)
    peak = peak_flops(device)                  # FLOP/s of one device (table on GPU, measured on CPU)
    mfu = fpt * tokens_per_s / (peak * n_devices)

FLOPs per token follow DeepSeek-V3's accounting (ANCHORS.md: 250 GFLOPs/token at seq 4096 for 671B):
6 x the active matmul parameters (every Linear a token passes through, the output head included, the
embedding lookup not) plus causal attention, 3 x (QK^T + PV) = 3 * n_heads * seq * (d_qk + d_v) per layer
(half the square of a full attention). MTP modules are counted too when the model has them (DeepSeek's
figure has none), so the figure is the work this model really does.
"""

from __future__ import annotations

import time

import torch

from examples.deepseek_v3.config import ModelConfig

# Dense BF16 peak FLOP/s by GPU name (vendor datasheets; H800 = H100 SXM compute).
GPU_PEAK_BF16 = {
    "H100": 989e12,
    "H800": 989e12,
    "H200": 989e12,
    "H20": 148e12,
    "A100": 312e12,
    "A800": 312e12,
}

_cpu_peak: float | None = None


def active_matmul_params(cfg: ModelConfig, with_mtp: bool = True) -> int:
    """Matmul parameters one token uses: attention, dense or (shared + top-k routed) FFN, gates, head."""
    d = cfg.dim
    q = (
        d * cfg.q_lora_rank + cfg.q_lora_rank * cfg.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank
        else d * cfg.n_heads * cfg.qk_head_dim
    )
    attn = (
        q
        + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        + cfg.n_heads * cfg.v_head_dim * d
    )
    dense_ffn = 3 * d * cfg.dense_inter_dim
    moe_ffn = (
        3 * d * cfg.moe_inter_dim * (cfg.n_shared_experts + cfg.n_activated_experts)
        + d * cfg.n_routed_experts
    )
    layers = cfg.n_dense_layers * (attn + dense_ffn) + cfg.n_moe_layers * (attn + moe_ffn)
    mtp = cfg.mtp_depth * (2 * d * d + attn + moe_ffn + d * cfg.vocab_size) if with_mtp else 0
    return layers + d * cfg.vocab_size + mtp


def flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool = True) -> float:
    """Training FLOPs per token: 6 * active matmul params + causal attention (forward + backward)."""
    n_attn_layers = cfg.n_layers + (cfg.mtp_depth if with_mtp else 0)
    attn = 3 * n_attn_layers * cfg.n_heads * seq_len * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6.0 * active_matmul_params(cfg, with_mtp) + attn


def peak_flops(device: torch.device, override_tflops: float | None = None) -> tuple[float, str]:
    """(FLOP/s of one device, where the figure comes from).

    GPU: the BF16 dense peak of the model named in the device name. CPU: a measured FP32 GEMM rate of
    this process (1024^3, best of 5), so a CPU "MFU" says how close the run gets to what one rank's share
    of the cores does on a plain GEMM.
    """
    if override_tflops:
        return override_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in GPU_PEAK_BF16.items():
            if key in name:
                return val, f"{key} BF16 dense peak"
        return 989e12, f"unknown GPU {name!r}: H100 BF16 peak assumed"
    global _cpu_peak
    if _cpu_peak is None:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _cpu_peak = 2 * 1024**3 / best
    return _cpu_peak, "measured CPU FP32 GEMM"
