"""early_send="auto": the trial order and the decision (``dualpipe.tuning``); the pipelines' use of it
is tested with real processes in test_pipeline.py."""

import pytest

from dualpipe.tuning import EarlySendTuner


def _run(tuner: EarlySendTuner, times: list[float]) -> list[bool]:
    """Drive the tuner as the pipeline does; ``times``: the step time of each mode (early, coalesced)."""
    modes = []
    while tuner.decided is None:
        mode = tuner.next_mode()
        modes.append(mode)
        if tuner.timing and tuner.record(times[0] if mode else times[1]):
            tuner.decide(list(tuner.times))
    return modes


def test_trials_alternate_after_the_skipped_steps_and_the_faster_plan_wins():
    t = EarlySendTuner(trials=3, skip=2)
    assert _run(t, [0.9, 1.3]) == [True, True, True, False, True, False, True, False]
    assert t.decided is True and t.medians == (0.9, 1.3)
    assert t.next_mode() is True and not t.timing  # decided: every later step runs the decision
    t = EarlySendTuner(trials=2, skip=0)
    assert _run(t, [2.0, 1.7]) == [True, False, True, False]
    assert t.decided is False


def test_decision_uses_medians_of_the_summed_times():
    t = EarlySendTuner(trials=3, skip=0)
    # one outlier early step (a hiccup on a shared host) does not decide: medians 1.0 vs 1.1
    assert t.decide([9.0, 1.1, 1.0, 1.1, 1.0, 1.2]) is True
    with pytest.raises(ValueError, match="4 times for 6 trials"):
        EarlySendTuner(trials=3).decide([1.0] * 4)
    with pytest.raises(ValueError, match="trials=0"):
        EarlySendTuner(trials=0)
