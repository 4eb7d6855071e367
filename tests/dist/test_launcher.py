"""The multi-process test helper itself: results come back per rank, failures name the rank."""

import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed import RankFailure, run_ranks


def _allreduce_rank(rank: int, world_size: int, scale: float) -> torch.Tensor:
    t = torch.full((3,), float(rank) * scale)
    dist.all_reduce(t)
    return t


def _fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def _die_on_rank_zero(rank: int, world_size: int) -> int:
    if rank == 0:
        os._exit(3)
    return rank


def test_results_by_rank():
    out = run_ranks(_allreduce_rank, 3, args=(2.0,))
    expected = torch.full((3,), 2.0 * (0 + 1 + 2))
    for t in out:
        torch.testing.assert_close(t, expected, rtol=0, atol=0)


def test_failure_names_rank():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1:.*boom on purpose"):
        run_ranks(_fail_on_rank_one, 2)
    out = run_ranks(_fail_on_rank_one, 2, return_exceptions=True)
    assert out[0] == 0 and isinstance(out[1], RankFailure)


def test_dead_process_is_reported():
    out = run_ranks(_die_on_rank_zero, 2, return_exceptions=True, timeout=60)
    assert isinstance(out[0], RankFailure) and "exited with code 3" in out[0].message
    assert out[1] == 1
