"""``early_send="auto"``: pick the F&B message plan by timing both on the first training steps.

An F&B action of DualPipe / DualPipeV can send its forward half's activation as soon as that half is
done (early sends: the neighbour's next F&B starts sooner, one more message per F&B pair), or keep it
for the end of the action and send it with the gradient for the same neighbour as one message
(coalesced). Which is faster depends on the stage size and the transport: early sends win where
compute dominates (DualPipeV at pp=8 with 40-80 ms actions: ~6% shorter steps, measured and simulated),
coalesced messages where a message costs about as much as a stage's compute (1 ms stages on gloo, where
a message end costs ~0.1 ms of CPU: ~7% shorter). Neither the user nor the simulator knows the
per-message cost of a host, so the pipeline measures it, like ``torch.backends.cudnn.benchmark``.

Protocol (every rank runs it in lockstep, as every rank calls ``step`` the same number of times):
``skip`` warm-up training steps run early sends and are not timed (first-step header exchanges and
allocations); then ``2 * trials`` steps alternate early, coalesced, early, ... and each rank records its
step times. After the last one, the pipeline sums the records over the pipeline group (one
all-reduce), so every rank takes the same decision: the mode with the lower median summed step time.
Both modes compute exactly the same numbers; only the message plan differs.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


class EarlySendTuner:
    """Which message plan the next training step uses, until decided; then the decision."""

    def __init__(self, trials: int = 5, skip: int = 1):
        if trials < 1 or skip < 0:
            raise ValueError(f"EarlySendTuner: trials={trials} must be >= 1 and skip={skip} >= 0")
        self.trials, self.skip = trials, skip
        self.times: list[float] = []  # local step times, in trial order (early, coalesced, early, ...)
        self._seen = 0  # training steps started
        self.decided: bool | None = None
        self.medians: tuple[float, float] | None = None  # (early, coalesced), summed over the ranks

    def next_mode(self) -> bool:
        """The mode of the training step about to run (call once per training step)."""
        if self.decided is not None:
            return self.decided
        i = self._seen - self.skip
        self._seen += 1
        return i < 0 or i % 2 == 0

    @property
    def timing(self) -> bool:
        """Whether the step just started is a timed trial."""
        return self.decided is None and self._seen > self.skip

    def record(self, seconds: float) -> bool:
        """Record the trial step's time; True once all trials are in (then call ``decide``)."""
        self.times.append(seconds)
        return len(self.times) == 2 * self.trials

    def decide(self, summed: Sequence[float]) -> bool:
        """``summed``: ``self.times`` summed over the pipeline's ranks, in the same order."""
        if len(summed) != 2 * self.trials:
            raise ValueError(f"EarlySendTuner.decide: {len(summed)} times for {2 * self.trials} trials")
        early = statistics.median(summed[0::2])
        coalesced = statistics.median(summed[1::2])
        self.medians = (early, coalesced)
        self.decided = early <= coalesced
        return self.decided
