"""Chunk costs, stage partition, memory and optimizer step, and the trace calibrator."""

import itertools
import json
import random

import pytest

from examples.deepseek_v3.config import get_preset
from examples.deepseek_v3.plan.calibrate import calibrate, chunk_work, rates_from_json, read_trace
from examples.deepseek_v3.plan.chunks import ChunkCost, block_costs, fb_time, partition, stage_costs
from examples.deepseek_v3.plan.hardware import get_hardware
from examples.deepseek_v3.plan.memory import Layout, memory_per_gpu, optimizer_step
from examples.deepseek_v3.plan.model import model_blocks
from examples.deepseek_v3.plan.rates import KernelRates
from fp8.cost import GemmCostModel
from moe_comm.cost import Routing

V3 = get_preset("v3-671b")
H800 = get_hardware("h800")
ROUTE = Routing(256, 8, 64, node_limit=4)


def _v3_costs(hw=H800, rates=None, precision="fp8", routing=ROUTE):
    blocks = model_blocks(V3, tokens=4096, seq_len=4096, ep=routing.ep)
    return blocks, block_costs(
        blocks, hw, rates or KernelRates.default(), precision=precision, routing=routing
    )


def test_chunk_cost_algebra():
    c = ChunkCost(compute_f=10, compute_b=20, compute_w=5, comm_f=8, comm_b=12, shared_f=3, shared_b=2)
    assert c.f == 10 + 5 and c.b == 20 + 10 and c.w == 5
    assert fb_time(c, c) == 30  # compute hides 20 of communication
    assert fb_time(c, c) <= c.f + c.b
    heavy = ChunkCost(compute_f=1, compute_b=2, comm_f=10, comm_b=10)
    assert fb_time(heavy, heavy) == 20  # communication-bound pair
    s = c + heavy
    assert s.compute_f == 11 and s.comm_b == 22


def test_v3_moe_layer_prices_the_profiled_chunk():
    """4 MoE layers' F&B give the calibration profile's compute kernel time (129.5 ms), by construction."""
    blocks, costs = _v3_costs()
    moe = costs[[b.kind for b in blocks].index("moe")]
    four = stage_costs([moe] * 4, [(0, 4)])[0]
    assert fb_time(four, four) == pytest.approx(0.1295, rel=0.01)
    assert four.comm_f + four.comm_b < four.compute_f + four.compute_b  # fully hidden in a pair
    assert four.f > four.compute_f and four.b > four.compute_b  # exposed when run alone


def test_block_costs_monotone_in_hardware_and_precision():
    _, base = _v3_costs()
    faster = H800.with_(ib_gbps=100.0, nvlink_gbps=400.0, hbm_tbps=4.8)
    _, fast = _v3_costs(hw=faster)
    _, bf16 = _v3_costs(precision="bf16")
    for a, b, c in zip(base, fast, bf16):
        assert b.f <= a.f and b.b <= a.b and fb_time(b, b) <= fb_time(a, a)
        assert c.compute_f + c.compute_b >= a.compute_f + a.compute_b
    _, no_ep = _v3_costs(routing=Routing(256, 8, 1))
    assert all(c.comm_f == 0 and c.comm_b == 0 for c in no_ep)


