"""Validation: prove that programs compute every micro-batch once, in an order that can run.

``validate`` raises ``ScheduleError`` naming the rank, the action and what it
waits for.  It checks, in order: coverage (every forward and backward of every
stage and micro-batch exactly once, on the owning rank), local order
(dependencies on one rank come first), matching (every message sent once and
received once, and received before the compute that uses it), and freedom
from deadlock, which it proves by the simulator's own walk with every time
zero (``schedule/walk.py``): what validation accepts, the simulator runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from .actions import (
    COMPUTE_KINDS,
    P2P_KINDS,
    PAIR,
    RECEIVE_KINDS,
    SEND_KINDS,
    Action,
    Kind,
    Message,
    Program,
    expand_pairs,
    halves,
    message_of,
)
from .bulk import collector_paused
from .lowering import add_p2p
from .placement import Placement
from .walk import ScheduleError, check_finished, message_bases, walk, zero_costs

__all__ = ["ScheduleError", "check_coverage", "check_local_order", "check_matching", "check_transfers", "validate"]

F, B, I, W, R = Kind.F, Kind.B, Kind.I, Kind.W, Kind.R


def check_coverage(programs: Sequence[Program], placement: Placement, microbatches: int) -> None:
    """Raise unless each (stage, micro-batch) has one ``F`` and one ``B`` (or one ``I`` and one ``W``) on its rank."""
    if len(programs) != placement.ranks:
        raise ScheduleError(f"{len(programs)} programs for {placement.ranks} ranks")
    counts: Counter = Counter()
    for rank, program in enumerate(programs):
        owned = frozenset(placement.stages_of(rank))
        for action in program:
            if action.stage not in owned and action.kind is not Kind.TIE:  # a TIE names its group by its first stage
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


def _microbatch_span(programs: Sequence[Program]) -> int:
    """Return one more than the highest micro-batch a transfer names: the span that numbers messages uniquely."""
    return 1 + max((action[2] for program in programs for action in program if action[1] in P2P_KINDS), default=0)


def _counts(programs: Sequence[Program], kinds: frozenset, bases: dict) -> Counter:
    """Return how often each message number is named by an action of ``kinds``."""
    counts: Counter = Counter()
    for program in programs:
        counts.update(bases[action[1]][action[0]] + action[2] for action in program if action[1] in kinds)
    return counts


def _mismatch(programs: Sequence[Program], placement: Placement, bases: dict, sent: Counter, received: Counter) -> str:
    """Return the error for the first transfer, in rank and program order, whose message is not sent and received once."""
    for rank, program in enumerate(programs):
        for action in program:
            if action[1] not in P2P_KINDS:
                continue
            number, message = bases[action[1]][action[0]] + action[2], message_of(action)
            if action[1] in RECEIVE_KINDS and received[number] > sent[number]:
                return (
                    f"rank {rank}: the receive of {message.send()} has no matching send "
                    f"on rank {placement.rank_of(message.sender)}"
                )
            if action[1] in SEND_KINDS and sent[number] > received[number]:
                return f"rank {placement.rank_of(message.sender)}: {message.send()} has no matching receive"
            if sent[number] > 1:
                return (
                    f"rank {placement.rank_of(message.sender)}: {message.send()} is sent {sent[number]} times "
                    "(each message is sent and received once per step)"
                )
    raise AssertionError("no mismatched transfer")  # pragma: no cover - called only when the counts differ


def _needed_message(action: Action, placement: Placement) -> Message | None:
    """Return the message a compute action needs received first on its rank (``None`` when its data is local)."""
    stage, kind, microbatch = action[0], action[1], action[2]
    if kind is F and placement.receives_forward[stage]:
        return message_of(Action(stage, Kind.RECV_F, microbatch))
    if (kind is B or kind is I) and placement.sends_forward[stage]:
        return message_of(Action(stage, Kind.RECV_B, microbatch))
    return None


def _check_received_before_use(programs: Sequence[Program], placement: Placement, bases: dict) -> None:
    """Raise if a compute action uses a cross-rank input before its rank has received it."""
    receives_forward, sends_forward = placement.receives_forward, placement.sends_forward
    forward, backward = bases[Kind.RECV_F], bases[Kind.RECV_B]
    for rank, program in enumerate(programs):
        received = set()
        for action in program:
            stage, kind, microbatch = action[0], action[1], action[2]
            if kind in RECEIVE_KINDS:
                received.add(bases[kind][stage] + microbatch)
                continue
            if kind is F and receives_forward[stage]:
                needed = forward[stage] + microbatch
            elif (kind is B or kind is I) and sends_forward[stage]:
                needed = backward[stage] + microbatch
            elif kind is PAIR:  # both halves' inputs before the pair
                _check_pair_received(rank, action, placement, bases, received)
                continue
            else:
                continue
            if needed not in received:
                raise ScheduleError(
                    f"rank {rank}: {action} needs {_needed_message(action, placement).receive()} before it"
                )


def _check_pair_received(rank: int, action: Action, placement: Placement, bases: dict, received: set) -> None:
    """Raise if an overlapped pair comes before the receipt of what one of its halves needs from another rank."""
    for half in halves(action):
        message = _needed_message(half, placement)
        if message is not None and bases[message.receive()[1]][message.receiver] + half[2] not in received:
            raise ScheduleError(f"rank {rank}: {action} needs {message.receive()} before it")


def check_matching(programs: Sequence[Program], placement: Placement) -> None:
    """Raise unless every message is sent once and received once, and received before the compute that uses it."""
    bases = message_bases(placement.stages, _microbatch_span(programs))
    sent, received = _counts(programs, SEND_KINDS, bases), _counts(programs, RECEIVE_KINDS, bases)
    if sent != received or max(sent.values(), default=1) > 1:
        raise ScheduleError(_mismatch(programs, placement, bases, sent, received))
    _check_received_before_use(programs, placement, bases)


def check_deadlock_free(programs: Sequence[Program], placement: Placement) -> None:
    """Raise, naming each blocked rank and what it waits for, unless the programs run to their ends.

    The proof is the simulator's own walk with every time zero: whether a walk
    ends depends on the order of the actions only, so the programs end under
    any costs exactly when they end here.
    """
    run = walk(programs, zero_costs(placement.stages, _microbatch_span(programs)))
    check_finished(programs, run.positions, placement)


def check_transfers(programs: Sequence[Program], placement: Placement) -> None:
    """Raise unless the transfers match (``check_matching``) and the programs run to their ends without deadlock.

    Sends never block; a receive blocks until its send is issued, a guard
    until every rank has reached it.  On a deadlock the error lists each
    blocked rank, the action it is stuck at and what it waits for.
    """
    check_matching(programs, placement)
    check_deadlock_free(programs, placement)


def validate(programs: Sequence[Program], placement: Placement, microbatches: int) -> None:
    """Raise ``ScheduleError`` unless the programs can run; return None when they can.

    Compute-only programs are checked as they would run after ``add_p2p``;
    coverage and local order see each overlapped pair as its two halves.
    """
    with collector_paused():
        expanded = [expand_pairs(program) for program in programs]
        check_coverage(expanded, placement, microbatches)
        check_local_order(expanded, placement)
        if not any(action.kind in P2P_KINDS for program in programs for action in program):
            programs = add_p2p(programs, placement)
        check_transfers(programs, placement)
