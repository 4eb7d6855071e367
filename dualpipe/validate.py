"""Schedule validation: every (stage, micro-batch) gets F, B and W exactly once on the stage's rank in a
legal order, every send has exactly one matching receive, and the schedule runs to its end (checked by
simulating it with unit costs, so a deadlock is found, not assumed away).
"""

from __future__ import annotations

from collections.abc import Iterator

from dualpipe.schedules import Action, Op, Schedule, ScheduleError


def _parts(a: Action) -> Iterator[tuple[str, int, int]]:
    """The work an action does: ('F'|'B'|'W', stage, mb) items."""
    if a.op in (Op.F, Op.FB):
        yield "F", a.stage, a.mb
    if a.op in (Op.B, Op.BW):
        yield "B", a.stage, a.mb
    if a.op in (Op.W, Op.BW):
        yield "W", a.stage, a.mb
    if a.op is Op.FB:
        yield "B", a.stage2, a.mb2
        yield "W", a.stage2, a.mb2


def message_key(a: Action, schedule: Schedule) -> tuple[str, int, int]:
    """Key that a send and its receive share: ('F'|'B', consumer stage, mb)."""
    if a.op is Op.SEND_F:
        return ("F", schedule.next_stage(a.stage), a.mb)
    if a.op is Op.SEND_B:
        return ("B", schedule.prev_stage(a.stage), a.mb)
    if a.op in (Op.RECV_F, Op.RECV_B):
        return ("F" if a.op is Op.RECV_F else "B", a.stage, a.mb)
    raise ValueError(f"{a} is not a message action")


def validate_schedule(schedule: Schedule, *, forward_only: bool = False, strict_fifo: bool = False) -> None:
    """Raise ``ScheduleError`` unless every (stage, micro-batch) gets F, B and W exactly once on the
    stage's rank in a legal order, every send has exactly one matching receive, and the schedule runs to
    the end without deadlock (checked by simulating it with unit costs).

    ``strict_fifo``: also require that, per directed rank pair, the receive order equals the send order
    (what a transport without message tags, such as NCCL, needs).
    """
    s = schedule
    errors: list[str] = []
    if len(s.actions) != s.num_ranks:
        raise ScheduleError(f"{s.name}: {len(s.actions)} action lists for num_ranks={s.num_ranks}")
    done: dict[tuple[str, int, int], tuple[int, int]] = {}
    sends: dict[tuple, list] = {}
    recvs: dict[tuple, list] = {}
    for rank, acts in enumerate(s.actions):
        for pos, a in enumerate(acts):
            if not (0 <= a.stage < s.num_stages) or not (0 <= a.mb < s.num_microbatches):
                errors.append(f"rank {rank} #{pos} {a}: stage or micro-batch out of range")
                continue
            if a.op.is_comm:
                key = message_key(a, s)
                book = sends if a.op in (Op.SEND_F, Op.SEND_B) else recvs
                book.setdefault(key, []).append((rank, pos, a))
                continue
            for kind, st, mb in _parts(a):
                if s.stage_rank[st] != rank:
                    errors.append(f"rank {rank} #{pos} {a}: stage {st} lives on rank {s.stage_rank[st]}")
                if st not in s.chains[s.mb_chain[mb]]:
                    errors.append(f"rank {rank} #{pos} {a}: micro-batch {mb} never visits stage {st}")
                if (kind, st, mb) in done:
                    errors.append(f"rank {rank} #{pos} {a}: {kind}{st}.{mb} done twice")
                done[(kind, st, mb)] = (rank, pos)
    kinds = ("F",) if forward_only else ("F", "B", "W")
    for mb in range(s.num_microbatches):
        for st in s.chains[s.mb_chain[mb]]:
            for kind in kinds:
                if (kind, st, mb) not in done:
                    errors.append(f"{kind}{st}.{mb} is missing (rank {s.stage_rank[st]})")
            if not forward_only and all((k, st, mb) in done for k in "FBW"):
                where = [done[(k, st, mb)] for k in "FBW"]
                if not where[0] < where[1] <= where[2]:
                    errors.append(f"stage {st} mb {mb}: order must be F < B <= W, got (rank, #) {where}")
    for key in set(sends) | set(recvs):
        ns, nr = len(sends.get(key, [])), len(recvs.get(key, []))
        if ns != 1 or nr != 1:
            errors.append(f"message {key}: {ns} sends and {nr} receives (need exactly one each)")
            continue
        (sr, _, sa), (rr, _, ra) = sends[key][0], recvs[key][0]
        if sa.peer != rr or ra.peer != sr:
            errors.append(f"message {key}: send {sa} on rank {sr} and receive {ra} on rank {rr} disagree")
    if strict_fifo:
        errors += _fifo_errors(s, sends, recvs)
    if errors:
        head = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ScheduleError(
            f"{s.name} (pp={s.num_ranks}, m={s.num_microbatches}) is invalid:\n  {head}{more}"
        )
    # Deadlock freedom: a unit-cost simulation must reach the end of every rank's list.
    from dualpipe.simulate import Costs, simulate

    simulate(s, Costs(f=1.0, b=2.0, w=1.0), check=False)


def _fifo_errors(s: Schedule, sends: dict, recvs: dict) -> list[str]:
    by_link_send: dict[tuple[int, int], list] = {}
    by_link_recv: dict[tuple[int, int], list] = {}
    for key, [(rank, pos, a)] in ((k, v) for k, v in sends.items() if len(v) == 1):
        by_link_send.setdefault((rank, a.peer), []).append((pos, key))
    for key, [(rank, pos, a)] in ((k, v) for k, v in recvs.items() if len(v) == 1):
        by_link_recv.setdefault((a.peer, rank), []).append((pos, key))
    errs = []
    for link, items in by_link_send.items():
        sent = [k for _, k in sorted(items)]
        got = [k for _, k in sorted(by_link_recv.get(link, []))]
        if sent != got:
            errs.append(
                f"link {link[0]}->{link[1]}: send order {sent[:6]}... differs from receive order {got[:6]}..."
            )
    return errs