def test_partition_is_optimal_and_contiguous():
    rng = random.Random(1)
    for n, pp in [(7, 3), (8, 4), (9, 2), (6, 6)]:
        costs = [ChunkCost(compute_f=rng.uniform(1, 5), compute_b=rng.uniform(2, 9)) for _ in range(n)]
        ranges = partition(costs, pp)
        assert ranges[0][0] == 0 and ranges[-1][1] == n and all(a < b for a, b in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(pp - 1))
        got = max(sum(c.f + c.b for c in costs[a:b]) for a, b in ranges)
        best = min(
            max(sum(c.f + c.b for c in costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
            for cuts in itertools.combinations(range(1, n), pp - 1)
        )
        assert got == pytest.approx(best)
    with pytest.raises(ValueError, match="pp=5"):
        partition(costs[:3], 5)


def test_v3_partition_has_four_moe_layers_per_middle_stage():
    blocks, costs = _v3_costs()
    ranges = partition(costs, 16, overlapped=True)
    kinds = [[b.kind for b in blocks[a:c]] for a, c in ranges]
    assert all(k == ["moe"] * 4 for k in kinds[1:15])  # as in DeepSeek's profile: "4 MoE layers" a chunk
    assert kinds[0][:4] == ["embed", "dense", "dense", "dense"] and kinds[-1][-1] == "mtp"


def test_memory_and_optimizer():
    blocks, _ = _v3_costs()
    stages = [blocks[6:10], blocks[54:58]]  # a DualPipe rank holding two 4-MoE stages
    layout = Layout(dp=128, ep=64, stage_copies=2, gpus_per_node=8)
    mems = [memory_per_gpu(stages, layout, peak_in_flight=17, zero_stage=z).total for z in range(4)]
    assert mems == sorted(mems, reverse=True)  # each ZeRO stage shards more
    m1 = memory_per_gpu(stages, layout, peak_in_flight=17, zero_stage=1)
    n_params = m1.params_replicated + m1.params_expert
    assert m1.weights == pytest.approx(2 * n_params) and m1.grads == pytest.approx(4 * n_params)
    assert m1.optimizer == pytest.approx(8 * (m1.params_replicated / 256 + m1.params_expert / 4))
    assert m1.activations == pytest.approx(17 * sum(b.activation_bytes for b in stages[0]))
    assert 60e9 < m1.total < 80e9  # fits an 80 GB H800
    rates = KernelRates.default()
    slow = optimizer_step(stages, layout, H800, rates, zero_stage=1)
    fast = optimizer_step(stages, layout, H800.with_(ib_gbps=100.0), rates, zero_stage=1)
    assert 0 < fast.total_s < slow.total_s
    assert optimizer_step(stages, layout, H800, rates, zero_stage=0).adamw_s > slow.adamw_s
    with pytest.raises(ValueError, match="zero_stage=4"):
        memory_per_gpu(stages, layout, peak_in_flight=1, zero_stage=4)
    with pytest.raises(ValueError, match="ep=3"):
        Layout(dp=128, ep=3, stage_copies=1, gpus_per_node=8)


def _synthetic_trace(path, eff, ib_eff, layers=4):
    """A Chrome trace whose kernel times are the chunk's work at the given efficiencies."""
    smf = 112 / 132
    blocks = model_blocks(V3, tokens=4096, seq_len=4096, ep=64)
    moe = next(b for b in blocks if b.kind == "moe")
    gemm = GemmCostModel(H800.fp8_tflops, H800.bf16_tflops, H800.hbm_tbps, sm_fraction=smf)
    work = chunk_work(moe, layers, gemm)
    peaks = {
        "fp8_dense": H800.fp8_tflops * 1e12 * smf,
        "fp8_grouped": H800.fp8_tflops * 1e12 * smf,
        "fp8_wgrad": H800.fp8_tflops * 1e12 * smf,
        "bf16_gemm": H800.bf16_tflops * 1e12 * smf,
        "attention_fwd": H800.bf16_tflops * 1e12 * smf,
        "attention_bwd": H800.bf16_tflops * 1e12 * smf,
        "elementwise": H800.hbm_tbps * 1e12,
    }
    names = {
        "fp8_dense": "cutlass::device_kernel<dpsk::fp8_ptp128c::GemmKernel>",
        "fp8_grouped": "cutlass::device_kernel<m_grouped_fp8_ptp128c::GemmKernel>",
        "fp8_wgrad": "cutlass::device_kernel<fp8_dptp128c_acc::GemmKernel>",
        "bf16_gemm": "sm90_xmma_gemm_bf16bf16_bf16f32_f32_nn_n_cublas",
        "attention_fwd": "flash::compute_attn_ws<Flash_fwd_kernel_traits>",
        "attention_bwd": "flash::FlashAttnBwd<CollectiveMainloopBwd>",
        "elementwise": "layer_norm::ln_fwd_kernel",
    }
    events, ts = [], 0.0
    for cls, name in names.items():
        dur_us = work[cls] / (eff[cls] * peaks[cls]) * 1e6
        for half in (0, 1):  # two kernels per class, on two compute streams
            events.append(
                {"ph": "X", "cat": "kernel", "name": name, "tid": 7 + 16 * half, "ts": ts, "dur": dur_us / 2}
            )
            ts += dur_us / 2
    from moe_comm.cost import combine_cost, dispatch_cost

    topo = H800.topology(nvlink_efficiency=1.0, ib_efficiency=1.0)
    ib = dispatch_cost(topo, ROUTE, tokens=4096, hidden=7168, payload="fp8").ib_bytes
    ib += 3 * combine_cost(topo, ROUTE, tokens=4096, hidden=7168).ib_bytes
    comm_us = layers * ib / (ib_eff * H800.ib_gbps * 1e9) * 1e6
    events.append(
        {
            "ph": "X",
            "cat": "kernel",
            "name": "dpsk::ep::internode::dispatch<fp8>",
            "tid": 27,
            "ts": 0,
            "dur": comm_us / 2,
        }
    )
    events.append(
        {
            "ph": "X",
            "cat": "kernel",
            "name": "dpsk::ep::internode::combine<bf16>",
            "tid": 27,
            "ts": 1,
            "dur": comm_us / 2,
        }
    )
    events.append(
        {
            "ph": "X",
            "cat": "kernel",
            "name": "dpsk::ep::internode::notify_dispatch",
            "tid": 27,
            "ts": 2,
            "dur": 5000.0,
        }
    )
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 0, "dur": 99.0})
    path.write_text(json.dumps({"traceEvents": events}))


