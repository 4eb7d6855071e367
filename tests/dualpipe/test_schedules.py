"""Schedules and simulator (in-process, fast): DeepSeek-V3's bubble/memory table reproduced exactly,
the validator catches broken schedules, P2P costs land on the critical path, traces are written."""

import json
import random

import pytest

from dualpipe.schedules import (
    Action,
    Op,
    Schedule,
    ScheduleError,
    build,
    build_1f1b,
    build_dualpipe,
    build_dualpipev,
    build_zb1p,
    forward_only,
    validate_schedule,
)
from dualpipe.simulate import Costs, DeadlockError, simulate


def _regime_costs(rng: random.Random) -> Costs:
    """Costs in the regime DeepSeek-V3's Table 2 formulas assume: the input backward takes as long as
    the forward (b - w == f), w <= f, and an overlapped F&B pair costs between f + w and f + b."""
    f = rng.uniform(0.5, 2.0)
    w = rng.uniform(0.05, 1.0) * f
    b = f + w
    return Costs(f=f, b=b, w=w, fb=rng.uniform(f + w, f + b))


# schedule -> (bubble formula in model stages PP, activations, param copies); PP = stages of the model
TABLE = {
    "1f1b": (lambda PP, c: (PP - 1) * (c.f + c.b), lambda PP: PP, 1),
    "zb1p": (lambda PP, c: (PP - 1) * (c.f + c.b - 2 * c.w), lambda PP: PP, 1),
    "dualpipe": (lambda PP, c: (PP / 2 - 1) * (c.overlapped + c.b - 3 * c.w), lambda PP: PP + 1, 2),
    "dualpipev": (lambda PP, c: (PP / 2 - 1) * (c.overlapped + c.b - 3 * c.w), lambda PP: PP + 1, 2),
}


@pytest.mark.parametrize("name", sorted(TABLE))
@pytest.mark.parametrize("PP", [4, 8, 16])
def test_bubble_and_memory_table(name, PP):
    bubble, acts, copies = TABLE[name]
    devices = PP // 2 if name == "dualpipev" else PP  # DualPipeV: PP stages on PP/2 devices
    rng = random.Random(PP * 31 + len(name))
    counts = [2 * PP, 2 * PP + 2, 3 * PP] if name.startswith("dual") else [PP, PP + 3, 2 * PP + 1]
    if name == "dualpipev":
        counts = [2 * devices, 2 * devices + 1, 3 * devices + 1]
    for m in counts:
        sched = build(name, devices, m)
        for _ in range(4):
            costs = _regime_costs(rng)
            r = simulate(sched, costs, check=False)
            assert max(r.bubble) == pytest.approx(bubble(PP, costs), rel=1e-12, abs=1e-12), (
                name,
                PP,
                m,
                costs,
            )
            assert max(r.peak_activations) == acts(PP), (name, PP, m, r.peak_activations)
            assert r.param_copies == copies
            assert r.step_time == pytest.approx(max(r.busy) + min(r.bubble), rel=1e-12)


def test_1f1b_bubble_holds_for_any_costs():
    rng = random.Random(1)
    for pp, m in [(2, 3), (4, 9), (8, 8)]:
        for _ in range(5):
            c = Costs(f=rng.uniform(0.1, 3), b=rng.uniform(0.1, 3), w=0.0)
            r = simulate(build_1f1b(pp, m), c)
            assert r.step_time == pytest.approx((m + pp - 1) * (c.f + c.b))
            assert r.bubble == pytest.approx([(pp - 1) * (c.f + c.b)] * pp)


def test_zb1p_keeps_1f1b_memory_until_w():
    r = simulate(build_zb1p(8, 20), Costs(f=1.0, b=2.0, w=1.0))
    assert r.peak_activations == [8 - i for i in range(8)]
    assert r.peak_activations_until_w == [8] * 8  # rank r holds pp - r in flight plus r owed W's
    assert r.bubble_fraction < simulate(build_1f1b(8, 20), Costs(f=1.0, b=2.0, w=1.0)).bubble_fraction


