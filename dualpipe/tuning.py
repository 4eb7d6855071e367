"""``early_send="auto"``: pick the F&B message plan by timing both on the first training steps.

An F&B action of DualPipe / DualPipeV can send its forward half's activation as soon as that half is
done (early sends: the neighbour's next F&B starts sooner, one more message per F&B pair), or keep it
for the end of the action and send it with the gradient for the same neighbour as one message
(coalesced). Which is faster depends on the stage size and the transport: early sends win where
compute dominates (DualPipeV at pp=8 with 40-80 ms actions: ~6% shorter steps, measured and simulated),
coalesced messages where a message costs about as much as a stage's compute (1 ms stages on gloo, where
a message end costs ~0.1 ms of CPU: ~7-10% shorter). Neither the user nor the simulator knows the
per-message cost of a host, so the pipeline measures it, like ``torch.backends.cudnn.benchmark``.

Protocol (every rank runs it in lockstep, as every rank calls ``step`` the same number of times):

1. ``skip`` untimed warm-up steps per plan, alternating early, coalesced, early, ... A fresh pipeline's
   first step of each plan is slow (first messages of each shape, allocations); a plan that has not run
   yet would pay that in its first timed step.
2. Timed blocks of four steps: early, coalesced, coalesced, early (ABBA: a steady drift of the host's
   speed adds as much to each plan). A block gives one paired estimate of the plans' difference,
   ``d = log(early pair's time) - log(coalesced pair's time)``, each time summed over the pipeline's
   ranks (so every rank sees the same numbers and takes the same decision).
3. From ``min_blocks`` blocks on, after each block the pipeline sums the new times over its ranks (one
   small all-reduce) and stops once the mean of the ``d`` is ``z`` standard errors away from zero:
   a clear difference (emulated stages; often d=64 real stages) decides after ``min_blocks``; a small one on a
   noisy host takes more blocks, and after ``max_blocks`` the sign of the median ``d`` decides (plans
   that close cost about the same either way).

Why sequential. On the 2-core CI host at d=64 (pp=2, ~25 ms steps) one step's time varies by ~25% (log
standard deviation) while the plans differ by ~10%: five timed steps per plan (the first version of
this tuner, warm-up on the early plan only, steps alternating) picked the slower plan in 3-5 of 20
fresh pipelines. The paired, sequential test picked it in 0 of 16 recorded pipelines (replayed from
104-step recordings; median 54 steps each), in 1 of 16 live ones (with ``min_blocks=3``, stopped at the
minimum: hence 4 now) and in 1 of 12 bench runs; on emulated stages it keeps early sends, as before.
Both plans compute exactly the same numbers; only the message plan differs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

BLOCK = 4  # timed steps per block: early, coalesced, coalesced, early


class EarlySendTuner:
    """Which message plan the next training step uses, until decided; then the decision.

    Pass one as ``early_send=`` to a pipeline to change the protocol's limits (every rank the same);
    ``early_send="auto"`` uses the defaults. Driven by the pipeline: ``next_mode()`` before each
    training step, ``record(seconds)`` after a timed one and, when that returns True, ``decide(summed)``
    with the recorded times summed over the pipeline's ranks.
    """

    def __init__(self, min_blocks: int = 4, max_blocks: int = 25, skip: int = 2, z: float = 2.5):
        if not 2 <= min_blocks <= max_blocks:
            raise ValueError(
                f"EarlySendTuner: min_blocks={min_blocks} and max_blocks={max_blocks} must satisfy "
                "2 <= min_blocks <= max_blocks (a standard error needs two blocks)"
            )
        if skip < 0 or not z > 0:
            raise ValueError(f"EarlySendTuner: skip={skip} must be >= 0 and z={z} > 0")
        self.min_blocks, self.max_blocks, self.skip, self.z = min_blocks, max_blocks, skip, z
        self.times: list[float] = []  # local step times of the timed steps, in order (see ``mode_of``)
        self._seen = 0  # training steps started before the decision
        self.decided: bool | None = None
        self.diffs: list[float] = []  # per block: log(early) - log(coalesced), summed over the ranks
        self.ratio: float | None = None  # once decided: exp(mean diff), early over coalesced step time
        self._owner: str | None = None

    def claim(self, owner: str) -> None:
        """Called by the pipeline that takes this tuner: one tuner per pipeline (it holds trial state)."""
        if self._owner is not None:
            raise ValueError(
                f"{owner}: early_send=EarlySendTuner(...) is already used by a {self._owner}; "
                "give each pipeline its own EarlySendTuner"
            )
        self._owner = owner

    @property
    def settings(self) -> tuple[int, int, int, int]:
        """What every rank must agree on (the pipeline's construction handshake checks it)."""
        return (self.min_blocks, self.max_blocks, self.skip, round(self.z * 1000))

    def next_mode(self) -> bool:
        """The plan of the training step about to run (call once per training step): True = early."""
        if self.decided is not None:
            return self.decided
        i = self._seen
        self._seen += 1
        return self.mode_of(i)

    def mode_of(self, i: int) -> bool:
        """The plan of training step ``i`` (0-based) before the decision: True = early sends."""
        if i < 2 * self.skip:  # warm-up: early, coalesced, early, ...
            return i % 2 == 0
        j = (i - 2 * self.skip) % BLOCK
        return j in (0, 3)

    @property
    def timing(self) -> bool:
        """Whether the step just started is a timed trial."""
        return self.decided is None and self._seen > 2 * self.skip

    def record(self, seconds: float) -> bool:
        """Record a timed step; True when a check is due (then call ``decide`` with the sums)."""
        self.times.append(seconds)
        n = len(self.times)
        return n % BLOCK == 0 and n // BLOCK >= self.min_blocks

    def decide(self, summed: Sequence[float]) -> bool | None:
        """``summed``: ``self.times`` summed over the pipeline's ranks, in the same order. Returns the
        decision (True = early sends), or None while more blocks are needed."""
        if len(summed) != len(self.times) or len(summed) % BLOCK:
            raise ValueError(
                f"EarlySendTuner.decide: {len(summed)} times for {len(self.times)} recorded "
                f"(whole blocks of {BLOCK})"
            )
        if any(not t > 0 for t in summed):
            raise ValueError(f"EarlySendTuner.decide: step times must be > 0, got {list(summed)}")
        blocks = [summed[k : k + BLOCK] for k in range(0, len(summed), BLOCK)]
        self.diffs = [math.log(b[0] + b[3]) - math.log(b[1] + b[2]) for b in blocks]
        mean = statistics.fmean(self.diffs)
        se = statistics.stdev(self.diffs) / math.sqrt(len(self.diffs))
        if abs(mean) > self.z * se:
            self.decided = mean <= 0
        elif len(self.diffs) >= self.max_blocks:
            self.decided = statistics.median(self.diffs) <= 0
        else:
            return None
        self.ratio = math.exp(mean)
        return self.decided
