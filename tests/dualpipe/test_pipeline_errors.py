"""Bad input raises clearly on every rank, and a peer that dies makes the others raise within a
bounded time, naming it (real gloo processes)."""

import os
import re
import time

import torch
import torch.distributed as dist

from dualpipe.p2p import PeerError
from dualpipe.pipeline import DualPipe, DualPipeV
from dualpipe.tuning import EarlySendTuner
from tests.distributed import RankFailure, run_ranks
from tests.dualpipe.pipeline_models import Stage, batch, criterion


def _expect(fn, exc, pattern: str) -> str:
    try:
        fn()
    except exc as e:
        msg = str(e)
        assert re.search(pattern, msg), msg
        return msg
    raise AssertionError(f"no {exc.__name__} matching {pattern!r}")


def _rank_bad_inputs(rank, world):
    msgs = {}
    # odd PP for DualPipe (3 ranks)
    msgs["odd"] = _expect(
        lambda: DualPipe((Stage(rank), Stage(2 - rank))), ValueError, r"even number.*size 3"
    )
    pair = dist.new_group([0, 1])
    if rank == 2:
        return msgs
    # world size not matching the model: 6 stages on a 2-rank group
    msgs["world"] = _expect(
        lambda: DualPipeV((Stage(rank), Stage(3 - rank)), process_group=pair, num_stages=6),
        ValueError,
        r"num_stages=6 .* 2 ranks .*world size mismatch.* needs 3 ranks",
    )
    # modules that disagree: rank 1's copy of model stage 0 has another width
    other = Stage(0, d=8) if rank == 1 else Stage(1)
    msgs["disagree"] = _expect(
        lambda: DualPipe((Stage(rank), other), process_group=pair),
        ValueError,
        r"DualPipe modules disagree: rank 0's module 0 and rank 1's module 1 .* model stage 0",
    )
    # wrong number of modules
    msgs["count"] = _expect(
        lambda: DualPipe(Stage(rank), process_group=pair), ValueError, r"takes 2 nn.Module"
    )
    msgs["early"] = _expect(
        lambda: DualPipeV((Stage(rank), Stage(3 - rank)), process_group=pair, early_send="yes"),
        ValueError,
        r"early_send='yes' must be True, False, 'auto' or an EarlySendTuner",
    )
    # ranks whose early_send="auto" tuners would check at different steps (their all-reduces would not pair)
    tuner = EarlySendTuner(min_blocks=2 + rank)
    msgs["tuner"] = _expect(
        lambda: DualPipeV((Stage(rank), Stage(3 - rank)), process_group=pair, early_send=tuner),
        ValueError,
        r"ranks disagree on early_send='auto': rank \d's EarlySendTuner has \(min_blocks, max_blocks, skip, "
        r"z\*1000\) = \(\d, 25, 2, 2500\), rank \d's \(\d, 25, 2, 2500\)",
    )
    pipe = DualPipe((Stage(rank), Stage(1 - rank)), process_group=pair, timeout_s=30)
    x, z, ids, y = batch(13)
    # too few micro-batches: DualPipe needs num_chunks >= 2 * pp and even
    msgs["few"] = _expect(
        lambda: pipe.step(x, z, ids, num_chunks=2, criterion=criterion, labels=(y,)),
        ValueError,
        r"num_chunks=2 does not fit 2 pipeline ranks: .*>= 4",
    )
    msgs["odd_chunks"] = _expect(
        lambda: pipe.step(x, z, ids, num_chunks=5, criterion=criterion, labels=(y,)),
        ValueError,
        r"must be even",
    )
    msgs["no_criterion"] = _expect(
        lambda: pipe.step(x, z, ids, num_chunks=4, labels=(y,)),
        ValueError,
        r"computes losses; pass criterion",
    )
    msgs["small_batch"] = _expect(
        lambda: pipe.step(x[:3], z[:3], ids[:3], num_chunks=4, criterion=criterion, labels=(y[:3],)),
        ValueError,
        r"inputs\[0\] has shape \(3, 16\).*at least num_chunks=4",
    )
    # after all that, a correct step still works (nothing was left half-sent)
    loss, _ = pipe.step(x, z, ids, num_chunks=4, criterion=criterion, labels=(y,))
    msgs["ok"] = loss is not None and bool(torch.isfinite(loss).all())
    return msgs


def test_bad_inputs_raise_clearly():
    res = run_ranks(_rank_bad_inputs, 3, timeout=180)
    assert set(res[2]) == {"odd"}
    for r in (0, 1):
        assert res[r]["ok"] is True
        assert set(res[r]) >= {
            "world",
            "disagree",
            "count",
            "few",
            "odd_chunks",
            "no_criterion",
            "small_batch",
            "early",
            "tuner",
        }


class _DiesOnRank2(Stage):
    def __init__(self, s, die):
        super().__init__(s)
        self.die, self.calls = die, 0

    def forward(self, x, z, ids):
        self.calls += 1
        if self.die and self.calls == 3:
            os._exit(7)
        return super().forward(x, z, ids)


def _rank_dead_peer(rank, world, timeout_s):
    pipe = DualPipeV(
        (_DiesOnRank2(rank, rank == 2), _DiesOnRank2(2 * world - 1 - rank, False)), timeout_s=timeout_s
    )
    x, z, ids, y = batch(13)
    t0 = time.monotonic()
    try:
        pipe.step(x, z, ids, num_chunks=8, criterion=criterion, labels=(y,))
    except PeerError as e:
        return ("PeerError", str(e), time.monotonic() - t0)
    return ("finished", "", time.monotonic() - t0)


def test_dead_peer_makes_others_raise_naming_it():
    timeout_s = 20.0
    t0 = time.monotonic()
    res = run_ranks(_rank_dead_peer, 4, args=(timeout_s,), return_exceptions=True, timeout=120)
    wall = time.monotonic() - t0
    assert isinstance(res[2], RankFailure) and "exited with code 7" in res[2].message
    for r in (0, 1, 3):
        kind, msg, took = res[r]
        assert kind == "PeerError", (r, res[r])
        assert took < 2 * timeout_s + 10, (r, took)
    # the dead rank's neighbours name it; rank 0 names the neighbour that failed because of it
    for r in (1, 3):
        assert "pipeline rank 2 (global rank 2)" in res[r][1], res[r][1]
    assert "pipeline rank 1 (global rank 1)" in res[0][1] or "pipeline rank 2" in res[0][1]
    assert wall < 100