def test_calibrate_recovers_efficiencies(tmp_path):
    eff = {
        "fp8_dense": 0.41,
        "fp8_grouped": 0.52,
        "fp8_wgrad": 0.33,
        "bf16_gemm": 0.77,
        "attention_fwd": 0.61,
        "attention_bwd": 0.44,
        "elementwise": 0.47,
    }
    trace = tmp_path / "trace.json"
    _synthetic_trace(trace, eff, ib_eff=0.6)
    times = read_trace(trace)
    assert times.transfer_seconds < times.comm_seconds  # notify kernels are not data movement
    rates, rows = calibrate(times, V3, H800, layers=4, tokens=4096, seq_len=4096, ep=64, node_limit=4)
    assert rates.gemm.fp8_dense == pytest.approx(0.41)
    assert rates.gemm.fp8_grouped == pytest.approx(0.52)
    assert rates.gemm.fp8_wgrad == pytest.approx(0.33)
    assert rates.gemm.bf16 == pytest.approx(0.77)  # larger than attention forward: the measured one
    assert rates.attention_fwd == pytest.approx(0.61) and rates.attention_bwd == pytest.approx(0.44)
    assert rates.elementwise == pytest.approx(0.47) and rates.ib_efficiency == pytest.approx(0.6)
    out = tmp_path / "rates.json"
    out.write_text(json.dumps({"rates": rates.to_dict()}))
    back = rates_from_json(out)
    assert (back.gemm.fp8_dense, back.gemm.fp8_wgrad, back.gemm.bf16) == pytest.approx((0.41, 0.33, 0.77))
    assert back.ib_efficiency == pytest.approx(0.6) and back.attention_bwd == pytest.approx(0.44)


def test_read_trace_rejects_a_trace_without_kernels(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"traceEvents": [{"cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}]}))
    with pytest.raises(ValueError, match="no GPU kernel events"):
        read_trace(p)
