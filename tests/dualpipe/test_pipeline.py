"""DualPipe, DualPipeV, 1F1B and ZB1P on real gloo processes against a single-process run of the same
model and micro-batches (FP32, every loss and gradient within 1e-6 relative).

Few launches, each checking several things: PP in {2, 4, 8}; weight split generic / linear / off;
three-tensor boundaries (float hidden, float side state, int64 ids) whose micro-batch shapes differ
(13 samples in 4 or 8 chunks); a stage with communication points (the overlap hook); tied parameters;
two pipelines in one process; forward-only steps; DP=2 x PP=2.
"""

import re

import torch
import torch.distributed as dist

from dualpipe.overlap import sequential
from dualpipe.pipeline import DualPipe, DualPipeV, Pipeline1F1B, PipelineZB1P, gather_timeline
from dualpipe.schedules import build_dualpipe
from dualpipe.simulate import Costs, simulate
from dualpipe.tuning import EarlySendTuner
from tests.distributed import run_ranks
from tests.dualpipe.pipeline_models import batch, criterion, make_stage, reference_full, rel_err

TOL = 1e-6
CLASSES = {"dualpipe": DualPipe, "dualpipev": DualPipeV, "1f1b": Pipeline1F1B, "zb1p": PipelineZB1P}


def _num_stages(kind: str, pp: int) -> int:
    return 2 * pp if kind == "dualpipev" else pp


def _build(
    kind,
    pp,
    rank,
    split,
    stage_kind="plain",
    tie=False,
    group=None,
    dp_group=None,
    coalesce=True,
    early=True,
    overlap=None,
):
    S = _num_stages(kind, pp)
    last = S - 1

    def mk(s):
        return make_stage(s, stage_kind, tie_to=(last if s == 0 else 0) if tie and s in (0, last) else None)

    if kind == "dualpipe":
        mods = (mk(rank), mk(pp - 1 - rank))
    elif kind == "dualpipev":
        mods = (mk(rank), mk(2 * pp - 1 - rank))
    else:
        mods = mk(rank)
    tied = [((0, "side.weight"), (last, "side.weight"))] if tie else ()
    return CLASSES[kind](
        mods,
        process_group=group,
        dp_group=dp_group,
        weight_split=split,
        tied=tied,
        timeout_s=60,
        coalesce=coalesce,
        early_send=early,
        overlap=overlap,
    )


def _grads(pipe):
    model = [pipe._layout.stage_model[s] for s in pipe.local_stages]
    return [(ms, {k: p.grad.clone() for k, p in m.named_parameters()}) for ms, m in zip(model, pipe.module)]


def _rows(num_chunks: int) -> int:
    """Samples per batch: never a multiple of num_chunks, so micro-batch shapes differ."""
    return 13 if num_chunks <= 12 else 2 * num_chunks + 5


def _train(pipe, num_chunks, seed=7):
    x, z, ids, y = batch(_rows(num_chunks), seed)
    for p in pipe.parameters():
        p.grad = None
    loss, out = pipe.step(
        x, z, ids, num_chunks=num_chunks, criterion=criterion, labels=(y,), return_outputs=True
    )
    return dict(loss=loss, out=out, grads=_grads(pipe), stats=dict(pipe.stats))


def _rank_matrix(rank, world, cases):
    """Run each (kind, split, stage_kind, tie, num_chunks) case on this launch's ranks."""
    out = []
    for kind, split, stage_kind, tie, nc in cases:
        pipe = _build(kind, world, rank, split, stage_kind, tie)
        out.append(_train(pipe, nc))
    return out


def _check(results_by_rank, case, idx):
    kind, split, stage_kind, tie, nc = case
    world = len(results_by_rank)
    losses, ref = reference_full(_num_stages(kind, world), nc, n=_rows(nc), kind=stage_kind, tie=tie)
    seen_loss = 0
    for r, res in enumerate(results_by_rank):
        got = res[idx]
        if got["loss"] is not None:
            assert rel_err(got["loss"], losses[0]) <= TOL, (case, r)
            seen_loss += 1
        for ms, grads in got["grads"]:
            for k, g in grads.items():
                assert rel_err(g, ref[ms][k]) <= TOL, (case, r, ms, k, rel_err(g, ref[ms][k]))
    assert seen_loss == (2 if kind == "dualpipe" else 1), case
    if kind == "dualpipe":  # the two copies of every model stage end bitwise equal (mirror sums)
        copies: dict = {}
        for res in results_by_rank:
            for ms, grads in res[idx]["grads"]:
                copies.setdefault(ms, []).append(grads)
        for ms, (a, b) in copies.items():
            assert all(torch.equal(a[k], b[k]) for k in a), (case, ms)


