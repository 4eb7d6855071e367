"""fp8.cost (GEMM time) and moe_comm.cost (dispatch/combine on a topology): formulas and monotonicity."""

import itertools
import json
import math
import random

import pytest

from fp8.cost import GemmCostModel, GemmEfficiency, MeasuredGemm, gemm_bytes, load_bench_gemm_rates
from moe_comm.cost import (
    Routing,
    Topology,
    _expected_distinct,
    combine_cost,
    dispatch_cost,
    fan_out,
    overlap,
    payload_bytes,
)

EFF = GemmEfficiency(fp8_dense=0.5, fp8_grouped=0.6, fp8_wgrad=0.4, bf16=0.7)
H800 = dict(peak_fp8_tflops=1979.0, peak_bf16_tflops=989.0, hbm_tbps=3.35)


def test_gemm_time_is_flops_over_rate_for_large_gemms():
    m = GemmCostModel(**H800, efficiency=EFF, sm_fraction=112 / 132)
    t = m.time_s(4096, 7168, 16384)
    assert t == pytest.approx(2 * 4096 * 7168 * 16384 / (1979e12 * 112 / 132 * 0.5))
    assert m.time_s(8192, 7168, 16384) == pytest.approx(2 * t)  # linear in every dimension
    assert m.time_s(32768, 4096, 7168, groups=4) == pytest.approx(
        2 * 32768 * 4096 * 7168 / (1979e12 * 112 / 132 * 0.6)
    )
    assert m.time_s(4096, 7168, 16384, kind="wgrad") == pytest.approx(t * 0.5 / 0.4)
    assert m.time_s(4096, 7168, 16384, dtype="bf16") == pytest.approx(t * 1979 * 0.5 / (989 * 0.7))


def test_gemm_small_and_skinny():
    m = GemmCostModel(**H800, efficiency=EFF)
    # 4096 x 256: 32 x 2 = 64 tiles of 128 x 128 for 132 SMs.
    assert m.occupancy(4096, 256, 7168) == pytest.approx(64 / 132)
    assert m.occupancy(4096, 7168, 256, kind="wgrad") == pytest.approx(min(1, 56 * 2 / 132))
    assert m.occupancy(8192, 8192, 8192) == 1.0
    # One row: memory-bound (reads the whole weight), far slower than its FLOPs at peak.
    t = m.time_s(1, 7168, 7168)
    assert t == pytest.approx(gemm_bytes(1, 7168, 7168) / 3.35e12)
    assert t > 50 * 2 * 7168 * 7168 / 1979e12


def test_gemm_faster_hardware_is_never_slower():
    shapes = [(1, 64, 64), (128, 2112, 7168), (4096, 24576, 1536), (32768, 4096, 7168)]
    slow = GemmCostModel(**H800, efficiency=EFF)
    fast = GemmCostModel(peak_fp8_tflops=2500, peak_bf16_tflops=1250, hbm_tbps=4.8, efficiency=EFF)
    for shp, kind in itertools.product(shapes, ("fprop", "dgrad", "wgrad")):
        assert fast.time_s(*shp, kind=kind) <= slow.time_s(*shp, kind=kind)
        more_sms = GemmCostModel(**H800, efficiency=EFF, sm_fraction=1.0)
        fewer_sms = GemmCostModel(**H800, efficiency=EFF, sm_fraction=0.5)
        assert more_sms.time_s(*shp, kind=kind) <= fewer_sms.time_s(*shp, kind=kind)


def test_measured_rates_replace_the_efficiency_only_nearby():
    m = GemmCostModel(**H800, efficiency=EFF).with_measurements(
        [MeasuredGemm(4096, 7168, 2048, "fprop", "fp8", tflops=1000.0)]
    )
    assert m.rate_tflops(4096, 7168, 2048) == pytest.approx(1000.0)
    assert m.rate_tflops(5000, 7000, 2100) == pytest.approx(1000.0)  # within 2x on every dimension
    assert m.rate_tflops(64, 7168, 2048) == pytest.approx(1979 * 0.5 * m.occupancy(64, 7168, 2048))
    assert m.rate_tflops(4096, 7168, 2048, kind="wgrad") == pytest.approx(1979 * 0.4)  # other class
    half = GemmCostModel(**H800, efficiency=EFF, sm_fraction=0.5, measured=m.measured)
    assert half.rate_tflops(4096, 7168, 2048) == pytest.approx(500.0)


def test_load_bench_gemm_rates(tmp_path):
    gpu = {
        "env": {"device": "NVIDIA H800"},
        "rows": [
            {"m": 4096, "n": 7168, "k": 2048, "tflops": 1100.0},
            {"m": 4096, "n": 4096, "k": 7168, "groups": 4, "kind": "fprop", "median_us": 100.0},
            {
                "m": 4096,
                "n": 7168,
                "k": 2048,
                "kind": "wgrad",
                "dtype": "fp8",
                "tflops": 900.0,
                "sm_fraction": 0.85,
            },
            {"name": "not a gemm row", "median_us": 3.0},
        ],
    }
    cpu = {"env": {"device": "cpu"}, "rows": [{"m": 1, "n": 1, "k": 1, "tflops": 0.001}]}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    (tmp_path / "cpu.json").write_text(json.dumps(cpu))
    rows = load_bench_gemm_rates([tmp_path / "gpu.json", tmp_path / "cpu.json"])
    assert len(rows) == 3
    assert rows[1].groups == 4 and rows[1].tflops == pytest.approx(2 * 4096 * 4096 * 7168 / 100e-6 / 1e12)
    assert rows[2].kind == "wgrad" and rows[2].sm_fraction == 0.85