def test_p2p_costs_on_the_critical_path():
    # pp=2, one micro-batch: F(r0) -> send -> F(r1) -> BW(r1) -> send -> BW(r0); 2 transfers on the path
    lat, nbytes, bw = 0.25, 3e6, 1e7
    c = Costs(f=1.0, b=2.0, p2p_latency=lat, activation_bytes=nbytes, p2p_bandwidth=bw)
    r = simulate(build_1f1b(2, 1), c)
    assert r.step_time == pytest.approx(1 + 1 + 2 + 2 + 2 * (lat + nbytes / bw))
    assert len(r.transfers) == 2 and all(t.duration == pytest.approx(lat + nbytes / bw) for t in r.transfers)
    # more latency is never faster, for every schedule
    for name, pp, m in [("dualpipe", 4, 8), ("dualpipev", 4, 10), ("zb1p", 4, 6)]:
        times = [
            simulate(build(name, pp, m), Costs(1, 2, 1, 2.5, p2p_latency=x)).step_time for x in (0, 0.1, 0.5)
        ]
        assert times == sorted(times) and times[0] < times[-1]


def test_per_rank_costs():
    sched = build_dualpipe(4, 8)
    base = simulate(sched, Costs(1, 2, 1, 2.5))
    slow = simulate(sched, [Costs(1, 2, 1, 2.5)] * 3 + [Costs(2, 4, 2, 5.0)])
    assert slow.step_time > base.step_time
    assert slow.busy[3] == pytest.approx(2 * base.busy[3])
    with pytest.raises(ValueError, match="one per rank"):
        simulate(sched, [Costs(1, 2, 1)] * 3)


def test_every_builder_validates_and_forward_only():
    for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        for pp in (1, 2, 3, 4, 8) if not name.startswith("dual") else (2, 4, 6):
            m = 2 * pp + 2
            s = build(name, pp, m)
            validate_schedule(s, strict_fifo=False)
            fo = forward_only(s)
            validate_schedule(fo, forward_only=True)
            assert all(a.op in (Op.F, Op.SEND_F, Op.RECV_F) for acts in fo.actions for a in acts)


def test_dualpipe_layout_and_phases():
    s = build_dualpipe(4, 8)
    assert s.local_stages(0) == (0, 7) and s.local_stages(3) == (3, 4)
    assert [s.stage_model[x] for x in s.local_stages(1)] == [1, 2]  # model stages r and pp-1-r
    assert s.chains == ((0, 1, 2, 3), (4, 5, 6, 7))
    # rank 0 starts with 2 * (pp/2 - 1) forwards of its near (down) direction, then F0 F1 pairs
    ops = [str(a) for a in s.compute_actions(0)[:4]]
    assert ops == ["F0.0", "F0.1", "F0.2", "F7.4"]
    v = build_dualpipev(4, 8)
    assert v.local_stages(3) == (3, 4) and v.chains == (tuple(range(8)),)


def _replace(s: Schedule, rank: int, acts) -> Schedule:
    actions = list(s.actions)
    actions[rank] = tuple(acts)
    return Schedule(
        s.name,
        s.num_ranks,
        s.num_microbatches,
        s.stage_rank,
        s.stage_model,
        s.chains,
        s.mb_chain,
        tuple(actions),
    )


def test_validator_catches_broken_schedules():
    s = build_1f1b(3, 4)
    acts = list(s.actions[1])
    w = next(i for i, a in enumerate(acts) if a.op is Op.BW)
    with pytest.raises(ScheduleError, match="B1.0 is missing"):
        validate_schedule(_replace(s, 1, acts[:w] + [Action(Op.F, 1, 0)] + acts[w + 1 :]))
    with pytest.raises(ScheduleError, match="done twice"):
        validate_schedule(_replace(s, 1, acts + [Action(Op.BW, 1, 0)]))
    sends = [i for i, a in enumerate(acts) if a.op is Op.SEND_F]
    with pytest.raises(ScheduleError, match="0 receives|0 sends|1 sends and 0"):
        validate_schedule(_replace(s, 1, [a for i, a in enumerate(acts) if i != sends[0]]))
    with pytest.raises(ScheduleError, match="lives on rank"):
        validate_schedule(_replace(s, 1, acts + [Action(Op.F, 2, 0)]))
    # rank 0 holds back F(mb 1)'s activation until after its last backward, which needs it: deadlock
    s2 = build_1f1b(2, 2)
    a0 = [a for a in s2.actions[0] if str(a) != "SEND_F0.1@1"] + [Action(Op.SEND_F, 0, 1, peer=1)]
    with pytest.raises(DeadlockError, match=r"rank 0 waits at #\d+ BW0.1"):
        validate_schedule(_replace(s2, 0, a0))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"pp=3 must be even"):
        build_dualpipe(3, 12)
    with pytest.raises(ValueError, match=r"num_microbatches=6 must be an int >= 8"):
        build_dualpipe(4, 6)
    with pytest.raises(ValueError, match=r"num_microbatches=9 must be even"):
        build_dualpipe(4, 9)
    with pytest.raises(ValueError, match=r"num_microbatches=7 must be an int >= 8"):
        build_dualpipev(4, 7)
    with pytest.raises(ValueError, match="schedule name='gpipe'"):
        build("gpipe", 4, 8)
    with pytest.raises(ValueError, match="w=3 must be <= b=2"):
        Costs(f=1, b=2, w=3)


