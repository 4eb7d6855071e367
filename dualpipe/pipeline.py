"""The public pipelines: ``DualPipe``, ``DualPipeV``, ``Pipeline1F1B``, ``PipelineZB1P``.

All four are one runtime (``dualpipe.runtime.Engine``) executing a different schedule, with the same
``step`` as DeepSeek's DualPipe, so users can switch:

    pipe = DualPipeV((stage_r, stage_2pp_minus_1_minus_r), process_group=pp_group, dp_group=dp_group)
    loss, outputs = pipe.step(x, num_chunks=16, criterion=loss_fn, labels=(y,), return_outputs=False)
    optimizer.step()          # gradients: mirrored copies and ties summed, DP-reduced, ready to use

``inputs`` are full batches, given on the ranks that hold the first stage of a chain (DualPipe: rank 0
and rank pp-1; the others: rank 0); ``labels`` on the ranks that hold a chain's last stage. Both are
split into ``num_chunks`` micro-batches along ``batch_dim`` with ``torch.tensor_split`` (sizes may
differ by one). DualPipe sends micro-batches [0, n/2) down from rank 0 and [n/2, n) up from rank pp-1.
Each micro-batch's loss is ``criterion(*stage_outputs, *labels)`` and its gradient is 1: gradients are
the sum over micro-batches (scale inside ``criterion`` for a mean). ``step`` returns ``(loss, outputs)``:
``loss`` is the (num_chunks,) vector of detached per-micro-batch losses on the loss ranks (DualPipe:
ranks 0 and pp-1 both get all of them) and ``None`` elsewhere; ``outputs`` (with ``return_outputs``) are
the last stage's outputs of the micro-batches that end on this rank, concatenated along ``batch_dim``.
Under ``torch.no_grad()`` the step runs forwards only.

After a training step every local parameter holds its full gradient: DualPipe's two copies of a model
stage are summed, ``tied`` parameters are summed, and with ``dp_group`` the gradients are all-reduced
(averaged unless ``dp_average=False``). ``pipe.timeline`` holds this rank's events of the last step
(``dualpipe.trace.Event``), ``pipe.stats`` its step time, busy time, bubble and activation peaks.

Messages: back-to-back sends to one peer travel as one (``coalesce=True``). An F&B action's activation
either leaves as soon as its forward half is done, the backward half's gradient awaited only when that
half starts (``early_send=True``: the neighbour's next F&B starts sooner, one more message per F&B
pair), or leaves at the action's end with the gradient for the same neighbour, as one message
(``early_send=False``). Which is faster depends on the stage size and the transport, so the default
``early_send="auto"`` times both on the first training steps and keeps the faster
(``dualpipe.tuning``: a paired sequential test, 20-104 steps; ``pipe.early_send`` is the decision, None
until made; pass an ``EarlySendTuner`` to change its limits). All ranks must pass the
same ``coalesce`` and ``early_send`` (checked at construction). DualPipe's mirror exchange of a module
starts right after its last weight-gradient action (gloo; with NCCL, after the step).
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dualpipe.coalesce import early_sends, message_groups
from dualpipe.grads import MirrorExchange, allreduce_dp, sum_mirror_grads, sum_tied_local, sum_tied_remote
from dualpipe.overlap import OverlapFn, interleave
from dualpipe.p2p import KIND_X, P2P, PeerError, make_tag
from dualpipe.runtime import Engine, RankPlan, StepIO
from dualpipe.schedules import Schedule, build, forward_only
from dualpipe.simulate import Costs, SimResult, StageCosts, simulate
from dualpipe.trace import Event
from dualpipe.tuning import EarlySendTuner
from dualpipe.weight_split import enable_linear_fast_path, make_policy

DEFAULT_TIMEOUT_S = float(os.environ.get("FRUGAL_PP_TIMEOUT_S", "300"))
_CODES = {"1f1b": 1, "zb1p": 2, "dualpipe": 3, "dualpipev": 4}
_SPLIT_CODES = {"generic": 1, "linear": 2, "none": 3}

# (model stage a, parameter name in a), (model stage b, parameter name in b)
Tie = tuple[tuple[int, str], tuple[int, str]]


def _signature(module: nn.Module) -> tuple[int, int, int]:
    """(crc of parameter shapes/dtypes/flags in order, parameter count, numel)."""
    sig = [(tuple(p.shape), str(p.dtype), p.requires_grad) for p in module.parameters()]
    return zlib.crc32(repr(sig).encode()), len(sig), sum(p.numel() for p in module.parameters())


class Pipeline(nn.Module):
    """Base class; use one of the four schedules below."""

    schedule_name: ClassVar[str] = ""
    modules_per_rank: ClassVar[int] = 1

    def __init__(
        self,
        modules: nn.Module | Sequence[nn.Module],
        *,
        process_group: dist.ProcessGroup | None = None,
        dp_group: dist.ProcessGroup | None = None,
        weight_split: str = "generic",
        overlap: OverlapFn | None = None,
        tied: Sequence[Tie] = (),
        batch_dim: int = 0,
        num_stages: int | None = None,
        dp_average: bool = True,
        timeout_s: float | None = None,
        coalesce: bool = True,
        early_send: bool | str | EarlySendTuner = "auto",
    ):
        super().__init__()
        name = type(self).__name__
        mods = (modules,) if isinstance(modules, nn.Module) else tuple(modules)
        if len(mods) != self.modules_per_rank or not all(isinstance(m, nn.Module) for m in mods):
            raise ValueError(
                f"{name} takes {self.modules_per_rank} nn.Module(s) per rank, got {len(mods)}: "
                f"{[type(m).__name__ for m in mods]}"
            )
        if not dist.is_initialized():
            raise RuntimeError(
                f"{name}: torch.distributed is not initialised (the library never creates groups)"
            )
        self.module = nn.ModuleList(mods)
        self.p2p = P2P(process_group, DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
        self.group, self.rank, self.pp = self.p2p.group, self.p2p.rank, self.p2p.size
        self.dp_group, self.dp_average, self.batch_dim = dp_group, dp_average, batch_dim
        if self.schedule_name == "dualpipe" and self.pp % 2:
            raise ValueError(
                f"DualPipe needs an even number of pipeline ranks, got process group size {self.pp}"
            )
        expected = 2 * self.pp if self.schedule_name == "dualpipev" else self.pp
        if num_stages is not None and num_stages != expected:
            need = (
                f"{num_stages // 2} ranks (2 stages per rank)"
                if self.schedule_name == "dualpipev"
                else (f"{num_stages} ranks")
            )
            raise ValueError(
                f"{name}: the model has num_stages={num_stages} but the process group has {self.pp} ranks "
                f"(world size mismatch): {name} needs {need}"
            )
        self.weight_split = weight_split
        self.policy = make_policy(weight_split)
        if weight_split == "linear":
            for m in mods:
                enable_linear_fast_path(m)
        self.overlap = overlap if overlap is not None else interleave
        params = [p for m in mods for p in m.parameters()]
        self.device = params[0].device if params else torch.device("cpu")
        self._schedules: dict[tuple[int, bool], Schedule] = {}
        self._rank_plans: dict[int, RankPlan] = {}  # id(schedule) -> what this rank derives from it
        self.coalesce = coalesce
        tuner = early_send if isinstance(early_send, EarlySendTuner) else None
        if tuner is not None:
            tuner.claim(name)  # its trial state belongs to this pipeline alone
            early_send = "auto"
        elif not (isinstance(early_send, bool) or early_send == "auto"):
            raise ValueError(
                f"{name}: early_send={early_send!r} must be True, False, 'auto' or an EarlySendTuner"
            )
        self.early_send_setting = early_send
        # only DualPipe's and DualPipeV's F&B actions have an activation to send early
        fb = self.schedule_name in ("dualpipe", "dualpipev")
        self._tuner = (tuner or EarlySendTuner()) if early_send == "auto" and fb else None
        self._plans: dict[tuple[int, bool, bool], tuple[frozenset, dict]] = {}  # (key, early) -> plan
        self._step_id = 0
        self._meta: dict = {}  # boundary shapes per (kind, stage, micro-batch), shared with the peers' copy
        self.timeline: list[Event] = []
        self.stats: dict[str, Any] = {}
        # the layout is the same for every micro-batch count: ask a minimal schedule
        self._layout = build(self.schedule_name, self.pp, 2 * self.pp, validate=False)
        self.local_stages = self._layout.local_stages(self.rank)
        self._handshake()
        self._ties = self._resolve_ties(tied)

    # ---------------------------------------------------------------------------------------------------
    # construction checks

    def _collective(self, group: dist.ProcessGroup, values: list, dtype: torch.dtype, what: str, run) -> Any:
        """A small host-side collective on ``group``: ``values`` as a tensor (on the GPU under NCCL),
        ``run(tensor) -> (work, result)``, the wait bounded by the pipeline's timeout (``PeerError``)."""
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
        work, result = run(torch.tensor(values, dtype=dtype, device=dev))
        try:
            work.wait(timeout=timedelta(seconds=self.p2p.timeout_s))
        except Exception as e:  # noqa: BLE001
            raise PeerError(
                f"{type(self).__name__} pipeline rank {self.rank}: {what} failed or timed out: {e}"
            ) from e
        return result

    def _gather(self, vec: list[int], group: dist.ProcessGroup) -> list[list[int]]:
        def run(t: Tensor):
            out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            return dist.all_gather(out, t, group=group, async_op=True), out

        out = self._collective(group, vec, torch.int64, "the construction handshake", run)
        return [o.tolist() for o in out]

    def _handshake(self) -> None:
        name = type(self).__name__
        sigs = [_signature(m) for m in self.module] + [(0, 0, 0)] * (2 - len(self.module))
        vec = [_CODES[self.schedule_name], self.pp, len(self.module), _SPLIT_CODES[self.weight_split]]
        vec += [x for s in sigs for x in s]
        early_code = {False: 0, True: 1, "auto": 2}[self.early_send_setting]
        # both sides derive messages from these (and run the tuner's all-reduces in lockstep)
        vec += self._tuner.settings if self._tuner is not None else (0, 0, 0, 0)
        vec.append(4 * int(self.coalesce) + early_code)
        got = self._gather(vec, self.group)
        for r, v in enumerate(got):
            if v[:3] != vec[:3]:
                raise ValueError(
                    f"{name}: ranks disagree on the pipeline: rank {self.rank} runs "
                    f"(schedule, ranks, modules) = {tuple(vec[:3])}, rank {r} runs {tuple(v[:3])}"
                )
            if v[-1] != vec[-1]:
                raise ValueError(
                    f"{name}: ranks disagree on the messages: rank {self.rank} has (coalesce, early_send) = "
                    f"{(self.coalesce, self.early_send_setting)}, rank {r} has "
                    f"{(bool(v[-1] & 4), [False, True, 'auto'][v[-1] & 3])}"
                )
            if v[-5:-1] != vec[-5:-1]:
                raise ValueError(
                    f"{name}: ranks disagree on early_send='auto': rank {self.rank}'s EarlySendTuner has "
                    f"(min_blocks, max_blocks, skip, z*1000) = {tuple(vec[-5:-1])}, "
                    f"rank {r}'s {tuple(v[-5:-1])}"
                )
        if self.schedule_name == "dualpipe":
            for r in range(self.pp):
                q = self.pp - 1 - r
                a, b = got[r][4:7], got[q][7:10]
                if a != b:
                    raise ValueError(
                        f"DualPipe modules disagree: rank {r}'s module 0 and rank {q}'s module 1 must both "
                        f"be model stage {r} (modules=(stage r, stage pp-1-r)) but have (params, numel) "
                        f"({a[1]}, {a[2]}) and ({b[1]}, {b[2]}) or different shapes"
                    )
        if self.dp_group is not None:
            mine = [self.rank, self.pp, *vec[4:]]
            for r, v in enumerate(self._gather(mine, self.dp_group)):
                if v != mine:
                    raise ValueError(
                        f"{name}: dp_group member {r} holds pipeline rank {v[0]} of {v[1]} with different "
                        f"modules than this rank (pipeline rank {self.rank} of {self.pp}): a dp_group must "
                        f"join replicas of the same stage"
                    )

    def _resolve_ties(self, tied: Sequence[Tie]) -> list[tuple]:
        """Per tie: ('local', pa, pb) | ('remote', param, peer, mine_is_first, tag)."""
        out = []
        layout = self._layout
        local_model = {layout.stage_model[s]: (i, s) for i, s in enumerate(self.local_stages)}
        n_model = layout.num_model_stages
        for k, ((sa, na), (sb, nb)) in enumerate(tied):
            for st in (sa, sb):
                if not 0 <= st < n_model:
                    raise ValueError(f"tied[{k}]: model stage {st} out of range [0, {n_model})")
            pa = self._param(local_model, sa, na, k)
            pb = self._param(local_model, sb, nb, k)
            if pa is not None and pb is not None:
                if pa.shape != pb.shape or not torch.equal(pa.detach(), pb.detach()):
                    raise ValueError(
                        f"tied[{k}]: {na!r} (stage {sa}) and {nb!r} (stage {sb}) differ in value"
                    )
                out.append(("local", pa, pb))
            elif pa is not None or pb is not None:
                mine, here, other = (pa, sa, sb) if pa is not None else (pb, sb, sa)
                s_here = local_model[here][1]
                chain = next(c for c in layout.chains if s_here in c)
                s_other = next(s for s in chain if layout.stage_model[s] == other)
                peer = layout.stage_rank[s_other]
                theirs = torch.empty_like(mine.detach())
                ws = self.p2p.isend(mine.detach().contiguous(), peer, make_tag(KIND_X, 240, k, 0))
                wr = self.p2p.irecv(theirs, peer, make_tag(KIND_X, 240, k, 0))
                self.p2p.wait(wr, peer, f"checking tied[{k}]")
                self.p2p.wait(ws, peer, f"checking tied[{k}]")
                if not torch.equal(theirs, mine.detach()):
                    raise ValueError(
                        f"tied[{k}]: {na!r} (stage {sa}) and {nb!r} (stage {sb}) differ in value"
                    )
                out.append(("remote", mine, peer, here < other, 240 + k % 8))
        return out

    def _param(self, local_model: dict, stage: int, pname: str, k: int) -> nn.Parameter | None:
        if stage not in local_model:
            return None
        params = dict(self.module[local_model[stage][0]].named_parameters())
        if pname not in params:
            raise ValueError(
                f"tied[{k}]: model stage {stage} has no parameter {pname!r}; it has {sorted(params)}"
            )
        return params[pname]

    # ---------------------------------------------------------------------------------------------------
    # schedules

    def schedule(self, num_chunks: int, forward: bool = False) -> Schedule:
        """The (validated, cached) schedule this pipeline runs for ``num_chunks`` micro-batches."""
        key = (num_chunks, forward)
        if key not in self._schedules:
            if not isinstance(num_chunks, int) or isinstance(num_chunks, bool):
                raise ValueError(f"num_chunks={num_chunks!r} must be an int")
            try:
                sched = build(self.schedule_name, self.pp, num_chunks)
            except ValueError as e:
                raise ValueError(
                    f"{type(self).__name__}.step: num_chunks={num_chunks} does not fit {self.pp} pipeline "
                    f"ranks: {e}"
                ) from None
            self._schedules[key] = forward_only(sched) if forward else sched
        return self._schedules[key]

    def _plan(self, num_chunks: int, forward: bool, early: bool) -> tuple[frozenset, dict]:
        """(early-sent message keys, coalesced groups) of a schedule under one message plan."""
        pk = (num_chunks, forward, early)
        if pk not in self._plans:
            sched = self.schedule(num_chunks, forward)
            keys = early_sends(sched) if early else frozenset()
            self._plans[pk] = (keys, message_groups(sched, keys) if self.coalesce else {})
        return self._plans[pk]

    @property
    def early_send(self) -> bool | None:
        """Whether F&B actions send their activation early (``True``/``False`` as constructed, or the
        ``"auto"`` decision; ``None`` while the first training steps still time both plans)."""
        if self._tuner is None:
            return self.early_send_setting is True
        return self._tuner.decided

    def _decide_early_send(self) -> None:
        """A block of trials timed: sum the times over the pipeline's ranks (one all-reduce) and let the
        tuner decide or ask for more."""
        tuner = self._tuner
        assert tuner is not None
        summed = self._collective(
            self.group,
            tuner.times,
            torch.float64,
            "agreeing on early_send='auto'",
            lambda t: (dist.all_reduce(t, group=self.group, async_op=True), t),
        )
        tuner.decide(summed.tolist())

    def simulate(self, num_chunks: int, costs: Costs | Sequence[Costs] | StageCosts) -> SimResult:
        """Price this pipeline's schedule (e.g. to draw it beside ``self.timeline``)."""
        early = self.early_send
        return simulate(self.schedule(num_chunks), costs, check=False, fb_halves=early is None or early)

    # ---------------------------------------------------------------------------------------------------
    # step

    def _split(self, tensors: Sequence[Any], num_chunks: int, what: str) -> list[tuple]:
        parts = []
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"{what}[{i}] is a {type(t).__name__}; pass tensors (batch along {self.batch_dim=})"
                )
            if t.dim() <= self.batch_dim or t.shape[self.batch_dim] < num_chunks:
                raise ValueError(
                    f"{what}[{i}] has shape {tuple(t.shape)}: its batch dim {self.batch_dim} must hold at "
                    f"least num_chunks={num_chunks} samples"
                )
            parts.append(torch.tensor_split(t, num_chunks, dim=self.batch_dim))
        return list(zip(*parts))

    def step(
        self,
        *inputs: Tensor,
        num_chunks: int,
        criterion: Any = None,
        labels: Sequence[Tensor] = (),
        return_outputs: bool = False,
    ) -> tuple[Tensor | None, Tensor | tuple[Tensor, ...] | None]:
        """Run one pipelined step over ``num_chunks`` micro-batches (see the module docstring)."""
        grad = torch.is_grad_enabled()
        sched = self.schedule(num_chunks, forward=not grad)
        plan = self._rank_plans.get(id(sched))  # the schedules are kept by self.schedule(): ids stay
        if plan is None:
            plan = self._rank_plans[id(sched)] = RankPlan(sched, self.rank)
        first, last = plan.first, plan.last
        name = type(self).__name__
        mb_inputs: dict[int, tuple] = {}
        if first:
            if not inputs:
                raise ValueError(
                    f"{name}.step on pipeline rank {self.rank}: this rank feeds the first stage; pass inputs"
                )
            split = self._split(inputs, num_chunks, "inputs")
            mb_inputs = {m: split[m] for m in first}
        mb_labels: dict[int, tuple] = {}
        if last and (grad or criterion is not None):
            if criterion is None:
                raise ValueError(
                    f"{name}.step on pipeline rank {self.rank}: this rank computes losses; pass criterion"
                )
            if not labels:
                raise ValueError(
                    f"{name}.step on pipeline rank {self.rank}: this rank computes losses; pass labels"
                )
            split = self._split(labels, num_chunks, "labels")
            mb_labels = {m: split[m] for m in last}
        self._step_id += 1
        io = StepIO(mb_inputs, mb_labels, criterion, return_outputs, (num_chunks, self._step_id))
        t0 = time.perf_counter()
        if grad and self._tuner is not None:  # "auto": a trial step, or the decision once made
            early = self._tuner.next_mode()
            trial = self._tuner.timing
        else:  # forward-only schedules have no F&B actions: the plan does not matter
            early, trial = self.early_send is not False, False
        early_keys, groups = self._plan(num_chunks, not grad, early)
        mirror = None
        if grad and self.schedule_name == "dualpipe" and dist.get_backend(self.group) != "nccl":
            # each module's mirror exchange starts after its last weight-gradient action (P2P matched by
            # tag; NCCL matches in order, so there it stays after the step)
            mirror = MirrorExchange(self.p2p, list(self.module))
        engine = Engine(
            sched,
            list(self.module),
            self.p2p,
            self.policy,
            self.overlap,
            self.device,
            self._meta,
            groups,
            early_keys,
            mirror.start if mirror is not None else None,
            plan,
        )
        res = engine.run(io)
        t_engine = time.perf_counter() - t0
        if grad:
            self._reduce_grads(mirror)
        loss = self._losses(res["losses"], num_chunks, bool(last))
        outputs = self._outputs(res["outputs"]) if return_outputs and last else None
        self.timeline = res["timeline"]
        self.stats = dict(
            step_time=time.perf_counter() - t0,
            schedule_time=t_engine,
            busy=res["busy"],
            bubble=res["bubble"],
            peak_activations=res["peak_activations"],
            peak_activations_until_w=res["peak_activations_until_w"],
            early_send=early,
        )
        if trial and self._tuner.record(self.stats["step_time"]):  # type: ignore[union-attr]
            self._decide_early_send()
        return loss, outputs

    def _reduce_grads(self, mirror: MirrorExchange | None = None) -> None:
        if mirror is not None:
            mirror.finish()
        elif self.schedule_name == "dualpipe":
            sum_mirror_grads(self.p2p, list(self.module))
        for tie in self._ties:
            if tie[0] == "local":
                sum_tied_local(tie[1], tie[2])
            else:
                sum_tied_remote(self.p2p, tie[2], tie[1], tie[3], tie[4])
        if self.dp_group is not None:
            allreduce_dp(list(self.module), self.dp_group, self.dp_average, self.p2p.timeout_s)

    def _losses(self, local: dict[int, Tensor], num_chunks: int, is_loss_rank: bool) -> Tensor | None:
        if not is_loss_rank or not local:
            return None
        if self.schedule_name == "dualpipe":
            peer = self.pp - 1 - self.rank  # ranks 0 and pp-1 each computed one direction's losses
            mine = torch.stack([local[m] for m in sorted(local)]).float().contiguous()
            theirs = torch.empty_like(mine)
            ws = self.p2p.isend(mine, peer, make_tag(KIND_X, 252, 0, 0))
            wr = self.p2p.irecv(theirs, peer, make_tag(KIND_X, 252, 0, 0))
            self.p2p.wait(wr, peer, "receiving the other direction's losses")
            self.p2p.wait(ws, peer, "sending this direction's losses")
            both = (mine, theirs) if min(local) == 0 else (theirs, mine)
            return torch.cat(both)
        return torch.stack([local[m] for m in range(num_chunks)])

    def _outputs(self, local: dict[int, tuple]) -> Tensor | tuple[Tensor, ...] | None:
        if not local:
            return None
        mbs = sorted(local)
        n = len(local[mbs[0]])
        cat = tuple(torch.cat([local[m][i] for m in mbs], dim=self.batch_dim) for i in range(n))
        return cat[0] if n == 1 else cat


class DualPipe(Pipeline):
    """DualPipe: ``modules=(model stage r, model stage pp-1-r)`` on pipeline rank r (pp even)."""

    schedule_name = "dualpipe"
    modules_per_rank = 2


class DualPipeV(Pipeline):
    """DualPipeV: 2 pp model stages placed as a V; ``modules=(stage r, stage 2pp-1-r)`` on rank r."""

    schedule_name = "dualpipev"
    modules_per_rank = 2


class Pipeline1F1B(Pipeline):
    """1F1B: one stage per rank."""

    schedule_name = "1f1b"
    modules_per_rank = 1


class PipelineZB1P(Pipeline):
    """Zero-bubble H1: 1F1B order and memory, weight gradients split off and deferred."""

    schedule_name = "zb1p"
    modules_per_rank = 1


def gather_timeline(pipe: Pipeline) -> list[Event] | None:
    """All ranks' events of the last step on pipeline rank 0 (``None`` elsewhere); a collective."""
    out: list[Any] = [None] * pipe.pp
    dist.all_gather_object(out, pipe.timeline, group=pipe.group)
    return [e for evs in out for e in evs] if pipe.rank == 0 else None
