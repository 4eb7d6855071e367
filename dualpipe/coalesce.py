"""Coalesced P2P: messages a rank sends back to back to the same peer travel as one.

DualPipe's overlapped pairs produce them naturally: after F&B(F of stage r, B of stage 2pp-1-r) on
DualPipeV rank r, the activation for stage r+1 and the gradient for stage 2pp-2-r both go to rank r+1.
One message instead of two halves the per-message cost (a gloo call, a wake-up, an NCCL launch).

Both sides derive the groups from the schedule (every rank has every rank's action list), so no
negotiation is needed. A group is a run of consecutive SEND actions to one peer; it is used only if the
receiver can post a single receive for all of it before it needs any part: the latest of the group's
RECV positions must come before the first compute action that consumes a part. Otherwise the messages
stay separate.

Early sends (``early_sends``): the activation made by the forward half of an F&B action leaves as soon
as that half is done, before the backward half runs, when its SEND_F is among the sends right after
the F&B (so the order of this rank's P2P calls is unchanged). The neighbour's next F&B needs it first
(its forward half) and the gradient only for its backward half, so a transfer no longer sits between
two dependent F&B actions: in DualPipe's steady state each pair of F&B actions otherwise waits one P2P
latency (rank r's F&B needs the neighbour's F&B of the same slot, both ways). An early message is never
coalesced (it has left when the rest is sent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dualpipe.schedules import Op, Schedule
from dualpipe.validate import message_key

MessageKey = tuple[str, int, int]  # ('F'|'B', consumer stage, micro-batch)


@dataclass(frozen=True)
class Group:
    """Messages from ``src`` to ``dst`` sent as one, in this order."""

    keys: tuple[MessageKey, ...]
    src: int
    dst: int
    first: MessageKey = field(init=False, repr=False, compare=False)  # keys[0] (read per message)
    last: MessageKey = field(init=False, repr=False, compare=False)  # keys[-1]

    def __post_init__(self) -> None:
        object.__setattr__(self, "first", self.keys[0])
        object.__setattr__(self, "last", self.keys[-1])


def _consumer_positions(schedule: Schedule, rank: int) -> dict[MessageKey, int]:
    """Index, in ``rank``'s list, of the compute action that needs each incoming message."""
    out: dict[MessageKey, int] = {}
    for i, a in enumerate(schedule.actions[rank]):
        if a.op in (Op.F, Op.FB):
            out.setdefault(("F", a.stage, a.mb), i)
        if a.op in (Op.B, Op.BW):
            out.setdefault(("B", a.stage, a.mb), i)
        if a.op is Op.FB:
            out.setdefault(("B", a.stage2, a.mb2), i)
    return out


def early_sends(schedule: Schedule) -> frozenset[MessageKey]:
    """Message keys of activations sent from inside an F&B action (see the module docstring)."""
    s = schedule
    out: set[MessageKey] = set()
    for acts in s.actions:
        for i, a in enumerate(acts):
            if a.op is not Op.FB:
                continue
            j = i + 1
            while j < len(acts) and acts[j].op in (Op.SEND_F, Op.SEND_B):
                x = acts[j]
                if x.op is Op.SEND_F and (x.stage, x.mb) == (a.stage, a.mb):
                    out.add(message_key(x, s))
                j += 1
    return frozenset(out)


def message_groups(schedule: Schedule, early: frozenset[MessageKey] = frozenset()) -> dict[MessageKey, Group]:
    """Every message key that travels in a multi-message group -> its group. Keys in ``early`` (sent
    ahead of their run, ``early_sends``) are left out of every group."""
    s = schedule
    recv_pos = {
        r: {message_key(a, s): i for i, a in enumerate(acts) if a.op in (Op.RECV_F, Op.RECV_B)}
        for r, acts in enumerate(s.actions)
    }
    consumers = {r: _consumer_positions(s, r) for r in range(s.num_ranks)}
    groups: dict[MessageKey, Group] = {}
    for rank, acts in enumerate(s.actions):
        i = 0
        while i < len(acts):
            a = acts[i]
            if a.op not in (Op.SEND_F, Op.SEND_B):
                i += 1
                continue
            j = i
            while (
                j + 1 < len(acts) and acts[j + 1].op in (Op.SEND_F, Op.SEND_B) and acts[j + 1].peer == a.peer
            ):
                j += 1
            keys = tuple(k for k in (message_key(x, s) for x in acts[i : j + 1]) if k not in early)
            i = j + 1
            if len(keys) < 2:
                continue
            post = max(recv_pos[a.peer][k] for k in keys)
            need = min(consumers[a.peer][k] for k in keys)
            if post < need:
                g = Group(keys, rank, a.peer)
                for k in keys:
                    groups[k] = g
    return groups
