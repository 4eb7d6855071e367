"""The 2,048-GPU DeepSeek-V3 training cost from first principles, and what-ifs around it.

    python -m examples.deepseek_v3.plan                 # V3 on 2,048 H800: table vs published, JSON, PNG
    python -m examples.deepseek_v3.plan --what-if       # schedules, precision, EP, GPUs, nodes per token
    python -m examples.deepseek_v3.plan --model small --gpus 64 --pp 4 --ep 8 --global-batch 4096
    python -m examples.deepseek_v3.plan --rates rates.json                 # efficiencies from plan.calibrate
    python -m examples.deepseek_v3.plan --gemm-bench bench/results/bench_fp8-*.json   # measured GEMM rates

Prints the plan (beside DeepSeek's published figures for the V3 run), the pipeline stages, the expert
exchange and memory per GPU; writes plan.json, a Chrome trace and a PNG of one step's timeline to --out.
The pricing itself is run.py (and the modules it lists).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

from examples.deepseek_v3.config import get_preset
from examples.deepseek_v3.plan.chunks import fb_time
from examples.deepseek_v3.plan.hardware import get_hardware
from examples.deepseek_v3.plan.pipeline import normalise_schedule
from examples.deepseek_v3.plan.rates import KernelRates
from examples.deepseek_v3.plan.run import (
    PUBLISHED,
    V3_CONTEXT_EXTENSION,
    ParallelConfig,
    PlanResult,
    RunConfig,
    plan,
    v3_run,
)

__all__ = ["main", "what_if"]  # the pricing API is re-exported by the package (plan/__init__.py)


# ------------------------------------------------------------------------------------------ report


_ROWS = [
    ("params_total", "parameters, total (B)", 1e-9),
    ("params_active", "parameters, active (B)", 1e-9),
    ("gflops_per_token", "GFLOPs per token (causal)", 1),
    ("step_s", "step time (s)", 1),
    ("phase_f_s", "  forward chunks alone (s)", 1),
    ("phase_b_s", "  backward chunks alone (s)", 1),
    ("phase_w_s", "  weight-gradient chunks (s)", 1),
    ("phase_fb_s", "  overlapped F&B pairs (s)", 1),
    ("bubble_s", "  bubble (s)", 1),
    ("optimizer_s", "  optimizer step (s)", 1),
    ("tokens_per_day", "tokens per day (B)", 1e-9),
    ("tflops_causal", "TFLOPS per GPU (causal)", 1),
    ("mfu_causal", "MFU causal, BF16 peak (%)", 100),
    ("mfu_noncausal", "MFU non-causal (%)", 100),
    ("gpu_hours_per_trillion", "GPU-hours per 1T tokens (K)", 1e-3),
    ("pretrain_gpu_hours", "pre-training GPU-hours (K)", 1e-3),
    ("context_extension_gpu_hours", "context extension GPU-hours (K)", 1e-3),
    ("total_gpu_hours", "total GPU-hours (M)", 1e-6),
    ("total_usd", "total cost ($M)", 1e-6),
    ("comm_per_step_s", "expert exchange per step (s)", 1),
    ("comm_hidden_fraction", "  of which hidden (%)", 100),
    ("memory_peak_gb", "memory per GPU, largest rank (GB)", 1),
]


def _fmt(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.4g}"


def table_rows(result: PlanResult, compare: bool) -> list[dict]:
    rows = []
    for key, label, scale in _ROWS:
        val = result.metrics[key]
        row = {"item": label, "plan": _fmt(val * scale)}
        if compare and key in PUBLISHED:
            pub = PUBLISHED[key]
            row["published"] = _fmt(pub * scale)
            row["plan/published"] = f"{val / pub:.3f}"
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))))
    for r in rows:
        cells = [str(r.get(c, "")) for c in cols]
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(cells, widths))))


def print_stages(result: PlanResult) -> None:
    s = result.step
    print(
        f"\nstages ({s.sim.schedule}, {s.num_microbatches} micro-batches of {s.micro_batch_tokens} tokens):"
    )
    for i, (k, st) in enumerate(zip(s.stage_kinds, s.stages)):
        print(
            f"  stage {i:2d} {k:28s} F {st.f * 1e3:7.1f}  B {st.b * 1e3:7.1f}  W {st.w * 1e3:6.1f}  "
            f"F&B(self) {fb_time(st, st) * 1e3:7.1f} ms   "
            f"comm F {st.comm_f * 1e3:6.1f} B {st.comm_b * 1e3:6.1f}"
        )
    c = s.comm
    if c:
        ms = {k: v * 1e3 for k, v in c.items() if k.endswith("_s")}
        print(
            f"  per MoE layer: dispatch+combine fwd {ms['per_moe_layer_fwd_s']:.2f} ms, "
            f"bwd {ms['per_moe_layer_bwd_s']:.2f} ms "
            f"vs compute {ms['per_moe_layer_compute_fwd_bwd_s']:.2f} ms: "
            f"{c['hidden_in_fb_fraction']:.0%} hidden in an F&B pair; "
            f"alone, {ms['exposed_alone_fwd_s']:.2f} + {ms['exposed_alone_bwd_s']:.2f} ms exposed"
        )
    m = result.metrics
    mem = s.memory[max(range(len(s.memory)), key=lambda i: s.memory[i]["total"])]
    gb = {k: v / 1e9 for k, v in mem.items()}
    print(
        f"  memory per GPU (largest rank): {gb['total']:.1f} GB = weights {gb['weights']:.1f} "
        f"+ grads {gb['grads']:.1f} + optimizer {gb['optimizer']:.1f} + activations {gb['activations']:.1f} "
        f"({m['peak_in_flight_microbatches']} micro-batches) + buffers {gb['comm_buffers']:.1f}; "
        f"HBM {result.config.hardware.hbm_gb:.0f} GB"
    )


# ------------------------------------------------------------------------------------------ what-if


def what_if(base: RunConfig) -> list[dict]:
    """One row per variant of ``base``: schedules at its PP, precision, EP sizes, GPUs, nodes per token."""
    p = base.parallel
    variants: list[tuple[str, RunConfig]] = [("baseline", base)]
    for s in ("1f1b", "zb1p", "dualpipe"):
        if s != normalise_schedule(p.schedule):
            variants.append((f"schedule={s}", base.with_(parallel=replace(p, schedule=s))))
    other = "bf16" if base.precision == "fp8" else "fp8"
    variants.append((f"precision={other}", base.with_(precision=other)))
    for ep in (8, 16, 32, 64, 128):
        if ep != p.ep and p.dp % ep == 0 and base.model.n_routed_experts % ep == 0:
            variants.append((f"ep={ep}", base.with_(parallel=replace(p, ep=ep))))
    for name in ("h800", "h100", "h200"):
        if name != base.hardware.name:
            variants.append((f"hardware={name}", base.with_(hardware=get_hardware(name))))
    for limit in (1, 2, 4, 8):
        if limit != (p.node_limit or base.model.n_limited_groups):
            variants.append((f"nodes_per_token={limit}", base.with_(parallel=replace(p, node_limit=limit))))
    rows = []
    for name, cfg in variants:
        try:
            m = plan(cfg, with_phases=False).metrics
        except ValueError as e:
            rows.append({"variant": name, "error": str(e)})
            continue
        rows.append(
            {
                "variant": name,
                "step_s": m["step_s"],
                "bubble_s": m["bubble_s"],
                "bubble_busiest_s": m["bubble_busiest_rank_s"],
                "hidden_%": 100 * m["comm_hidden_fraction"],
                "mfu_causal_%": 100 * m["mfu_causal"],
                "gpu_h_per_T_K": m["gpu_hours_per_trillion"] / 1e3,
                "mem_GB": m["memory_peak_gb"],
                "fits": m["memory_fits"],
            }
        )
    return rows


# ------------------------------------------------------------------------------------------ CLI


def _config_from_args(a: argparse.Namespace) -> RunConfig:
    model = get_preset(a.model)
    hw = get_hardware(a.hardware)
    if a.comm_sms is not None:
        hw = hw.with_(comm_sms=a.comm_sms)
    rates = KernelRates.default()
    if a.rates:
        from examples.deepseek_v3.plan.calibrate import rates_from_json

        rates = rates_from_json(a.rates)
    if a.ib_efficiency is not None:
        rates = rates.with_(ib_efficiency=a.ib_efficiency)
    if a.gemm_bench:
        from fp8.cost import load_bench_gemm_rates

        rates = rates.with_gemm_measurements(load_bench_gemm_rates(a.gemm_bench))
    is_v3 = model.name == "v3-671b"
    parallel = ParallelConfig(
        num_gpus=a.gpus,
        pp=a.pp,
        ep=a.ep,
        schedule=a.schedule,
        micro_batch_tokens=a.micro_batch_tokens,
        node_limit=a.nodes_per_token,
        zero_stage=a.zero,
    )
    seq_len = a.seq_len or (4096 if is_v3 else model.max_seq_len)
    return RunConfig(
        model=model,
        hardware=hw,
        parallel=parallel,
        precision=a.precision,
        seq_len=seq_len,
        global_batch=a.global_batch,
        tokens=a.tokens,
        extra_phases=V3_CONTEXT_EXTENSION if (is_v3 and not a.no_extra_phases) else (),
        other_gpu_hours=a.other_gpu_hours
        if a.other_gpu_hours is not None
        else (PUBLISHED["post_training_gpu_hours"] if is_v3 else 0.0),
        rates=rates,
        price_per_gpu_hour=a.price,
    )


def _is_v3_baseline(cfg: RunConfig) -> bool:
    base = v3_run()
    return (
        cfg.model == base.model
        and cfg.hardware == base.hardware
        and cfg.parallel == base.parallel
        and (cfg.precision, cfg.seq_len, cfg.global_batch, cfg.tokens) == ("fp8", 4096, 15360, 14.8e12)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="v3-671b", help="model preset (examples/deepseek_v3/config.py)")
    p.add_argument("--hardware", default="h800", help="h800 | h100 | h200")
    p.add_argument("--gpus", type=int, default=2048)
    p.add_argument("--pp", type=int, default=16)
    p.add_argument("--ep", type=int, default=64)
    p.add_argument("--schedule", default="dualpipe", help="1f1b | zb1p | dualpipe | dualpipev")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="default: one sequence")
    p.add_argument("--nodes-per-token", type=int, default=None, help="default: the model's n_limited_groups")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage 0-3")
    p.add_argument("--precision", default="fp8", choices=("fp8", "bf16"))
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=15360, help="sequences per step")
    p.add_argument("--tokens", type=float, default=14.8e12, help="pre-training token budget")
    p.add_argument("--no-extra-phases", action="store_true", help="skip V3's context-extension phases")
    p.add_argument("--other-gpu-hours", type=float, default=None, help="added as is (V3: 5K post-training)")
    p.add_argument("--price", type=float, default=None, help="USD per GPU-hour (default: the hardware's)")
    p.add_argument("--comm-sms", type=int, default=None, help="SMs reserved for communication")
    p.add_argument("--rates", default=None, help="kernel efficiencies JSON from plan.calibrate")
    p.add_argument("--ib-efficiency", type=float, default=None, help="achieved share of InfiniBand bandwidth")
    p.add_argument(
        "--gemm-bench", nargs="*", default=None, help="bench/results JSON with measured GEMM rates"
    )
    p.add_argument("--what-if", action="store_true", help="also price the what-if variants")
    p.add_argument("--out", default="outputs/plan", help="directory for plan.json, timeline.png, trace.json")
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args(argv)
    cfg = _config_from_args(a)
    result = plan(cfg)
    compare = _is_v3_baseline(cfg)
    print(
        f"{cfg.model.name} on {cfg.parallel.num_gpus} {cfg.hardware.name.upper()}: PP{cfg.parallel.pp} "
        f"{cfg.parallel.schedule}, EP{cfg.parallel.ep}, DP{cfg.parallel.dp}, ZeRO-{cfg.parallel.zero_stage}, "
        f"{cfg.precision.upper()}, seq {cfg.seq_len}, batch {cfg.global_batch}; phases of rank "
        f"{result.step.report_rank} (largest bubble)"
    )
    print_table(table_rows(result, compare))
    print_stages(result)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = result.to_dict()
    if a.what_if:
        rows = what_if(cfg)
        print(
            "\nwhat-if (each row changes one thing; step includes the optimizer; bubble: largest per-rank"
            " idle time; bubble_busiest: idle time of the busiest rank; hidden: share of the expert exchange"
            " hidden behind compute):"
        )
        print_table([{k: _fmt(v) if isinstance(v, float) else str(v) for k, v in r.items()} for r in rows])
        payload["what_if"] = rows
    (out / "plan.json").write_text(json.dumps(payload, indent=2, default=_json_default))
    result.step.sim.result.write_chrome_trace(out / "trace.json")
    if not a.no_png:
        result.step.sim.result.plot(out / "timeline.png")
    print(
        f"\nwrote {out / 'plan.json'}, {out / 'trace.json'}"
        + ("" if a.no_png else f", {out / 'timeline.png'}")
    )
    return 0


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
