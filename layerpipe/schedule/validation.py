"""Validation: prove that programs compute every micro-batch once, in an order that can run.

``validate`` raises ``ScheduleError`` naming the rank, the action and what it
waits for.  It checks, in order: coverage (every forward and backward of every
stage and micro-batch exactly once, on the owning rank), local order
(dependencies on one rank come first), matching sends and receives, and
freedom from deadlock when receives block until the matching send is issued.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Sequence

from .actions import COMPUTE_KINDS, P2P_KINDS, Action, Kind, Program
from .lowering import add_p2p
from .placement import Placement

F, B, I, W, R = Kind.F, Kind.B, Kind.I, Kind.W, Kind.R


class ScheduleError(ValueError):
    """Programs that cannot run; the message names rank, action and what it waits for."""


def check_coverage(programs: Sequence[Program], placement: Placement, microbatches: int) -> None:
    """Raise unless each (stage, micro-batch) has one ``F`` and one ``B`` (or one ``I`` and one ``W``) on its rank."""
    if len(programs) != placement.ranks:
        raise ScheduleError(f"{len(programs)} programs for {placement.ranks} ranks")
    counts: Counter = Counter()
    for rank, program in enumerate(programs):
        owned = frozenset(placement.stages_of(rank))
        for action in program:
            if action.stage not in owned:
                raise ScheduleError(f"rank {rank}: {action} belongs to stage {action.stage}, which rank {rank} does not own")
        counts.update(action for action in program if action.kind in COMPUTE_KINDS)
    for action, count in counts.items():
        if not 0 <= action.microbatch < microbatches:
            raise ScheduleError(f"rank {placement.rank_of(action.stage)}: {action} names micro-batch {action.microbatch}; there are {microbatches}")
        if count > 1:
            raise ScheduleError(f"rank {placement.rank_of(action.stage)}: {action} appears {count} times")
    # Actions hash and compare as plain tuples, so tuple literals look them up without building Actions.
    for stage in range(placement.stages):
        rank = placement.rank_of(stage)
        for mb in range(microbatches):
            if not counts[(stage, F, mb, None, None)]:
                raise ScheduleError(f"rank {rank}: {Action(stage, F, mb)} is missing")
            full = counts[(stage, B, mb, None, None)]
            split = (counts[(stage, I, mb, None, None)], counts[(stage, W, mb, None, None)])
            if full and any(split):
                raise ScheduleError(f"rank {rank}: {Action(stage, B, mb)} appears beside its halves I/W")
            if not full and split != (1, 1):
                missing = Action(stage, B, mb) if split == (0, 0) else Action(stage, I if not split[0] else W, mb)
                raise ScheduleError(f"rank {rank}: {missing} is missing")


def _required_before(action: Action, placement: Placement) -> list[Action]:
    """Return the same-rank actions that must come before ``action`` (either B or I stands for a backward)."""
    stage, kind, mb = action.stage, action.kind, action.microbatch
    rank = placement.rank_of(stage)
    if kind is F:
        return [Action(stage - 1, F, mb)] if stage > 0 and placement.rank_of(stage - 1) == rank else []
    if kind in (B, I):
        needs = [Action(stage, F, mb)]
        if stage + 1 < placement.stages and placement.rank_of(stage + 1) == rank:
            needs.append(Action(stage + 1, B, mb))  # or its I: checked by _done
        return needs
    if kind is W:
        return [Action(stage, I, mb)]
    if kind is R:
        return [Action(stage, F, mb)]
    return []


def check_local_order(programs: Sequence[Program], placement: Placement) -> None:
    """Raise if an action on a rank comes before another action of that rank it depends on."""
    for rank, program in enumerate(programs):
        done: set[Action] = set()
        backward_done: set[tuple[int, int]] = set()
        for action in program:
            for need in _required_before(action, placement):
                met = (need.stage, need.microbatch) in backward_done if need.kind is B else need in done
                if not met:
                    raise ScheduleError(f"rank {rank}: {action} waits for {need}, which does not come before it on rank {rank}")
            done.add(action)
            if action.kind in (B, I):
                backward_done.add((action.stage, action.microbatch))
    return None


def _matching_send(action: Action) -> Action:
    """Return the send that a receive waits for."""
    if action.kind is Kind.RECV_F:
        return Action(action.stage - 1, Kind.SEND_F, action.microbatch)
    return Action(action.stage + 1, Kind.SEND_B, action.microbatch)


def check_p2p(programs: Sequence[Program], placement: Placement) -> None:
    """Raise unless every send has exactly one receive on the peer rank and every cross-rank input is received first."""
    sends: Counter = Counter()
    receives: Counter = Counter()
    crosses_back = [s > 0 and placement.rank_of(s - 1) != placement.rank_of(s) for s in range(placement.stages)]
    crosses_on = [s + 1 < placement.stages and placement.rank_of(s + 1) != placement.rank_of(s) for s in range(placement.stages)]
    send_f, send_b, recv_f, recv_b = Kind.SEND_F, Kind.SEND_B, Kind.RECV_F, Kind.RECV_B
    for rank, program in enumerate(programs):
        received: set[tuple] = set()
        for action in program:
            stage, kind, mb, _, _ = action
            if kind is send_f or kind is send_b:
                sends[action] += 1
            elif kind is recv_f:
                receives[(stage - 1, send_f, mb, None, None)] += 1
                received.add(action)
            elif kind is recv_b:
                receives[(stage + 1, send_b, mb, None, None)] += 1
                received.add(action)
            elif kind is F and crosses_back[stage] and (stage, recv_f, mb, None, None) not in received:
                raise ScheduleError(f"rank {rank}: {action} needs {Action(stage, recv_f, mb)} before it")
            elif (kind is B or kind is I) and crosses_on[stage] and (stage, recv_b, mb, None, None) not in received:
                raise ScheduleError(f"rank {rank}: {action} needs {Action(stage, recv_b, mb)} before it")
    for send in sends - receives:
        raise ScheduleError(f"rank {placement.rank_of(send.stage)}: {send} has no matching receive")
    for send in receives - sends:
        stage, kind = send[0], send[1]
        receiver = stage + (1 if kind is send_f else -1)
        raise ScheduleError(f"rank {placement.rank_of(receiver)}: the receive of {Action(stage, kind, send[2])} "
                            f"has no matching send on rank {placement.rank_of(stage)}")


def blocked_report(programs: Sequence[Program], positions: Sequence[int], placement: Placement) -> str:
    """Return one line per unfinished rank: the action it is blocked at and the send it waits for."""
    lines = []
    for rank, (program, position) in enumerate(zip(programs, positions)):
        if position >= len(program):
            continue
        action = program[position]
        if action.kind in (Kind.RECV_F, Kind.RECV_B):
            send = _matching_send(action)
            lines.append(f"rank {rank} blocked at {action} (action {position}): waits for {send} from rank {placement.rank_of(send.stage)}")
        else:
            lines.append(f"rank {rank} blocked at {action} (action {position})")
    return "; ".join(lines)


def check_deadlock(programs: Sequence[Program], placement: Placement) -> None:
    """Raise if the programs deadlock when each receive blocks until its matching send has been issued.

    Sends never block.  The error lists each blocked rank, the receive it is
    stuck at and the peer it waits for.
    """
    positions = [0] * len(programs)
    issued: set[tuple] = set()
    waiting: dict[tuple, int] = {}
    runnable = deque(range(len(programs)))
    while runnable:
        rank = runnable.popleft()
        program, index = programs[rank], positions[rank]
        while index < len(program):
            action = program[index]
            kind = action.kind
            if kind is Kind.RECV_F or kind is Kind.RECV_B:
                send = (action.stage - 1, Kind.SEND_F, action.microbatch, None, None) if kind is Kind.RECV_F \
                    else (action.stage + 1, Kind.SEND_B, action.microbatch, None, None)
                if send not in issued:
                    waiting[send] = rank
                    break
            elif kind is Kind.SEND_F or kind is Kind.SEND_B:
                issued.add(action)
                waiter = waiting.pop(action, None)
                if waiter is not None:
                    runnable.append(waiter)
            index += 1
        positions[rank] = index
    if any(position < len(program) for position, program in zip(positions, programs)):
        raise ScheduleError("deadlock: " + blocked_report(programs, positions, placement))


def validate(programs: Sequence[Program], placement: Placement, microbatches: int) -> None:
    """Raise ``ScheduleError`` unless the programs can run; return None when they can.

    Compute-only programs are checked as they would run after ``add_p2p``.
    """
    check_coverage(programs, placement, microbatches)
    check_local_order(programs, placement)
    if not any(action.kind in P2P_KINDS for program in programs for action in program):
        programs = add_p2p(programs, placement)
    check_p2p(programs, placement)
    check_deadlock(programs, placement)
