"""The plan end to end: DeepSeek-V3's published figures reproduced, pipeline properties, what-ifs, the CLI.

Tolerances are the issue's (issue 7). The efficiencies are the documented defaults of plan.rates (measured on
DeepSeek's own kernel profile); nothing is fitted to these step-level figures.
"""

import json

import pytest

from examples.deepseek_v3.config import get_preset
from examples.deepseek_v3.plan import PUBLISHED, ParallelConfig, RunConfig, main, plan, v3_run
from examples.deepseek_v3.plan.chunks import ChunkCost, block_costs, partition, stage_costs
from examples.deepseek_v3.plan.hardware import get_hardware
from examples.deepseek_v3.plan.model import model_blocks
from examples.deepseek_v3.plan.pipeline import rank_costs, simulate_pipeline
from examples.deepseek_v3.plan.rates import KernelRates
from moe_comm.cost import Routing


@pytest.fixture(scope="module")
def v3():
    return plan(v3_run())


def _rel(x, y):
    return abs(x / y - 1)


def test_v3_step_reproduced(v3):
    m = v3.metrics
    assert m["micro_batches"] == 120  # 15,360 sequences over 128 pipelines
    assert _rel(m["step_s"], PUBLISHED["step_s"]) <= 0.05, m["step_s"]
    assert _rel(m["bubble_s"], PUBLISHED["bubble_s"]) <= 0.15, m["bubble_s"]
    assert _rel(m["phase_fb_s"], PUBLISHED["phase_fb_s"]) <= 0.10, m["phase_fb_s"]
    assert abs(m["mfu_causal"] - PUBLISHED["mfu_causal"]) <= 0.02, m["mfu_causal"]
    assert _rel(m["gpu_hours_per_trillion"], PUBLISHED["gpu_hours_per_trillion"]) <= 0.05
    # The step is the pipeline plus the optimizer; the phases of the reported rank add up to the pipeline.
    r = v3.step.sim.phases[m["report_rank"]]
    assert sum(r.values()) == pytest.approx(m["pipeline_s"])
    assert m["step_s"] == pytest.approx(m["pipeline_s"] + m["optimizer_s"])
    assert m["memory_fits"]


def test_v3_totals_reproduced(v3):
    m = v3.metrics
    assert _rel(m["total_gpu_hours"], PUBLISHED["total_gpu_hours"]) <= 0.05, m["total_gpu_hours"]
    assert _rel(m["total_usd"], PUBLISHED["total_usd"]) <= 0.05, m["total_usd"]
    assert m["total_usd"] == pytest.approx(2.0 * m["total_gpu_hours"])
    assert m["total_gpu_hours"] == pytest.approx(
        m["pretrain_gpu_hours"] + m["context_extension_gpu_hours"] + PUBLISHED["post_training_gpu_hours"]
    )
    assert m["tokens_per_day"] == pytest.approx(15360 * 4096 * 86400 / m["step_s"])
    d = v3.to_dict()
    json.dumps(d)  # serialisable
    assert len(d["stages"]) == 16 and len(d["ranks"]) == 16 and len(d["phases"]) == 2


def _constant_stages(n, f=1.0, b=2.0, w=0.5, comm=0.6):
    return [ChunkCost(compute_f=f, compute_b=b, compute_w=w, comm_f=comm, comm_b=comm)] * n


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe"])
def test_more_microbatches_never_more_bubble_fraction(schedule):
    stages = _constant_stages(8)
    prev = 1.0
    for m in (16, 24, 32, 48):
        sim = simulate_pipeline(schedule, stages, pp=8, num_microbatches=m)
        frac = max(sim.result.bubble) / sim.result.step_time
        assert frac <= prev + 1e-12, (m, frac, prev)
        prev = frac


def test_rank_costs_average_the_stages_a_rank_holds():
    stages = [ChunkCost(compute_f=i + 1.0, compute_b=2 * (i + 1.0), compute_w=0.5) for i in range(4)]
    costs = rank_costs("dualpipe", stages, pp=4)
    assert costs[0].f == pytest.approx((1 + 4) / 2) and costs[1].b == pytest.approx((4 + 6) / 2)
    assert costs[0].fb == pytest.approx(((1 + 8) + (4 + 2)) / 2)  # F of one stage with B of the other
    assert [c.f for c in rank_costs("1f1b", stages, pp=4)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="needs 8 stage costs"):
        rank_costs("dualpipev", stages, pp=4)
    with pytest.raises(ValueError, match="schedule 'gpipe'"):
        rank_costs("gpipe", stages, pp=4)


