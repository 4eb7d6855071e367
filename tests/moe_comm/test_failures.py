"""Bad input raises clearly; peers that disagree raise on every rank; a dead or hung peer is named in time."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from moe_comm import Dispatcher, PeerError
from tests.distributed import RankFailure, run_ranks


def _inputs(T=6, H=16, K=2, E=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return torch.randn(T, H, generator=g).to(dtype), idx, torch.rand(T, K, generator=g)


def test_bad_local_input():
    d = Dispatcher.local(8)
    x, idx, w = _inputs()
    bad = idx.clone()
    bad[2, 1] = 8
    with pytest.raises(ValueError, match=r"topk_idx holds expert id 8, outside \[0, num_experts=8\)"):
        d.dispatch(x, bad, w)
    bad[2, 1] = -2
    with pytest.raises(ValueError, match="expert id -2"):
        d.dispatch(x, bad, w)
    with pytest.raises(ValueError, match=r"top-k=9 \(topk_idx.shape\[1\]\) must be <= num_experts=8"):
        d.dispatch(x, torch.zeros(6, 9, dtype=torch.long), torch.rand(6, 9))
    with pytest.raises(ValueError, match="topk_weights must be a float tensor of topk_idx's shape"):
        d.dispatch(x, idx, w[:, :1])
    with pytest.raises(ValueError, match=r"topk_idx.shape=\(5, 2\) must have x.shape\[0\]=6 rows"):
        d.dispatch(x, idx[:5], w[:5])
    with pytest.raises(ValueError, match="x must be a \\(num_tokens, hidden\\) float tensor"):
        d.dispatch(x[None], idx, w)
    with pytest.raises(ValueError, match="payload='int4' must be one of"):
        d.dispatch(x, idx, w, payload="int4")
    res = d.dispatch(x, idx, w)
    with pytest.raises(
        ValueError, match=r"y.shape=\(3, 16\): y.shape\[0\] must equal the dispatched rows 12"
    ):
        d.combine(res.x[:3], res.handle)
    with pytest.raises(ValueError, match="another Dispatcher"):
        Dispatcher.local(8).combine(res.x, res.handle)
    with pytest.raises(ValueError, match="num_tokens=6 exceeds capacity=4"):
        Dispatcher.local(8, capacity=4).dispatch(x, idx, w)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_experts=0 must be a positive multiple of the world size 1"):
        Dispatcher.local(0)
    with pytest.raises(ValueError, match="align=0 must be >= 1"):
        Dispatcher.local(8, align=0)
    with pytest.raises(ValueError, match="hierarchical=True needs several nodes"):
        Dispatcher.local(8, hierarchical=True)
    with pytest.raises(ValueError, match="timeout=0 must be > 0"):
        Dispatcher.local(8, timeout=0)


def _mismatch(rank: int, world_size: int) -> list[str]:
    d = Dispatcher(dist.group.WORLD, 8, timeout=30)
    errors = []
    for case in [
        _inputs(H=32 if rank == 1 else 16),
        _inputs(dtype=torch.bfloat16 if rank == 2 else torch.float32),  # dtype differs on rank 2
        _inputs(K=3 if rank == 0 else 2),  # top-k differs on rank 0
    ]:
        try:
            d.dispatch(*case)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    res = d.dispatch(*_inputs(seed=rank))  # the group is still usable after the checks
    d.combine(res.x, res.handle)
    return errors


def test_peers_that_disagree_raise_on_every_rank():
    out = run_ranks(_mismatch, 4)
    for rank, errors in enumerate(out):
        hidden, dtype, topk = errors
        assert (
            "hidden size=" in hidden and "every rank of the expert-parallel group must use the same" in hidden
        )
        assert ("rank 1 called with hidden size=32" in hidden) != (rank == 1), hidden
        assert (
            "dtype=torch.bfloat16" in dtype
            and "dtype=torch.float32" in dtype
            and (("rank 2 called with" in dtype) != (rank == 2))
        ), dtype
        assert "top-k=" in topk and (("rank 0 called with top-k=3" in topk) != (rank == 0)), topk


def _dead_or_hung(rank: int, world_size: int, victim: int, mode: str, timeout: float):
    d = Dispatcher(dist.group.WORLD, 8, timeout=timeout)
    res = d.dispatch(*_inputs(seed=rank))  # one good round trip first
    d.combine(res.x, res.handle)
    if rank == victim:
        if mode == "dead":
            os._exit(3)
        time.sleep(2 * timeout + 1)  # hung: does not join the next collective before the others gave up
        return "slept"
    t0 = time.monotonic()
    try:
        res = d.dispatch(*_inputs(seed=rank))
        d.combine(res.x, res.handle)
    except PeerError as e:
        return {"seconds": time.monotonic() - t0, "peers": e.peers, "message": str(e)}
    return "no error"


@pytest.mark.parametrize("mode", ["dead", "hung"])
def test_dead_or_hung_peer_is_named_within_bounded_time(mode):
    timeout = 20.0 if mode == "dead" else 2.0
    out = run_ranks(_dead_or_hung, 4, args=(2, mode, timeout), return_exceptions=True, timeout=90)
    for rank, o in enumerate(out):
        if rank == 2:
            assert isinstance(o, RankFailure) if mode == "dead" else o == "slept"
            continue
        assert isinstance(o, dict), f"rank {rank}: {o}"
        assert o["peers"] == [2] and "no answer from rank 2" in o["message"], o
        # dead: the closed connection is seen at once; hung: the timeout, then the probe's (bounded) wait.
        assert o["seconds"] < (10.0 if mode == "dead" else 2 * timeout + 3), o