def test_chrome_trace_and_png(tmp_path):
    r = simulate(build_dualpipev(4, 8), Costs(1, 2, 1, 2.5, p2p_latency=0.05))
    trace = json.loads(r.write_chrome_trace(tmp_path / "t.json").read_text())
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    assert len(spans) == len(r.timeline) + len(r.transfers)
    assert {e["tid"] for e in spans if e["cat"] in ("F", "FB")} == {0, 1, 2, 3}
    png = r.plot(tmp_path / "t.png", measured=r.timeline)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coalesced_message_groups():
    from dualpipe.coalesce import _consumer_positions, early_sends, message_groups
    from dualpipe.validate import message_key

    s = build_dualpipev(2, 8)
    groups = set(message_groups(s).values())
    assert len(groups) == 11  # F&B pairs: activation + gradient to the same neighbour
    for g in groups:
        assert {k[0] for k in g.keys} == {"F", "B"} and g.src != g.dst
        recv = {
            message_key(a, s): i for i, a in enumerate(s.actions[g.dst]) if a.op in (Op.RECV_F, Op.RECV_B)
        }
        need = _consumer_positions(s, g.dst)
        assert max(recv[k] for k in g.keys) < min(need[k] for k in g.keys)  # one receive, posted in time
    assert message_groups(build_1f1b(4, 8)) == {}
    # F&B activations sent from inside the action: one per F&B whose activation leaves the rank, never
    # coalesced (DualPipeV pp=2: the 11 pairs above lose their activation, so no group is left)
    early = early_sends(s)
    n_fb_sends = sum(
        1
        for r, acts in enumerate(s.actions)
        for a in acts
        if a.op is Op.FB and s.next_stage(a.stage) is not None and s.stage_rank[s.next_stage(a.stage)] != r
    )
    assert len(early) == n_fb_sends == 11 and all(k[0] == "F" for k in early)
    assert message_groups(s, early) == {}
    assert early_sends(build_1f1b(4, 8)) == frozenset()


def test_simulate_fb_halves_prices_early_sends():
    """fb_halves: an F&B's activation leaves after its forward half and its gradient is awaited at the
    backward half, so a P2P latency below f no longer sits between dependent F&B actions."""
    s = build_dualpipev(2, 8)
    for lat, plain_step, halves_step in ((0.0, 50.0, 49.0), (0.5, 54.0, 51.0)):
        c = Costs(1, 2, 1, p2p_latency=lat)
        plain, halves = simulate(s, c), simulate(s, c, fb_halves=True)
        assert plain.step_time == pytest.approx(plain_step) and halves.step_time == pytest.approx(halves_step)
        assert halves.busy == pytest.approx(plain.busy)  # a wait inside an F&B is bubble, not busy time
        # an F&B's recorded span never overlaps the next action on its rank
        for r in range(2):
            evs = [e for e in halves.timeline if e.rank == r]
            assert all(a.end <= b.start + 1e-12 for a, b in zip(evs, evs[1:]))
    # schedules without F&B actions are priced the same either way
    z = build_zb1p(4, 8)
    c = Costs(1, 2, 1, p2p_latency=0.3)
    assert simulate(z, c, fb_halves=True).step_time == simulate(z, c).step_time


