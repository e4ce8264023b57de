"""Validation: prove that programs compute every micro-batch once, in an order that can run.

``validate`` raises ``ScheduleError`` naming the rank, the action and what it
waits for.  It checks, in order: coverage (every forward and backward of every
stage and micro-batch exactly once, on the owning rank), local order
(dependencies on one rank come first), and, in one run of the programs,
matching sends and receives and freedom from deadlock when receives block
until the matching send is issued.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence

from .actions import COMPUTE_KINDS, P2P_KINDS, Action, Kind, Message, Program, message_of
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
                raise ScheduleError(
                    f"rank {rank}: {action} belongs to stage {action.stage}, which rank {rank} does not own"
                )
        counts.update(action for action in program if action.kind in COMPUTE_KINDS)
    for action, count in counts.items():
        if not 0 <= action.microbatch < microbatches:
            raise ScheduleError(
                f"rank {placement.rank_of(action.stage)}: {action} names micro-batch {action.microbatch}; there are {microbatches}"
            )
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
    if kind is F:
        return [Action(stage - 1, F, mb)] if stage > 0 and not placement.receives_forward[stage] else []
    if kind in (B, I):
        needs = [Action(stage, F, mb)]
        if stage + 1 < placement.stages and not placement.sends_forward[stage]:
            needs.append(Action(stage + 1, B, mb))  # or its I: checked by _done
        return needs
    if kind is W:
        return [Action(stage, I, mb)]
    if kind is R:
        return [Action(stage, F, mb)]
    return []


def check_local_order(programs: Sequence[Program], placement: Placement) -> None:
    """Raise if a compute action on a rank comes before another action of that rank it depends on."""
    for rank, program in enumerate(programs):
        done: set[Action] = set()
        backward_done: set[tuple[int, int]] = set()
        for action in program:
            if action.kind not in COMPUTE_KINDS:
                continue
            for need in _required_before(action, placement):
                met = (need.stage, need.microbatch) in backward_done if need.kind is B else need in done
                if not met:
                    raise ScheduleError(
                        f"rank {rank}: {action} waits for {need}, which does not come before it on rank {rank}"
                    )
            done.add(action)
            if action.kind is B or action.kind is I:
                backward_done.add((action.stage, action.microbatch))


def _needed_message(action: Action, placement: Placement) -> Message | None:
    """Return the message a compute action needs received first on its rank (``None`` when its data is local)."""
    stage, kind, microbatch = action[0], action[1], action[2]
    if kind is F and placement.receives_forward[stage]:
        return Message(stage - 1, False, microbatch)
    if (kind is B or kind is I) and placement.sends_forward[stage]:
        return Message(stage + 1, True, microbatch)
    return None


def blocked_report(programs: Sequence[Program], positions: Sequence[int], placement: Placement) -> str:
    """Return one line per unfinished rank: the action it is blocked at and the send it waits for."""
    lines = []
    for rank, (program, position) in enumerate(zip(programs, positions)):
        if position >= len(program):
            continue
        action = program[position]
        if action.kind in (Kind.RECV_F, Kind.RECV_B):
            send = message_of(action).send()
            lines.append(
                f"rank {rank} blocked at {action} (action {position}): waits for {send} from rank {placement.rank_of(send.stage)}"
            )
        else:
            lines.append(f"rank {rank} blocked at {action} (action {position})")
    return "; ".join(lines)


def _unsent_receive(programs: Sequence[Program], positions: Sequence[int], placement: Placement) -> str | None:
    """Return the error for a blocked receive whose send appears in no program, if there is one."""
    sent = {
        message_of(action)
        for program in programs
        for action in program
        if action.kind is Kind.SEND_F or action.kind is Kind.SEND_B
    }
    for rank, (program, position) in enumerate(zip(programs, positions)):
        if position < len(program) and program[position].kind in (Kind.RECV_F, Kind.RECV_B):
            message = message_of(program[position])
            if message not in sent:
                return (
                    f"rank {rank}: the receive of {message.send()} has no matching send "
                    f"on rank {placement.rank_of(message.sender)}"
                )
    return None


def check_transfers(programs: Sequence[Program], placement: Placement) -> None:
    """Raise unless the programs run to the end when sends never block and each receive blocks until its send.

    Also raises when a cross-rank input is used before it is received, a
    receive has no send, or a send has no receive.  Runs the programs once,
    in an order they could execute in; on a deadlock the error lists each
    blocked rank, the receive it is stuck at and the peer it waits for.
    """
    positions = [0] * len(programs)
    sent: dict[Message, int] = {}  # message -> sends issued so far
    received: dict[Message, int] = {}
    waiting: dict[Message, int] = {}
    runnable = deque(range(len(programs)))
    receives_forward, sends_forward = placement.receives_forward, placement.sends_forward
    recv_f, recv_b, send_f, send_b = Kind.RECV_F, Kind.RECV_B, Kind.SEND_F, Kind.SEND_B
    while runnable:
        rank = runnable.popleft()
        program, index = programs[rank], positions[rank]
        end = len(program)
        while index < end:
            action = program[index]
            kind = action[1]
            if kind is recv_f or kind is recv_b:
                message = message_of(action)
                count = received.get(message, 0)
                if count >= sent.get(message, 0):
                    waiting[message] = rank
                    break
                received[message] = count + 1
            elif kind is send_f or kind is send_b:
                message = message_of(action)
                sent[message] = sent.get(message, 0) + 1
                waiter = waiting.pop(message, None)
                if waiter is not None:
                    runnable.append(waiter)
            elif (kind is F and receives_forward[action[0]]) or ((kind is B or kind is I) and sends_forward[action[0]]):
                message = _needed_message(action, placement)
                if message not in received:
                    raise ScheduleError(f"rank {rank}: {action} needs {message.receive()} before it")
            index += 1
        positions[rank] = index
    if any(position < len(program) for position, program in zip(positions, programs)):
        raise ScheduleError(
            _unsent_receive(programs, positions, placement)
            or "deadlock: " + blocked_report(programs, positions, placement)
        )
    for message, count in sent.items():
        if received.get(message, 0) < count:
            raise ScheduleError(f"rank {placement.rank_of(message.sender)}: {message.send()} has no matching receive")


def validate(programs: Sequence[Program], placement: Placement, microbatches: int) -> None:
    """Raise ``ScheduleError`` unless the programs can run; return None when they can.

    Compute-only programs are checked as they would run after ``add_p2p``.
    """
    check_coverage(programs, placement, microbatches)
    check_local_order(programs, placement)
    if not any(action.kind in P2P_KINDS for program in programs for action in program):
        programs = add_p2p(programs, placement)
    check_transfers(programs, placement)
