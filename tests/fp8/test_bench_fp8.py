"""bench/bench_fp8.py runs end to end on the CPU (tiny shapes) and writes its JSON."""

from __future__ import annotations

import json

from bench import bench_fp8


def test_bench_fp8_smoke(tmp_path, capsys):
    out = tmp_path / "fp8.json"
    bench_fp8.main(["--scale", "0.05", "--m", "16", "--out", str(out)])
    data = json.loads(out.read_text())
    acc = [r for r in data["rows"] if r["table"] == "accuracy"]
    assert len(acc) == len(bench_fp8.V3_SHAPES) + 1
    assert all(0 < r["1x128/128x128"] < 1e-3 for r in acc if r["case"] == "normal")
    assert data["summary"]["outliers: per-tensor / 1x128 error ratio"] > 5
    assert "calc_diff vs FP32" in capsys.readouterr().out