def test_gemm_bad_input():
    m = GemmCostModel(**H800)
    with pytest.raises(ValueError, match="m=0"):
        m.time_s(0, 10, 10)
    with pytest.raises(ValueError, match="kind='bwd'"):
        m.time_s(10, 10, 10, kind="bwd")
    with pytest.raises(ValueError, match="sm_fraction=1.5"):
        GemmCostModel(**H800, sm_fraction=1.5)
    with pytest.raises(ValueError, match="fp8_dense=0"):
        GemmEfficiency(fp8_dense=0.0, fp8_grouped=0.5, fp8_wgrad=0.5, bf16=0.5)


# ------------------------------------------------------------------------------------------ moe_comm.cost


@pytest.mark.parametrize("units,per_unit,k", [(3, 2, 2), (4, 3, 5), (2, 4, 8), (5, 1, 3)])
def test_expected_distinct_matches_enumeration(units, per_unit, k):
    items = [u for u in range(units) for _ in range(per_unit)]
    subsets = list(itertools.combinations(range(len(items)), k))
    exact = sum(len({items[i] for i in s}) for s in subsets) / len(subsets)
    assert _expected_distinct(units, per_unit, k) == pytest.approx(exact)


def test_v3_fan_out_matches_sampling():
    """Node-limited routing of DeepSeek-V3 (8 nodes, 4-node limit, 4 experts per GPU, top-8), sampled."""
    route = Routing(num_experts=256, topk=8, ep=64, node_limit=4)
    f = fan_out(route, gpus_per_node=8)
    rng = random.Random(0)
    n, nodes, remote, ranks = 20000, 0, 0, 0
    for _ in range(n):
        chosen = rng.sample(range(8), 4)
        experts = rng.sample([node * 32 + e for node in chosen for e in range(32)], 8)
        hit_nodes = {e // 32 for e in experts}
        nodes += len(hit_nodes)
        remote += len(hit_nodes - {0})  # the token lives on node 0 (any node, by symmetry)
        ranks += len({e // 4 for e in experts})
    assert f.nodes == pytest.approx(nodes / n, rel=0.01)
    assert f.remote_nodes == pytest.approx(remote / n, rel=0.02)
    assert f.ranks == pytest.approx(ranks / n, rel=0.01)
    assert 3.6 < f.nodes < 3.7 and f.remote_nodes < f.nodes <= 4


def test_exchange_bytes_and_time():
    topo = Topology(gpus_per_node=8, nvlink_gbps=160, ib_gbps=40, latency_us=0)
    route = Routing(256, 8, 64, node_limit=4)
    d = dispatch_cost(topo, route, tokens=4096, hidden=7168, payload="fp8")
    f = fan_out(route, 8)
    assert d.ib_bytes == pytest.approx(4096 * f.remote_nodes * payload_bytes(7168, "fp8", 8))
    assert d.time_s == pytest.approx(max(d.ib_bytes / 40e9, d.nvlink_bytes / 160e9))
    assert d.bound == "ib"
    c = combine_cost(topo, route, tokens=4096, hidden=7168)
    assert c.ib_bytes > d.ib_bytes  # BF16 combine carries about twice the FP8 dispatch
    flat = dispatch_cost(topo, route, tokens=4096, hidden=7168, hierarchical=False)
    assert flat.ib_bytes > d.ib_bytes  # one IB crossing per GPU instead of per node
    assert dispatch_cost(topo, Routing(256, 8, 1), tokens=4096, hidden=7168).time_s == 0.0
    intranode = dispatch_cost(topo, Routing(256, 8, 8), tokens=4096, hidden=7168)
    assert intranode.ib_bytes == 0.0 and intranode.bound == "nvlink"


def test_exchange_monotonicity():
    route = Routing(256, 8, 64, node_limit=4)
    base = Topology(8, 160, 40)
    t0 = dispatch_cost(base, route, tokens=4096, hidden=7168).time_s
    for faster in (Topology(8, 160, 80), Topology(8, 320, 40), Topology(8, 320, 80)):
        assert (
            dispatch_cost(faster, route, tokens=4096, hidden=7168).time_s <= t0
        )  # more bandwidth: never slower
    prev = 0.0
    for limit in (1, 2, 4, 8):  # more nodes per token: never cheaper
        t = dispatch_cost(base, Routing(256, 8, 64, node_limit=limit), tokens=4096, hidden=7168).time_s
        assert t >= prev
        prev = t
    assert dispatch_cost(base, route, tokens=8192, hidden=7168).time_s > t0


def test_overlap_and_bad_input():
    assert overlap(3.0, 5.0) == (0.0, 3.0)
    assert overlap(5.0, 3.0) == (2.0, 3.0)
    with pytest.raises(ValueError, match="comm_s=-1"):
        overlap(-1.0, 1.0)
    with pytest.raises(ValueError, match="ep=3"):
        Routing(256, 8, 3)
    with pytest.raises(ValueError, match="topk=0"):
        Routing(256, 0, 8)
    with pytest.raises(ValueError, match="ib_gbps=0"):
        Topology(8, 160, 0)
    with pytest.raises(ValueError, match="payload='int8'"):
        payload_bytes(7168, "int8", 8)
    with pytest.raises(ValueError, match="ep=12"):
        fan_out(Routing(48, 2, 12), gpus_per_node=8)
    assert math.isclose(payload_bytes(7168, "fp8", 8), 7168 + 4 * 56 + 64)
