"""early_send="auto": the trial order and the sequential decision (``dualpipe.tuning``); the pipelines'
use of it is tested with real processes in test_pipeline.py."""

import math
import random

import pytest

from dualpipe.tuning import EarlySendTuner


def _run(tuner: EarlySendTuner, step_time) -> list[bool]:
    """Drive the tuner as the pipeline does (one rank: the sums are the local times);
    ``step_time(i, early) -> seconds``."""
    modes = []
    while tuner.decided is None:
        i = len(modes)
        mode = tuner.next_mode()
        modes.append(mode)
        if tuner.timing and tuner.record(step_time(i, mode)):
            tuner.decide(list(tuner.times))
        assert len(modes) < 1000
    return modes


def test_warm_up_then_mirrored_blocks_and_a_clear_difference_decides_at_min_blocks():
    t = EarlySendTuner(min_blocks=2, max_blocks=9, skip=2)
    modes = _run(t, lambda i, early: 0.9 if early else 1.3)
    # warm-up E C E C, then blocks E C C E
    assert modes == [True, False, True, False] + [True, False, False, True] * 2
    assert t.decided is True and t.ratio == pytest.approx(0.9 / 1.3)
    assert t.next_mode() is True and not t.timing  # decided: every later step runs the decision
    t = EarlySendTuner(min_blocks=3, skip=0)
    assert len(_run(t, lambda i, early: 2.0 if early else 1.7)) == 12
    assert t.decided is False


def test_drift_does_not_decide_and_noise_needs_more_blocks():
    # equal plans on a host that slows down 2% per step: each mirrored block cancels the linear drift
    t = EarlySendTuner(min_blocks=2, max_blocks=6, skip=0)
    _run(t, lambda i, early: 1.0 + 0.02 * i)
    assert t.diffs and max(abs(d) for d in t.diffs) < 1e-3
    # 10% apart under 25% independent noise per step (log-normal): more than min_blocks are needed on
    # average, max_blocks bounds the cost and the faster plan wins in ~93% of cases (1000-case runs;
    # five medians per plan, the first version, won in ~68%)
    rng = random.Random(1234)
    blocks, right = [], 0
    for _ in range(200):
        t = EarlySendTuner(min_blocks=3, max_blocks=25, skip=0)
        _run(t, lambda i, early: (1.1 if early else 1.0) * math.exp(rng.gauss(0, 0.25)))
        blocks.append(len(t.diffs))
        right += t.decided is False
    assert max(blocks) <= 25 and sum(blocks) / len(blocks) > 4
    assert right >= 170, right


def test_max_blocks_decides_by_the_median_block():
    t = EarlySendTuner(min_blocks=2, max_blocks=3, skip=0)
    # block differences +0.1, -0.05, -0.02 (log): the mean is within z standard errors, the median < 0
    times = iter([1.1, 1.0, 1.0, 1.1 * 1.0, 1.0, 1.05, 1.05, 1.0, 1.0, 1.02, 1.02, 1.0])
    _run(t, lambda i, early: next(times))
    assert len(t.diffs) == 3 and t.decided is True


def test_bad_arguments_and_bad_sums_raise():
    with pytest.raises(ValueError, match="min_blocks=1 and max_blocks=25 must satisfy"):
        EarlySendTuner(min_blocks=1)
    with pytest.raises(ValueError, match="min_blocks=5 and max_blocks=4"):
        EarlySendTuner(min_blocks=5, max_blocks=4)
    with pytest.raises(ValueError, match="skip=-1 must be >= 0"):
        EarlySendTuner(skip=-1)
    t = EarlySendTuner(min_blocks=2, skip=0)
    for _ in range(8):
        t.record(1.0)
    with pytest.raises(ValueError, match="7 times for 8 recorded"):
        t.decide([1.0] * 7)
    with pytest.raises(ValueError, match="must be > 0"):
        t.decide([1.0] * 7 + [0.0])
    t.claim("DualPipeV")
    with pytest.raises(ValueError, match="already used by a DualPipeV; give each pipeline its own"):
        t.claim("DualPipe")