CASES_2 = [
    ("1f1b", "none", "plain", True, 4),  # a tie across ranks 0 and 1
    ("zb1p", "generic", "plain", False, 4),
    ("zb1p", "linear", "plain", False, 5),
    ("zb1p", "generic", "piecewise", False, 4),
    ("dualpipe", "generic", "plain", True, 4),  # a tie held locally on both ranks, plus mirrors
    ("dualpipe", "none", "piecewise", False, 6),
    ("dualpipev", "linear", "piecewise", False, 4),
    ("dualpipev", "generic", "plain", True, 5),
]


_OVERLAP_CALLS: list = []


def _counting_overlap(forward, backward):
    """A user's overlap function: runs the halves one after the other and counts its calls."""
    _OVERLAP_CALLS.append(1)
    sequential(forward, backward)


def _rank_two(rank, world):
    out = _rank_matrix(rank, world, CASES_2)
    # Two pipelines in one process, steps interleaved: each keeps its own weight-gradient state.
    a = _build("dualpipe", world, rank, "linear")
    b = _build("zb1p", world, rank, "linear")
    ra1 = _train(a, 4)
    rb = _train(b, 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ra2 = _train(a, 4)
    spans = sorted({m.group(1) for e in prof.events() if (m := re.match(r"dualpipe\.([A-Z]+)", e.name))})
    train_timeline = list(a.timeline)
    gathered = gather_timeline(a)  # every rank's events on pipeline rank 0
    n_compute = len(a.schedule(4).compute_actions(rank))
    # the same pipeline without coalesced messages ...
    pc = _build("dualpipev", world, rank, "generic", coalesce=False)
    # and with the per-action polling of sends that NCCL gets (gloo's sends never report completion
    # before they are waited: the polling reaps nothing here, but its path runs)
    pc.p2p.completes_early = True
    rc = _train(pc, 5)
    # ... and with F&B activations sent after the action (coalesced with the gradient) instead of early
    rl = _train(_build("dualpipev", world, rank, "generic", early=False), 5)
    # early_send="auto" with short limits: 2 untimed steps (early, coalesced), 2 timed blocks (early,
    # coalesced, coalesced, early), then one decision on every rank; every step computes the same
    # gradients whatever its plan
    tuner = EarlySendTuner(min_blocks=2, max_blocks=2, skip=1)
    pa = _build("dualpipev", world, rank, "generic", early=tuner)
    auto_steps = [_train(pa, 5) for _ in range(12)]
    auto = (auto_steps[7], auto_steps[-1], [st["stats"]["early_send"] for st in auto_steps], pa.early_send)
    # a user's overlap function is called once per F&B action (and trains like the default)
    _OVERLAP_CALLS.clear()
    po = _build("dualpipev", world, rank, "generic", overlap=_counting_overlap)
    ro = _train(po, 5)
    n_fb = sum(act.op.value == "FB" for act in po.schedule(5).compute_actions(rank))
    ro["overlap_calls"] = (len(_OVERLAP_CALLS), n_fb)
    # the boundary shapes change between steps (17 rows instead of 13): the peers notice from the header
    x, z, ids, y = batch(17, 8)
    for p in a.parameters():
        p.grad = None
    loss17, _ = a.step(x, z, ids, num_chunks=4, criterion=criterion, labels=(y,))
    ra3 = dict(loss=loss17, grads=_grads(a))
    # Forward only: losses, no gradients, no backward traffic.
    for p in a.parameters():
        p.grad = None
    x, z, ids, y = batch(13, 7)
    with torch.no_grad():
        loss_fo, out_fo = a.step(
            x, z, ids, num_chunks=4, criterion=criterion, labels=(y,), return_outputs=True
        )
    no_grads = all(p.grad is None for p in a.parameters())
    return dict(
        cases=out,
        two=(ra1, rb, ra2),
        fo=(loss_fo, out_fo, no_grads),
        timeline=a.timeline,
        n17=ra3,
        uncoalesced=rc,
        late=rl,
        auto=auto,
        user_overlap=ro,
        trace=(spans, train_timeline, n_compute),
        gathered=gathered,
    )


def test_pp2_all_schedules_splits_ties_overlap_two_pipelines_forward_only(tmp_path):
    res = run_ranks(_rank_two, 2, timeout=240)
    # per-rank trace: profiler spans for every compute op, and the runtime's own timeline (one event
    # per compute action), drawable beside the simulated one
    timelines = []
    for rr in res:
        spans, timeline, n_compute = rr["trace"]
        assert {"F", "B", "W", "FB"} <= set(spans) and len(timeline) == n_compute
        assert all(0 <= e.start <= e.end for e in timeline)
        timelines += timeline
    assert res[1]["gathered"] is None and sorted(res[0]["gathered"], key=str) == sorted(timelines, key=str)
    sim = simulate(build_dualpipe(2, 4), Costs(1e-3, 2e-3, 1e-3))
    assert sim.plot(tmp_path / "step.png", measured=timelines).stat().st_size > 0
    cases = [r["cases"] for r in res]
    for i, case in enumerate(CASES_2):
        _check(cases, case, i)
    two = [list(r["two"]) for r in res]
    _check([[t[0]] for t in two], ("dualpipe", "linear", "plain", False, 4), 0)
    _check([[t[1]] for t in two], ("zb1p", "linear", "plain", False, 4), 0)
    _check([[t[2]] for t in two], ("dualpipe", "linear", "plain", False, 4), 0)
    _check([[rr["uncoalesced"]] for rr in res], ("dualpipev", "generic", "plain", False, 5), 0)
    _check([[rr["late"]] for rr in res], ("dualpipev", "generic", "plain", False, 5), 0)
    _check([[rr["user_overlap"]] for rr in res], ("dualpipev", "generic", "plain", False, 5), 0)
    for k in (0, 1):  # a coalesced trial step and a step after the decision
        _check([[rr["auto"][k]] for rr in res], ("dualpipev", "generic", "plain", False, 5), 0)
    decisions = {rr["auto"][3] for rr in res}
    assert len(decisions) == 1 and decisions <= {True, False}
    d = decisions.pop()
    assert all(rr["auto"][2] == [True, False] + [True, False, False, True] * 2 + [d, d] for rr in res)
    for rr in res:
        calls, n_fb = rr["user_overlap"]["overlap_calls"]
        assert calls == n_fb > 0
    l17, g17 = reference_full(2, 4, n=17, seed=8)
    for rr in res:
        if rr["n17"]["loss"] is not None:
            assert rel_err(rr["n17"]["loss"], l17[0]) <= TOL
        for ms, grads in rr["n17"]["grads"]:
            assert all(rel_err(g, g17[ms][k]) <= TOL for k, g in grads.items())
    losses, _ = reference_full(2, 4)
    for r, rr in enumerate(res):
        loss_fo, out_fo, no_grads = rr["fo"]
        assert no_grads
        assert rel_err(loss_fo, losses[0]) <= TOL
        # rank 1 ends the down direction (micro-batches 0, 1 = rows 0..6), rank 0 the up one
        train_out = rr["two"][0]["out"]
        assert out_fo[0].shape == ((7, 16) if r == 1 else (6, 16))
        assert len(out_fo) == 3 and out_fo[2].dtype == torch.int64
        assert all(rel_err(a, b) <= TOL for a, b in zip(out_fo[:2], train_out[:2]))
        assert torch.equal(out_fo[2], train_out[2])
        ops = {e.op for e in rr["timeline"]}
        assert ops <= {"F"} and len(rr["timeline"]) == 4  # the forward-only step: 2 stages x 2 chunks


CASES_4 = [
    ("dualpipe", "generic", "plain", False, 8),
    ("dualpipe", "none", "plain", False, 10),
    ("dualpipev", "linear", "plain", False, 8),
    ("dualpipev", "none", "piecewise", False, 9),
    ("zb1p", "generic", "plain", False, 6),
]


def _rank_four(rank, world):
    return _rank_matrix(rank, world, CASES_4)


def test_pp4():
    res = run_ranks(_rank_four, 4, timeout=240)
    for i, case in enumerate(CASES_4):
        _check(res, case, i)
    # measured in-flight activations: DualPipe PP+1 (rank 0), DualPipeV 2 PP+1 (every rank)
    assert res[0][0]["stats"]["peak_activations"] == 5
    assert [r[2]["stats"]["peak_activations"] for r in res] == [9] * 4


CASES_8 = [
    ("dualpipe", "generic", "plain", False, 16),
    ("dualpipev", "none", "plain", False, 16),
    ("dualpipev", "linear", "plain", False, 17),
    ("dualpipe", "none", "plain", False, 16),
]


def _rank_eight(rank, world):
    return _rank_matrix(rank, world, CASES_8)


def test_pp8():
    res = run_ranks(_rank_eight, 8, timeout=300)
    for i, case in enumerate(CASES_8):
        _check(res, case, i)


def _rank_dp_pp(rank, world):
    pp, dp = 2, 2
    pp_groups = [dist.new_group([d * pp + p for p in range(pp)]) for d in range(dp)]
    dp_groups = [dist.new_group([d * pp + p for d in range(dp)]) for p in range(pp)]
    d, p = divmod(rank, pp)
    pipe = _build("dualpipe", pp, p, "generic", group=pp_groups[d], dp_group=dp_groups[p])
    return _train(pipe, 4, seed=7 + d)


def test_dp2_x_pp2():
    res = run_ranks(_rank_dp_pp, 4, timeout=240)
    losses, ref = reference_full(2, 4, replicas=2)
    for rank, got in enumerate(res):
        d = rank // 2
        assert rel_err(got["loss"], losses[d]) <= TOL
        for ms, grads in got["grads"]:
            for k, g in grads.items():
                assert rel_err(g, ref[ms][k]) <= TOL, (rank, ms, k)
