"""BF16 vs FP8 training parity: the same model, data and seed trained in each precision; relative loss gaps.

    python -m examples.deepseek_v3.fp8_parity                       # tiny, 150 steps, seeds 0 1 2
    python -m examples.deepseek_v3.fp8_parity --model small --steps 300 --seeds 0 --json out.json

DeepSeek-V3 reports its FP8 run's loss within 0.25% of the BF16 run's (report section 3.3). Here the BF16
run uses autocast BF16 with FP32 master weights; the FP8 run additionally sends every Linear of the
blocks through ``fp8.convert_to_fp8`` (E4M3, 1x128 activation tiles, 128x128 weight blocks, FP32
accumulation, FP8 fprop / dgrad / wgrad), with the embedding, the output head and the router gates kept
high precision. On a CPU the FP8 GEMMs are the exact reference emulation of the kernels' numerics.

Figures: |mean FP8 loss - mean BF16 loss| / mean BF16 loss over the last ``--window`` steps (the end of
training, where DeepSeek compares), per seed and averaged over seeds. A short run of a tiny model is noisy:
any change of numerics moves the trajectory, so the same gap is also printed for BF16 against FP32 (the
noise floor of a precision change that nobody considers harmful). FP8 is at parity when its gap to BF16 is
of the size of BF16's gap to FP32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from examples.deepseek_v3.config import get_preset
from examples.deepseek_v3.layout import Layout
from examples.deepseek_v3.trainer import RunSpec, TrainSettings, train


def run_parity(
    model: str = "tiny",
    steps: int = 150,
    window: int = 20,
    seq_len: int = 64,
    batch: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    precisions: tuple[str, ...] = ("bf16", "fp8"),
) -> dict:
    """Train in each precision with identical settings; both loss curves and the FP8-vs-BF16 figures."""
    curves, times = {}, {}
    for precision in precisions:
        t = TrainSettings(
            steps=steps,
            batch_size=batch,
            seq_len=seq_len,
            lr=lr,
            min_lr=lr / 10,
            warmup_steps=min(10, steps // 5),
            log_every=10**9,
            seed=seed,
        )
        spec = RunSpec(model=get_preset(model), layout=Layout(num_chunks=1), train=t, precision=precision)
        t0 = time.perf_counter()
        curves[precision] = train(spec, progress=False)["losses"]
        times[precision] = time.perf_counter() - t0
    w = min(window, steps)
    final = {p: sum(c[-w:]) / w for p, c in curves.items()}

    def gap(p: str, ref: str) -> float:
        return abs(final[p] - final[ref]) / final[ref]

    per_step = [abs(a - b) / b for a, b in zip(curves["fp8"], curves["bf16"])]
    out = {
        "model": model,
        "steps": steps,
        "seed": seed,
        "window": w,
        "loss_bf16": final["bf16"],
        "loss_fp8": final["fp8"],
        "rel_diff": gap("fp8", "bf16"),
        "max_step_rel_diff": max(per_step),
        "seconds": times,
        "curves": curves,
    }
    if "fp32" in final:
        out["loss_fp32"] = final["fp32"]
        out["rel_diff_bf16_vs_fp32"] = gap("bf16", "fp32")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--window", type=int, default=20, help="final steps averaged for the comparison")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--no-fp32", action="store_true", help="skip the FP32 runs (the BF16-vs-FP32 noise floor)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", help="write the figures and every loss curve here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    precisions = ("bf16", "fp8") if a.no_fp32 else ("bf16", "fp8", "fp32")
    runs = []
    for seed in a.seeds:
        r = run_parity(a.model, a.steps, a.window, a.seq_len, a.batch, a.lr, seed, precisions)
        runs.append(r)
        floor = f", BF16 vs FP32 {100 * r['rel_diff_bf16_vs_fp32']:.3f}%" if "loss_fp32" in r else ""
        print(
            f"seed {seed}: final loss (mean of last {r['window']} of {r['steps']} steps) "
            f"BF16 {r['loss_bf16']:.4f}, "
            f"FP8 {r['loss_fp8']:.4f}: FP8 vs BF16 {100 * r['rel_diff']:.3f}%{floor}; "
            f"largest per-step {100 * r['max_step_rel_diff']:.2f}%; "
            + ", ".join(f"{p} {sec:.0f} s" for p, sec in r["seconds"].items())
        )
    mean = {
        k: statistics.fmean(r[k] for r in runs) for k in ("rel_diff", "rel_diff_bf16_vs_fp32") if k in runs[0]
    }
    floor = (
        f"; BF16 vs FP32 (noise floor) {100 * mean['rel_diff_bf16_vs_fp32']:.3f}%"
        if "rel_diff_bf16_vs_fp32" in mean
        else ""
    )
    print(
        f"{a.model}, mean over seeds {a.seeds}: FP8 vs BF16 {100 * mean['rel_diff']:.3f}% "
        f"(DeepSeek-V3: < 0.25% at scale){floor}"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"mean": mean, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