def test_last_weight_actions_start_mirror_exchanges_early():
    """DualPipe: the module whose chain ends first on a rank has its gradients final before the last
    action, so its mirror exchange can overlap the rest of the schedule."""
    from dualpipe.runtime import _last_weight_actions

    s = build_dualpipe(4, 8)
    for r in range(4):
        done = _last_weight_actions(s, r)
        assert sorted(done.values()) == [0, 1]
        acts = s.actions[r]
        for i, local in done.items():
            st = s.local_stages(r)[local]
            later = acts[i + 1 :]
            assert not any(a.stage == st and a.op in (Op.W, Op.BW, Op.B) for a in later)
            assert not any(a.op is Op.FB and a.stage2 == st for a in later)
    # ranks 0 and pp-1 finish one module 6 actions before the end
    assert min(_last_weight_actions(s, 0)) == len(s.actions[0]) - 7


def test_plot_without_labels(tmp_path):
    from dualpipe.trace import plot_timelines

    r = simulate(build_dualpipev(4, 8), Costs(1.0, 2.0, 1.0))
    for n in (0, 10_000):  # labels off (too many bars) and on
        png = plot_timelines({"sim": r.timeline}, tmp_path / f"t{n}.png", max_labels=n)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_costs_price_each_stage_and_fb_pair():
    from dualpipe.simulate import StageCosts

    # equal stages: the same as one Costs for every rank
    for s in (build_dualpipe(4, 8), build_dualpipev(4, 8), build_1f1b(4, 8)):
        c = Costs(1.0, 2.0, 0.5, fb=2.6, p2p_latency=0.1)
        same = StageCosts([c] * s.num_model_stages)
        assert simulate(s, same).step_time == pytest.approx(simulate(s, c).step_time)
    # different stages: every action runs at its own stage's cost, F&B at its pair's
    s = build_dualpipe(4, 8)
    stages = [Costs(1.0 + 0.3 * m, 2.0 + 0.5 * m, 0.5 + 0.1 * m) for m in range(4)]
    fb = {(0, 3): 3.3, (3, 0): 3.9}
    sc = StageCosts(stages, fb)
    r = simulate(s, sc)
    model = s.stage_model
    for e in r.timeline:
        if e.op == "FB":
            want = sc.pair(model[e.stage], model[e.stage2])
            m, n = model[e.stage], model[e.stage2]
            assert want == pytest.approx(fb[(m, n)] if (m, n) in fb else stages[m].f + stages[n].b)
        else:
            want = stages[model[e.stage]].duration(Op(e.op))
        assert e.duration == pytest.approx(want), e
    # the per-rank mean (the old approximation) prices the same totals per rank but another order
    mean = [
        Costs(*(sum(getattr(stages[model[st]], k) for st in s.local_stages(q)) / 2 for k in ("f", "b", "w")))
        for q in range(4)
    ]
    assert simulate(s, mean).step_time != pytest.approx(r.step_time)
    # overlap gains (f + b - fb) average over the pair; a stage paired with itself runs its own fb
    g = StageCosts([Costs(1.0, 2.0, 0.5, fb=2.4), Costs(2.0, 4.0, 1.0)])
    assert g.pair(0, 0) == pytest.approx(2.4) and g.pair(1, 1) == pytest.approx(6.0)
    assert g.pair(0, 1) == pytest.approx(1.0 + 4.0 - 0.3) and g.pair(1, 0) == pytest.approx(2.0 + 2.0 - 0.3)
    with pytest.raises(ValueError, match="model stages"):
        simulate(s, StageCosts(stages[:3]))
    with pytest.raises(ValueError, match="out of range"):
        simulate(s, StageCosts(stages, {(0, 4): 1.0}))


def test_fused_backwards_only_where_nothing_runs_between_b_and_w():
    from dualpipe.runtime import fused_backwards

    for s, want in ((build_dualpipev(2, 8), 2), (build_zb1p(2, 8), 8), (build_1f1b(2, 8), 0)):
        got = 0
        for r, acts in enumerate(s.actions):
            fused = fused_backwards(s, r)
            got += len(fused)
            for i, a in enumerate(acts):
                if a.op is Op.B and (a.stage, a.mb) in fused:
                    j = next(
                        k for k, x in enumerate(acts) if x.op is Op.W and (x.stage, x.mb) == (a.stage, a.mb)
                    )
                    assert all(x.op in (Op.RECV_F, Op.RECV_B) for x in acts[i + 1 : j])
        assert got == want, s.name
