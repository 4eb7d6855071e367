"""Train the example DeepSeek-V3-style model with DualPipe x expert parallelism x data parallelism (+ FP8).

    python -m examples.deepseek_v3.train                                  # 4 local ranks: PP2 x EP2
    python -m examples.deepseek_v3.train parallel=single train.steps=20   # one process
    python -m examples.deepseek_v3.train parallel.schedule=1f1b precision=fp8 logger=wandb
    torchrun --nproc-per-node 4 -m examples.deepseek_v3.train             # under torchrun (env://)
    mpirun -n 4 python -m examples.deepseek_v3.train                      # under MPI (mpi4py bootstrap)

Config groups (conf/): model (tiny, small), parallel (pp2_ep2, single, dp2, ep2, pp2, pp2_ep2_dp2, or any
pp/dp/ep/schedule/num_chunks), precision (fp32, bf16, fp8), logger (tqdm, wandb); every key can be
overridden on the command line (hydra). Outputs go to hydra's run directory: checkpoints, per-rank Chrome
traces (``trace_rank<r>.json``) and ``overlap_report.json``. A configuration that cannot run raises
:class:`examples.deepseek_v3.layout.ConfigError` before any process or process group is started.
"""

from __future__ import annotations

import json
from pathlib import Path

from examples.deepseek_v3.config import get_preset
from examples.deepseek_v3.layout import Layout, check_layout
from examples.deepseek_v3.trainer import RunSpec, TrainSettings, train


def spec_from_config(cfg) -> RunSpec:
    """Build a RunSpec from the composed hydra config (DictConfig or plain dict)."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    model = dict(c["model"])
    preset = model.pop("preset")
    model_cfg = get_preset(preset).with_(**{k: v for k, v in model.items() if v is not None})
    return RunSpec(
        model=model_cfg,
        layout=Layout(**c["parallel"]),
        train=TrainSettings(**c["train"]),
        precision=c["precision"]["name"],
        out_dir=c["out_dir"],
        wandb=(c.get("logger") or {}).get("wandb"),
    )


def rank_main(spec, report: bool = True) -> dict:
    """What every rank runs once its process group exists: train, then the overlap report on rank 0."""
    import torch.distributed as dist

    result = train(spec)
    if dist.is_initialized():
        dist.barrier()
    traces = sorted(Path(spec.out_dir).glob("trace_rank*.json"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if report and rank == 0 and traces:
        from examples.deepseek_v3.overlap_report import format_report, overlap_report

        rep = overlap_report(traces)
        (Path(spec.out_dir) / "overlap_report.json").write_text(json.dumps(rep, indent=1))
        print(format_report(rep))
    return result


def run(cfg) -> None:
    """Launch according to the environment: torchrun / mpirun join their group, else spawn local ranks."""
    from examples.deepseek_v3 import launch

    spec = spec_from_config(cfg)
    t = spec.train
    if spec.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:  # say so before any process starts
            raise ImportError("logger=wandb needs the wandb package: pip install wandb (or -e '.[examples]')")
    kind = launch.launcher_kind()
    lc = cfg["launch"]
    if kind == "local":
        nprocs = lc["nprocs"] or spec.layout.world_size
        check_layout(spec.layout, spec.model, nprocs, t.batch_size, t.seq_len)  # before any process exists
        Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
        print(
            f"{spec.model.name}: {nprocs} local processes, pp={spec.layout.pp} ({spec.layout.schedule}) x "
            f"dp={spec.layout.dp} x ep={spec.layout.ep}, precision={spec.precision}; outputs in "
            f"{spec.out_dir}"
        )
        if nprocs == 1:
            rank_main(spec)
        else:
            launch.spawn_local(
                rank_main, nprocs, (spec,), lc["backend"], lc["timeout_s"], lc["threads_per_rank"]
            )
        return
    check_layout(spec.layout, spec.model, launch.launcher_world_size(kind), t.batch_size, t.seq_len)
    launch.init_from_launcher(kind, lc["backend"], lc["timeout_s"])
    import dataclasses

    import torch.distributed as dist

    try:
        # every process composed its own config: hydra's timestamped run directory may differ by a second
        # between ranks, so all ranks take rank 0's (traces, checkpoints and the report in one place)
        dirs = [spec.out_dir, t.ckpt_dir]
        dist.broadcast_object_list(dirs, src=0)
        spec = dataclasses.replace(spec, out_dir=dirs[0], train=dataclasses.replace(t, ckpt_dir=dirs[1]))
        rank_main(spec)
    finally:
        dist.destroy_process_group()


def main() -> None:
    import hydra

    hydra.main(config_path="conf", config_name="config", version_base=None)(run)()


if __name__ == "__main__":
    main()
