"""Kernel efficiencies from a torch.profiler Chrome trace of one forward+backward chunk pair of MoE layers.

    python -m examples.deepseek_v3.plan.calibrate --trace train.json     # DeepSeek's public profile
    python -m examples.deepseek_v3.plan.calibrate --trace my.json --layers 4 --tokens 4096 --json out.json

This is how the plan's default efficiencies (rates.py) were measured, and how a user calibrates the plan
on their own kernels: profile one forward and one backward of ``--layers`` MoE layers of ``--tokens`` tokens
on one GPU, then pass the JSON this writes to ``plan --rates``.

Kernels are classed by name (regular expressions below; DeepSeek's internal kernels, DeepGEMM, CUTLASS,
FlashAttention, cuBLAS). Every kernel on a stream that runs expert-parallel communication kernels is
communication and is left out. Per class: efficiency = work counted by model.py / summed kernel time /
peak, where the peak of compute classes is scaled by the SM share left to compute while the profiled
communication ran (``--comm-sms``).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from examples.deepseek_v3.config import ModelConfig, get_preset
from examples.deepseek_v3.plan.hardware import Hardware, get_hardware
from examples.deepseek_v3.plan.model import Block, model_blocks
from examples.deepseek_v3.plan.rates import KernelRates
from fp8.cost import GemmCostModel, GemmEfficiency
from moe_comm.cost import Routing, combine_cost, dispatch_cost

COMM_KERNEL = re.compile(r"(dpsk::ep::|deep_ep|internode::|intranode::|nccl|notify_dispatch)", re.I)
# Data-moving exchange kernels (notify/barrier and layout kernels excluded: they mostly wait for peers).
TRANSFER_KERNEL = re.compile(r"(dispatch|combine)(?!.*layout)", re.I)
NOT_TRANSFER = re.compile(r"notify|layout|cast", re.I)
CLASSES: list[tuple[str, re.Pattern]] = [
    ("attention_bwd", re.compile(r"flash.*bwd|FlashAttnBwd|attn.*backward", re.I)),
    ("attention_fwd", re.compile(r"flash|fmha|attn_ws", re.I)),
    ("fp8_wgrad", re.compile(r"dptp128c_acc|wgrad|k_grouped", re.I)),
    ("fp8_grouped", re.compile(r"m_grouped", re.I)),
    ("fp8_dense", re.compile(r"fp8.*gemm|gemm.*fp8|ptp128c|fp8_gemm", re.I)),
    ("bf16_gemm", re.compile(r"gemm_bf16|bf16.*gemm|nvjet|cublas", re.I)),
]


@dataclass(frozen=True)
class TraceTimes:
    """Summed kernel seconds per class (communication streams excluded) and the traced window."""

    seconds: dict[str, float]
    comm_seconds: float  # every kernel on communication streams
    transfer_seconds: float  # of which dispatch/combine data movement
    window_s: float


def classify(name: str) -> str:
    for cls, pattern in CLASSES:
        if pattern.search(name):
            return cls
    return "elementwise"


def read_trace(path: str | Path) -> TraceTimes:
    """Sum GPU kernel durations of a Chrome trace (torch.profiler ``export_chrome_trace``) per class."""
    payload = json.loads(Path(path).read_text())
    events = payload["traceEvents"] if isinstance(payload, dict) else payload
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        raise ValueError(f"{path}: no GPU kernel events (cat 'kernel') in the trace")
    comm_streams = {e.get("tid") for e in kernels if COMM_KERNEL.search(e["name"])}
    seconds: dict[str, float] = defaultdict(float)
    comm = transfer = 0.0
    for e in kernels:
        if e.get("tid") in comm_streams:
            comm += e["dur"] * 1e-6
            if TRANSFER_KERNEL.search(e["name"]) and not NOT_TRANSFER.search(e["name"]):
                transfer += e["dur"] * 1e-6
        else:
            seconds[classify(e["name"])] += e["dur"] * 1e-6
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    return TraceTimes(dict(seconds), comm, transfer, (end - start) * 1e-6)


def chunk_work(block: Block, layers: int, gemm: GemmCostModel | None = None) -> dict[str, float]:
    """FLOPs (bytes for element-wise) per class of one forward + one backward of ``layers`` blocks.

    With ``gemm``, each GEMM pass's FLOPs are divided by its occupancy (fp8.cost: GEMMs too small to fill
    the SMs), so that the efficiency measured here is the one ``GemmCostModel`` multiplies back.
    """
    w: dict[str, float] = defaultdict(float)

    def occ(g, kind: str) -> float:
        return 1.0 if gemm is None else gemm.occupancy(g.m, g.n, g.k, kind=kind, groups=g.groups)

    for g in block.gemms:
        fwd = g.flops / occ(g, "fprop")
        passes = fwd * (2 if g.recompute else 1) + g.flops / occ(g, "dgrad")
        wgrad = g.flops / occ(g, "wgrad")
        if not g.fp8:
            w["bf16_gemm"] += (passes + wgrad) * layers
            continue
        w["fp8_grouped" if g.groups > 1 else "fp8_dense"] += passes * layers
        w["fp8_wgrad"] += wgrad * layers
    if block.attention is not None:
        w["attention_fwd"] += block.attention.fwd_flops * layers
        w["attention_bwd"] += block.attention.bwd_flops * layers
    w["elementwise"] += (block.elementwise_fwd_bytes + block.elementwise_bwd_bytes) * layers
    return dict(w)


def calibrate(
    times: TraceTimes,
    cfg: ModelConfig,
    hw: Hardware,
    *,
    layers: int,
    tokens: int,
    seq_len: int,
    ep: int,
    node_limit: int | None = None,
    comm_sms: int | None = None,
) -> tuple[KernelRates, list[dict]]:
    """Efficiencies per class from the trace times; returns the rates and a row per class for printing."""
    block = next(b for b in model_blocks(cfg, tokens=tokens, seq_len=seq_len, ep=ep) if b.kind == "moe")
    comm_sms = hw.comm_sms if comm_sms is None else comm_sms
    smf = (hw.num_sms - comm_sms) / hw.num_sms if times.comm_seconds > 0 else 1.0
    gemm = GemmCostModel(hw.fp8_tflops, hw.bf16_tflops, hw.hbm_tbps, sm_fraction=smf, num_sms=hw.num_sms)
    work = chunk_work(block, layers, gemm)
    peaks = {
        "fp8_dense": hw.fp8_tflops * 1e12 * smf,
        "fp8_grouped": hw.fp8_tflops * 1e12 * smf,
        "fp8_wgrad": hw.fp8_tflops * 1e12 * smf,
        "bf16_gemm": hw.bf16_tflops * 1e12 * smf,
        "attention_fwd": hw.bf16_tflops * 1e12 * smf,
        "attention_bwd": hw.bf16_tflops * 1e12 * smf,
        "elementwise": hw.hbm_tbps * 1e12,
    }
    default = KernelRates.default()
    fallback = {
        "fp8_dense": default.gemm.fp8_dense,
        "fp8_grouped": default.gemm.fp8_grouped,
        "fp8_wgrad": default.gemm.fp8_wgrad,
        "bf16_gemm": default.gemm.bf16,
        "attention_fwd": default.attention_fwd,
        "attention_bwd": default.attention_bwd,
        "elementwise": default.elementwise,
    }
    eff: dict[str, float] = {}
    rows = []
    for cls, peak in peaks.items():
        t = times.seconds.get(cls, 0.0)
        if t > 0 and work.get(cls, 0.0) > 0:
            eff[cls] = min(1.0, work[cls] / t / peak)
        else:
            eff[cls] = fallback[cls]  # class absent from the trace: keep the default
        unit = "TB/s" if cls == "elementwise" else "TFLOPS"
        rows.append(
            {
                "class": cls,
                "kernel_ms": t * 1e3,
                "work": work.get(cls, 0.0),
                f"rate_{unit}": work.get(cls, 0.0) / t / 1e12 if t else float("nan"),
                "efficiency": eff[cls],
                "measured": t > 0,
            }
        )
    # A GEMM runs at least as efficiently as FlashAttention's forward on the same BF16 tensor cores; a
    # trace's BF16 GEMMs may all be small (V3's router: N or K = 256), so the larger of the two is used.
    bf16 = max(eff["bf16_gemm"], eff["attention_fwd"])
    # Exchange kernels: InfiniBand bytes of one forward (FP8 dispatch + BF16 combine) and one backward (two
    # BF16 exchanges) per layer, as moe_comm.cost counts them, over the data-moving kernels' time.
    ib_eff = default.ib_efficiency
    if ep > 1 and times.transfer_seconds > 0:
        topo = hw.topology(nvlink_efficiency=1.0, ib_efficiency=1.0)
        route = Routing(cfg.n_routed_experts, cfg.n_activated_experts, ep, node_limit)
        kw = dict(tokens=tokens, hidden=cfg.dim)
        ib = dispatch_cost(topo, route, payload="fp8", **kw).ib_bytes
        ib += 3 * combine_cost(topo, route, payload="bf16", **kw).ib_bytes
        ib_bytes = ib * layers
        ib_eff = min(1.0, ib_bytes / times.transfer_seconds / (hw.ib_gbps * 1e9))
        rows.append(
            {
                "class": "ib_transfer",
                "kernel_ms": times.transfer_seconds * 1e3,
                "work": ib_bytes,
                "rate_GB/s": ib_bytes / times.transfer_seconds / 1e9,
                "efficiency": ib_eff,
                "measured": True,
            }
        )
    rates = KernelRates(
        ib_efficiency=ib_eff,
        gemm=GemmEfficiency(
            fp8_dense=eff["fp8_dense"],
            fp8_grouped=eff["fp8_grouped"],
            fp8_wgrad=eff["fp8_wgrad"],
            bf16=bf16,
            source="calibrated from a trace",
        ),
        attention_fwd=eff["attention_fwd"],
        attention_bwd=eff["attention_bwd"],
        elementwise=eff["elementwise"],
        source="calibrated from a trace",
    )
    return rates, rows


def rates_from_json(path: str | Path) -> KernelRates:
    """Read the ``rates`` object this tool writes (``--json``), for ``plan --rates``."""
    d = json.loads(Path(path).read_text())
    d = d.get("rates", d)
    g = d["gemm"]
    return KernelRates(
        gemm=GemmEfficiency(
            fp8_dense=g["fp8_dense"],
            fp8_grouped=g["fp8_grouped"],
            fp8_wgrad=g["fp8_wgrad"],
            bf16=g["bf16"],
            source=g.get("source", str(path)),
        ),
        attention_fwd=d["attention_fwd"],
        attention_bwd=d["attention_bwd"],
        elementwise=d["elementwise_hbm"],
        ib_efficiency=d.get("ib_efficiency", KernelRates.default().ib_efficiency),
        nvlink_efficiency=d.get("nvlink_efficiency", KernelRates.default().nvlink_efficiency),
        source=d.get("source", str(path)),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, help="Chrome trace JSON of one fwd+bwd chunk pair")
    p.add_argument("--model", default="v3-671b", help="model preset of the traced layers")
    p.add_argument("--hardware", default="h800")
    p.add_argument("--layers", type=int, default=4, help="MoE layers in each traced chunk")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the traced micro-batch")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--ep", type=int, default=64)
    p.add_argument("--node-limit", type=int, default=4, help="nodes per token of node-limited routing")
    p.add_argument("--comm-sms", type=int, default=None, help="SMs the communication used (default: hw's)")
    p.add_argument("--json", default=None, help="write the rates here (for plan --rates)")
    a = p.parse_args(argv)
    times = read_trace(a.trace)
    rates, rows = calibrate(
        times,
        get_preset(a.model),
        get_hardware(a.hardware),
        layers=a.layers,
        tokens=a.tokens,
        seq_len=a.seq_len,
        ep=a.ep,
        node_limit=a.node_limit,
        comm_sms=a.comm_sms,
    )
    print(
        f"window {times.window_s * 1e3:.1f} ms, "
        f"communication-stream kernels {times.comm_seconds * 1e3:.1f} ms"
    )
    for r in rows:
        rate = r.get("rate_TFLOPS", r.get("rate_TB/s", r.get("rate_GB/s")))
        print(
            f"{r['class']:>14}  {r['kernel_ms']:8.2f} ms  work {r['work']:.4g}  rate {rate:8.1f}  "
            f"efficiency {r['efficiency']:.3f}{'' if r['measured'] else '  (absent: default kept)'}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"rates": rates.to_dict(), "classes": rows}, indent=2))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
