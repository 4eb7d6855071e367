"""The parallel layout PP x DP x EP: validation, rank coordinates and process groups.

    layout = Layout(pp=2, dp=1, ep=2, schedule="dualpipev", num_chunks=4)
    check_layout(layout, model_cfg, world_size=4, batch_size=8, seq_len=64)   # ConfigError if wrong
    groups = build_groups(layout)                                             # after init_process_group

Ranks: ``rank = (pp_rank * dp + dp_rank) * ep + ep_rank`` (EP innermost, as expert parallelism wants the
fastest links). Expert parallelism is carved out of data parallelism, as in DeepSeek-V3 (whose EP64 spans
64 of its data-parallel ranks): the ``dp * ep`` ranks of a pipeline stage each read their own data shard
(``shard = dp_rank * ep + ep_rank``) and hold replicas of the dense parameters, while the routed experts
are split over the ``ep`` ranks and replicated over ``dp``. Gradients are averaged over the ``dp * ep``
"data" group (dense) and over the ``dp`` group (experts).

Every check runs before any process group exists (in the launcher, before processes start, and again on
each rank before ``init_process_group``), so a wrong configuration raises :class:`ConfigError` instead of
hanging in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from examples.deepseek_v3.config import ModelConfig

SCHEDULES = ("dualpipev", "dualpipe", "1f1b", "zb1p")


class ConfigError(ValueError):
    """A configuration that cannot run: the message names the setting, its value and the rule."""


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp: int = 1
    ep: int = 1
    schedule: str = "dualpipev"
    num_chunks: int = 4  # micro-batches per step on each pipeline

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.ep

    @property
    def num_stages(self) -> int:
        """Model stages: DualPipeV folds 2 * pp stages into a V over pp ranks; the others use pp stages
        (DualPipe holds two copies of each, one per direction)."""
        return 2 * self.pp if (self.pp > 1 and self.schedule == "dualpipev") else self.pp

    @property
    def data_shards(self) -> int:
        return self.dp * self.ep

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, ep_rank) of a global rank."""
        return rank // (self.dp * self.ep), (rank // self.ep) % self.dp, rank % self.ep

    def rank_of(self, pp_rank: int, dp_rank: int, ep_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.ep + ep_rank

    def stages_of(self, pp_rank: int) -> list[int]:
        """Model stages held by a pipeline rank, in the order (m0, m1) the pipeline runtime expects.

        DualPipeV: stage r and its mirror 2pp-1-r (the V). DualPipe: stage r of the forward-direction
        copy and stage pp-1-r of the reverse-direction copy. 1F1B, ZB1P / no pipeline: stage r.
        """
        if self.pp == 1:
            return [0]
        if self.schedule == "dualpipev":
            return [pp_rank, 2 * self.pp - 1 - pp_rank]
        if self.schedule == "dualpipe":
            return [pp_rank, self.pp - 1 - pp_rank]
        return [pp_rank]


def check_layout(layout: Layout, cfg: ModelConfig, world_size: int, batch_size: int, seq_len: int) -> None:
    """Raise ConfigError naming the first rule the configuration breaks."""
    for name in ("pp", "dp", "ep", "num_chunks"):
        v = getattr(layout, name)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"parallel.{name}={v!r} must be a positive integer")
    if layout.schedule not in SCHEDULES:
        raise ConfigError(f"parallel.schedule={layout.schedule!r} must be one of {SCHEDULES}")
    if layout.world_size != world_size:
        raise ConfigError(
            f"parallel.pp={layout.pp} x parallel.dp={layout.dp} x parallel.ep={layout.ep} = "
            f"{layout.world_size} must equal the world size {world_size}"
        )
    if cfg.n_routed_experts % layout.ep != 0:
        raise ConfigError(
            f"model.n_routed_experts={cfg.n_routed_experts} must be divisible by parallel.ep={layout.ep}"
        )
    stages = layout.num_stages
    if cfg.n_layers % stages != 0:
        raise ConfigError(
            f"model.n_layers={cfg.n_layers} must be divisible by the {stages} pipeline stages "
            f"(parallel.pp={layout.pp}, schedule={layout.schedule}"
            + (": DualPipeV runs 2 * pp stages)" if stages != layout.pp else ")")
        )
    if layout.pp > 1:  # the schedule builder's own rules (micro-batch counts, even pp for DualPipe)
        from dualpipe.schedules import build

        try:
            build(layout.schedule, layout.pp, layout.num_chunks)
        except ValueError as e:
            raise ConfigError(
                f"parallel.schedule={layout.schedule}, parallel.pp={layout.pp}, "
                f"parallel.num_chunks={layout.num_chunks}: {e}"
            ) from e
    per_shard, rem = divmod(batch_size, layout.data_shards)
    if rem or per_shard % layout.num_chunks:
        raise ConfigError(
            f"train.batch_size={batch_size} must be divisible by parallel.dp x parallel.ep = "
            f"{layout.data_shards} data shards x parallel.num_chunks={layout.num_chunks} micro-batches"
        )
    if not 2 <= seq_len <= cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={seq_len} must be in [2, model.max_seq_len={cfg.max_seq_len}]")


@dataclass
class Groups:
    """This rank's process groups (None where the dimension has size 1)."""

    pp: dist.ProcessGroup | None  # the pipeline: same (dp, ep), pp varies
    ep: dist.ProcessGroup | None  # expert parallel: same (pp, dp), ep varies
    dp: dist.ProcessGroup | None  # expert replicas: same (pp, ep), dp varies
    data: dist.ProcessGroup | None  # dense replicas: same pp, (dp, ep) vary
    pp_ranks: list[int]  # global ranks of my pipeline, by pp rank


def build_groups(layout: Layout) -> Groups:
    """Create the layout's process groups (collective: every rank calls it, in the same order)."""
    rank = dist.get_rank()
    p, d, e = layout.coords(rank)
    r = layout.rank_of
    families = {
        "pp": [
            [r(i, dd, ee) for i in range(layout.pp)] for dd in range(layout.dp) for ee in range(layout.ep)
        ],
        "ep": [
            [r(pp, dd, i) for i in range(layout.ep)] for pp in range(layout.pp) for dd in range(layout.dp)
        ],
        "dp": [
            [r(pp, i, ee) for i in range(layout.dp)] for pp in range(layout.pp) for ee in range(layout.ep)
        ],
        "data": [
            [r(pp, dd, ee) for dd in range(layout.dp) for ee in range(layout.ep)] for pp in range(layout.pp)
        ],
    }
    mine: dict[str, dist.ProcessGroup | None] = {}
    for name, lists in families.items():
        mine[name] = None
        for ranks in lists:
            if len(ranks) == 1:
                continue
            g = dist.new_group(ranks)
            if rank in ranks:
                mine[name] = g
    return Groups(pp_ranks=[r(i, d, e) for i in range(layout.pp)], **mine)
