"""The training app's entry: hydra config, bad configurations rejected before any process group exists."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from examples.deepseek_v3 import launch
from examples.deepseek_v3.layout import ConfigError
from examples.deepseek_v3.train import run, spec_from_config

CONF = str(Path(__file__).resolve().parents[2] / "examples" / "deepseek_v3" / "conf")


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(
            "config", overrides=[f"out_dir={tmp_path}", f"train.ckpt_dir={tmp_path}/ck", *overrides]
        )


def test_default_config_is_the_documented_main_job(tmp_path):
    spec = spec_from_config(_cfg(tmp_path))
    lay = spec.layout
    assert (lay.pp, lay.dp, lay.ep, lay.schedule) == (2, 1, 2, "dualpipev") and lay.world_size == 4
    assert spec.model.name == "tiny" and spec.precision == "fp8" and spec.wandb is None  # all 3 primitives
    spec = spec_from_config(
        _cfg(tmp_path, "model=small", "model.n_layers=4", "precision=fp32", "logger=wandb")
    )
    assert spec.model.name == "small" and spec.model.n_layers == 4 and spec.model.dim == 256
    assert spec.precision == "fp32" and spec.wandb["project"] == "frugal-parallel"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["parallel.pp=3"],
            r"model.n_layers=4 must be divisible by the 6 pipeline stages",
        ),
        (["launch.nprocs=3"], r"= 4 must equal the world size 3"),
        (["parallel.ep=3", "parallel.pp=1"], r"n_routed_experts=8 must be divisible by parallel.ep=3"),
        (["parallel.num_chunks=2"], r"num_microbatches=2 must be an int >= 4"),
        (
            ["parallel.schedule=dualpipe", "parallel.pp=4", "parallel.ep=1"],
            r"DualPipe: num_microbatches=4 must be an int >= 8",
        ),
        (["train.seq_len=500"], r"train.seq_len=500 must be in \[2, model.max_seq_len=128\]"),
    ],
)
def test_bad_configuration_raises_before_starting_processes(tmp_path, monkeypatch, overrides, match):
    def no_spawn(*a, **k):
        raise AssertionError("processes were started for a configuration that cannot run")

    monkeypatch.setattr(launch, "spawn_local", no_spawn)
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RUN_ID", *launch.MPI_ENV):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match=match):
        run(_cfg(tmp_path, *overrides))


def test_under_torchrun_a_wrong_world_size_fails_before_the_rendezvous(tmp_path, monkeypatch):
    # A real env:// rendezvous for 3 ranks would wait for peers that never come; the check comes first.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setattr(launch, "init_from_launcher", lambda *a: pytest.fail("rendezvous attempted"))
    with pytest.raises(ConfigError, match="must equal the world size 3"):
        run(_cfg(tmp_path))


def test_launcher_detection():
    assert launch.launcher_kind({}) == "local"
    assert launch.launcher_kind({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}) == "torchrun"
    assert launch.launcher_kind({"OMPI_COMM_WORLD_SIZE": "4"}) == "mpi"
    assert launch.launcher_world_size("mpi", {"OMPI_COMM_WORLD_SIZE": "4"}) == 4
    assert launch.launcher_world_size("mpi", {"PMI_SIZE": "8"}) == 8
    with pytest.raises(ValueError, match="launch.backend='mpi' must be auto, gloo or nccl"):
        launch.resolve_backend("mpi")


def test_main_job_command_end_to_end(tmp_path):
    """README's first command, shortened: 4 local ranks (PP2 DualPipeV x EP2), metrics, traces, report."""
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "examples.deepseek_v3.train", f"hydra.run.dir={tmp_path}", "train.steps=6"]
    cmd += ["train.log_every=3", "train.profile_start=1", "train.ckpt_every=6", "launch.timeout_s=120"]
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    lines = [ln for ln in out.splitlines() if "| loss" in ln]
    assert len(lines) == 2, out[-3000:]
    for ln in lines:
        for field in ("tok/s", "MFU", "bubble", "(schedule", "comm hidden", "a2a", "p2p"):
            assert field in ln, ln
    assert "train: 100%" in out  # the tqdm bar
    traces = sorted(tmp_path.glob("trace_rank*.json"))
    assert [t.name for t in traces] == [f"trace_rank{r}.json" for r in range(4)]
    names = {e["name"] for e in json.loads(traces[0].read_text())["traceEvents"] if e.get("ph") == "X"}
    for span in ("dispatch", "combine", "gloo:all_to_all"):
        assert span in names, span
    assert any(n.startswith("dualpipe.F") for n in names) and any(n.startswith("dualpipe.W") for n in names)
    rep = json.loads((tmp_path / "overlap_report.json").read_text())
    assert sorted(rep["ranks"]) == ["0", "1", "2", "3"]
    assert {"F", "B", "W", "dispatch", "combine"} <= set(rep["ranks"]["0"]["spans_ms"])
    assert 0 <= rep["hidden_fraction"] <= 1 and 0 <= rep["bubble_fraction"] <= 1
    assert (tmp_path / "checkpoints" / "step_00000006" / "COMPLETE").is_file()
    assert (tmp_path / "timeline.png").stat().st_size > 10_000  # measured beside simulated


def test_wandb_missing_is_reported_before_any_process(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    monkeypatch.setattr(launch, "spawn_local", lambda *a, **k: pytest.fail("processes were started"))
    with pytest.raises(ImportError, match="logger=wandb needs the wandb package"):
        run(_cfg(tmp_path, "logger=wandb"))
