"""Timing and reporting helpers shared by every benchmark in bench/.

    t = time_fn(lambda: fp8.gemm(a, b), device=a.device)   # Timing(median_us, min_us, max_us, n)
    write_results("bench_fp8", rows, args=vars(args))        # bench/results/<name>-<device>-<date>.json

Rules (../shared/DESIGN.md, Benchmarks): warm up first, report the median of many runs, time with CUDA
events on GPU (a synchronised host clock on CPU), flush L2 between GEMM runs, never time zeros, compare
against peers in the same run and report ratios.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    median_us: float
    min_us: float
    max_us: float
    n: int

    def tflops(self, flops: float) -> float:
        return flops / (self.median_us * 1e-6) / 1e12

    def gbps(self, nbytes: float) -> float:
        return nbytes / (self.median_us * 1e-6) / 1e9


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def flush_l2(device: torch.device) -> None:
    """Overwrite a buffer larger than any Hopper L2 (50 MB on H100) so the next kernel reads from HBM."""
    if device.type != "cuda":
        return
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    buf.zero_()


def time_fn(
    fn: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 5,
    iters: int = 30,
    min_time_s: float = 0.0,
    flush: bool = False,
) -> Timing:
    """Median wall time of ``fn()`` in microseconds.

    CUDA: one pair of events per run (optionally flushing L2 before each, outside the timed region).
    CPU: ``time.perf_counter`` around each call. ``min_time_s`` keeps running past ``iters`` until that
    much time has been measured (for very short CPU ops on a noisy machine).
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start_total = time.perf_counter()
        while len(samples) < iters or (time.perf_counter() - start_total) < min_time_s:
            if flush:
                flush_l2(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
    else:
        start_total = time.perf_counter()
        while len(samples) < iters or (time.perf_counter() - start_total) < min_time_s:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


def reuse_freed_cpu_memory() -> None:
    """Make glibc keep freed blocks in the process, the way a GPU caching allocator reuses memory.

    By default glibc returns blocks above 128 KiB to the OS, so every fresh buffer page-faults (measured:
    ~60% of a local dispatch+combine, ~10% of a small pipeline step; at H=7168 one fault per 4 KiB page
    costs as much as the copy). Call it in every benchmark process before timing, for every implementation
    alike: no mmap'd blocks (M_MMAP_MAX = 0), the heap's top never trimmed (M_TRIM_THRESHOLD = -1; a 1 GiB
    threshold still gave back the ~2 GB a DeepSeek-sized dispatch frees), one arena for all threads (a
    thread arena's heaps are mmap'd). The environment form for any program:
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1 MALLOC_ARENA_MAX=1``. No-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    for param, value in ((-4, 0), (-1, -1), (-8, 1)):  # M_MMAP_MAX, M_TRIM_THRESHOLD, M_ARENA_MAX
        libc.mallopt(param, value)


def geomean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def environment() -> dict[str, Any]:
    """Device, driver, CUDA and torch versions, host and date: what every results JSON records."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = props.name
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
        try:
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except Exception as e:  # noqa: BLE001 - informational only
            env["driver"] = f"unknown ({e})"
    else:
        env["device"] = "cpu"
    return env


def device_tag() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "_").replace("/", "_")
    return "cpu"


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    *,
    summary: dict[str, Any] | None = None,
    args: dict[str, Any] | None = None,
    out: str | Path | None = None,
) -> Path:
    """Write ``{env, args, summary, rows}`` as JSON (default bench/results/<name>-<device>-<date>.json)."""
    env = environment()
    if out is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"{name}-{device_tag()}-{env['date'][:10]}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "env": env, "args": args or {}, "summary": summary or {}, "rows": rows}
    out.write_text(json.dumps(payload, indent=2, default=_jsonable))
    return out


def _jsonable(o: Any) -> Any:
    if isinstance(o, Timing):
        return asdict(o)
    if isinstance(o, torch.dtype | torch.device):
        return str(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def print_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """One line per row, fixed-width columns; floats with 4 significant digits."""
    if not rows:
        print("(no rows)")
        return
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