def test_v3_schedules_ordered_and_dualpipe_hides_communication():
    """At PP16 with V3's chunk costs: DualPipe < ZB1P < 1F1B in step time and in bubble."""
    cfg = get_preset("v3-671b")
    blocks = model_blocks(cfg, tokens=4096, seq_len=4096, ep=64)
    costs = block_costs(blocks, get_hardware("h800"), KernelRates.default(), routing=Routing(256, 8, 64, 4))
    out = {}
    for s in ("1f1b", "zb1p", "dualpipe"):
        stages = stage_costs(costs, partition(costs, 16, overlapped=s == "dualpipe"))
        out[s] = simulate_pipeline(s, stages, pp=16, num_microbatches=120).result
    assert out["dualpipe"].step_time < out["zb1p"].step_time < out["1f1b"].step_time
    assert max(out["dualpipe"].bubble) < max(out["zb1p"].bubble) < max(out["1f1b"].bubble)
    assert max(out["dualpipe"].peak_activations) == 17  # PP + 1 (DeepSeek-V3 Table 2)


def test_what_ifs_move_the_right_way(v3):
    base = v3.metrics["step_s"]
    bf16 = plan(v3_run(precision="bf16"), with_phases=False).metrics
    assert bf16["step_s"] > base and bf16["memory_peak_gb"] > v3.metrics["memory_peak_gb"]
    more_ib = plan(v3_run(hardware=get_hardware("h800").with_(ib_gbps=100.0)), with_phases=False).metrics
    assert more_ib["step_s"] <= base  # more bandwidth: never slower
    wide = v3_run(parallel=ParallelConfig(node_limit=8))
    assert plan(wide, with_phases=False).metrics["step_s"] >= base  # more nodes per token: never faster
    one_f_one_b = plan(v3_run(parallel=ParallelConfig(schedule="1f1b")), with_phases=False).metrics
    assert one_f_one_b["comm_hidden_fraction"] < 0.1 < 0.8 < v3.metrics["comm_hidden_fraction"]


def test_bad_configs():
    with pytest.raises(ValueError, match="ep=48 must divide dp"):
        plan(v3_run(parallel=ParallelConfig(ep=48)), with_phases=False)
    with pytest.raises(ValueError, match="must split into dp=128 pipelines"):
        plan(v3_run(global_batch=1000), with_phases=False)
    with pytest.raises(ValueError, match="num_microbatches=24"):  # DualPipe needs >= 2 PP micro-batches
        plan(v3_run(global_batch=3072), with_phases=False)
    with pytest.raises(ValueError, match="precision='fp4'"):
        plan(v3_run(precision="fp4"), with_phases=False)


def test_cli_small_model_with_what_if(tmp_path, capsys):
    args = [
        "--model",
        "tiny",
        "--gpus",
        "8",
        "--pp",
        "2",
        "--ep",
        "4",
        "--global-batch",
        "256",
        "--tokens",
        "1e8",
    ]
    assert main([*args, "--what-if", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step time (s)" in out and "schedule=1f1b" in out and "published" not in out
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["config"]["model"] == "tiny" and d["what_if"][0]["variant"] == "baseline"
    assert (tmp_path / "timeline.png").stat().st_size > 1000 and (tmp_path / "trace.json").exists()


def test_run_config_for_any_model():
    cfg = RunConfig(
        model=get_preset("small"),
        hardware=get_hardware("h100"),
        parallel=ParallelConfig(num_gpus=64, pp=4, ep=8),
        seq_len=256,
        global_batch=4096,
        tokens=1e9,
    )
    m = plan(cfg).metrics
    assert m["step_s"] > 0 and 0 < m["mfu_causal"] < 1 and m["context_extension_gpu_hours"] == 0
    assert m["total_gpu_hours"] == pytest.approx(m["pretrain_gpu_hours"])
