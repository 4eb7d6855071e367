"""Training runs on real processes (gloo): layouts against one process, resume, crash in a checkpoint.

Every parallel run is compared with a single-process run of the same model and the same global batches
(6 AdamW steps): losses and global gradient norms. Tolerance: the layouts sum the same gradients in
another order (all-reduce over shards, micro-batch accumulation, DualPipe's mirrored copies), so FP32
results agree to rounding: relative 1e-6 (DESIGN.md's pipeline tolerance; measured: <= 1e-7). A router
bias that drifts between DualPipe's two copies of a stage showed up as 1e-5 (loss) and 5e-5 (norm).
Resume from a checkpoint is bitwise.
"""

import dataclasses
import shutil

import pytest
import torch

from examples.deepseek_v3 import checkpoint as ckpt
from examples.deepseek_v3.config import get_preset
from examples.deepseek_v3.layout import Layout
from examples.deepseek_v3.trainer import RunSpec, TrainSettings, train
from tests.distributed import RankFailure, run_ranks

STEPS = 6
LOSS_RTOL = 1e-6


def _spec(tmp_path, layout: Layout, **kw) -> RunSpec:
    t = TrainSettings(steps=STEPS, batch_size=8, seq_len=32, warmup_steps=2, log_every=1000, **kw)
    return RunSpec(model=get_preset("tiny"), layout=layout, train=t, out_dir=str(tmp_path))


def _train_rank(rank: int, world: int, spec: RunSpec) -> dict:
    return train(spec, progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    torch.set_num_threads(1)
    spec = _spec(tmp_path_factory.mktemp("ref"), Layout(num_chunks=2))
    return train(spec, progress=False)


def _close(a: list[float], b: list[float], rtol: float = LOSS_RTOL) -> None:
    torch.testing.assert_close(
        torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), rtol=rtol, atol=0
    )


def test_dp2_matches_single_process_then_crash_and_bitwise_resume(tmp_path, reference):
    lay = Layout(dp=2, num_chunks=1)  # 2 shards x 1 micro-batch of 4 rows = the reference's 2 x 4
    # 1) an uninterrupted DP=2 run equals the single-process run
    full = run_ranks(_train_rank, 2, args=(_spec(tmp_path / "full", lay),))
    assert full[0]["losses"] == full[1]["losses"]
    # losses and gradient norms (AdamW would hide a wrong gradient scale from the losses)
    _close(full[0]["losses"], reference["losses"])
    _close(full[0]["grad_norms"], reference["grad_norms"])
    assert reference["losses"][-1] < reference["losses"][0] - 0.3  # it trains
    # 2) a run killed while writing the step-4 checkpoint leaves step 2 complete and step 4 unmarked
    root = tmp_path / "ckpts"
    crash = _spec(tmp_path / "crash", lay, ckpt_every=2, ckpt_dir=str(root), crash_in_checkpoint_at=4)
    out = run_ranks(_train_rank, 2, args=(crash,), return_exceptions=True, pg_timeout=20)
    assert all(isinstance(o, RankFailure) and "code 17" in o.message for o in out), out
    assert ckpt.is_complete(root / "step_00000002") and not ckpt.is_complete(root / "step_00000004")
    assert any((root / "step_00000004").iterdir())  # data files were written: a half-written checkpoint
    assert ckpt.latest_checkpoint(root)[0].name == "step_00000002"
    # 3) the restarted run resumes from step 2 and reproduces the uninterrupted run bit for bit
    resume = dataclasses.replace(crash, train=dataclasses.replace(crash.train, crash_in_checkpoint_at=-1))
    out = run_ranks(_train_rank, 2, args=(resume,))
    assert out[0]["start_step"] == 2
    assert out[0]["losses"] == full[0]["losses"][2:]
    assert ckpt.latest_checkpoint(root)[0].name == "step_00000006"
    assert not (root / "step_00000004").exists() or ckpt.is_complete(root / "step_00000004")


@pytest.mark.parametrize(
    "layout",
    [
        Layout(ep=2, num_chunks=1),  # EP only (the dense parts data-parallel over the 2 EP ranks)
        Layout(pp=2, schedule="zb1p", num_chunks=4),  # PP only, zero-bubble W split
        Layout(pp=2, ep=2, schedule="dualpipev", num_chunks=4),  # PP x EP: the main job's layout
        Layout(pp=2, dp=2, schedule="dualpipe", num_chunks=4),  # DualPipe's mirrored copies x DP
        Layout(pp=2, ep=2, schedule="1f1b", num_chunks=4),  # 1F1B x EP
    ],
    ids=lambda lay: f"pp{lay.pp}-dp{lay.dp}-ep{lay.ep}-{lay.schedule}",
)
def test_parallel_layout_matches_single_process(tmp_path, reference, layout):
    root = tmp_path / "ck"
    out = run_ranks(
        _train_rank, layout.world_size, args=(_spec(tmp_path, layout, ckpt_every=3, ckpt_dir=str(root)),)
    )
    for r in out[1:]:
        assert r["losses"] == out[0]["losses"]  # every rank reports the same global figures
    _close(out[0]["losses"], reference["losses"])
    _close(out[0]["grad_norms"], reference["grad_norms"])
    # the step-3 checkpoint of this layout resumes in ONE process: names and shards are layout-free
    shutil.rmtree(root / "step_00000006")
    single = train(_spec(tmp_path / "single", Layout(num_chunks=2), ckpt_dir=str(root)), progress=False)
    assert single["start_step"] == 3
    _close(single["losses"], reference["losses"][3:])


def test_load_refuses_an_unmarked_checkpoint(tmp_path):
    state = {"w": torch.randn(3, 5)}
    path = ckpt.save_checkpoint(tmp_path, 1, state)
    (path / ckpt.MARKER).unlink()  # as if killed after DCP's metadata but before the marker
    assert ckpt.latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no COMPLETE marker"):
        ckpt.load_checkpoint(path, {"w": torch.zeros(3, 5)})


def test_fp8_precision_converts_the_right_layers_and_tracks_bf16():
    from examples.deepseek_v3.fp8_parity import run_parity
    from examples.deepseek_v3.trainer import RankModel
    from fp8 import FP8Linear
    from moe_comm import DeepSeekV3Router

    spec = dataclasses.replace(_spec(".", Layout()), precision="fp8")
    (stage,) = RankModel(spec, 0, None, torch.device("cpu")).stages
    fp8_names = {n for n, m in stage.named_modules() if isinstance(m, FP8Linear)}
    assert (
        "layers.0.attn.wq_a" in fp8_names and "layers.0.ffn.w1" in fp8_names and "mtp.0.eh_proj" in fp8_names
    )
    assert type(stage.head) is torch.nn.Linear and type(stage.embed) is torch.nn.Embedding  # high precision
    moe = stage.layers["1"].ffn
    assert isinstance(moe.router, DeepSeekV3Router) and moe.experts.backend == "fp8" and moe.payload == "fp8"
    # a few steps of the same model and data: FP8 within 1% of BF16 (fp8_parity.py reports the long run)
    r = run_parity("tiny", steps=3, window=2, seq_len=16, batch=2)
    assert r["rel_diff"] < 0.01, r
    assert r["curves"]["fp8"] != r["curves"]["bf16"]  # FP8 really ran
