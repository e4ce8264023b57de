"""The walk: every rank issues its program in order, timed by per-stage costs.

The one statement of how programs run, for both of its readers: the simulator
walks the programs with the cost model's times (``sim/simulator.py``), and
validation walks them with every time zero to prove that they end
(``schedule/validation.py``).  Whether a walk ends depends on the order of the
actions only, never on their times: a receive blocks until its send has been
issued, a guard until every rank has reached it, and nothing else blocks
across ranks.  The executor follows the same rules with real tensors.

Semantics:

* a compute action occupies the compute stream and the rank issues nothing
  else until it ends; it first waits for the collectives ``AWAITS`` names;
* a send holds the rank for its hold time, then its transfer starts on the
  rank's point-to-point stream as soon as that stream is free; a receive
  blocks the rank until the matching transfer has arrived, then holds it;
* an overlapped pair (``OVERLAP_F_B``) is one compute action whose time is
  ``WalkCosts.pair`` of its halves' times: their sum when the halves run one
  after the other (the default), their maximum when an overlap function runs
  them together (``CostModel.overlap_pairs``); it waits for both stages' gathers;
* a ``TIE`` blocks until every rank of its tie group (the ranks whose programs
  hold it) has reached it, then takes its group's ``WalkCosts.tie_time``;
* ``GATHER`` and ``REDUCE`` run in issue order on the data-parallel stream;
* with ``overlap`` false, communication occupies the compute stream instead.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

from .actions import (
    AWAITS,
    BARRIER_KINDS,
    COLLECTIVE_KINDS,
    P2P_KINDS,
    PAIR,
    RECEIVE_KINDS,
    SEND_KINDS,
    TIE_KINDS,
    TIMED_KINDS,
    Action,
    Kind,
    Program,
    message_of,
)
from .placement import Placement
from .ties import tie_members


class ScheduleError(ValueError):
    """Programs that cannot run; the message names rank, action and what it waits for."""


class WalkCosts(NamedTuple):
    """Per stage, how long each kind of action takes, and the base number of each transfer kind's messages."""

    duration: dict  # timed kind -> per-stage time (compute stream)
    transfer: dict  # send kind -> per-stage time (point-to-point stream)
    collective: dict  # GATHER / REDUCE -> per-stage time of the whole collective (data-parallel stream)
    message_base: dict  # transfer kind -> per-stage Message.number of its micro-batch 0
    guard_time: float = 0.0  # a GUARD's agreement, once every rank has reached it
    send_hold: Sequence[float] = (0.0,)  # per stage, what a send costs its rank before the transfer goes on alone
    receive_hold: Sequence[float] = (0.0,)  # per stage, what a receive costs its rank once the message is there
    pair: Callable[[float, float], float] = operator.add  # an overlapped pair's time from its halves' (F, B) times
    tie_time: Mapping = MappingProxyType(
        {}
    )  # tie group (its first stage) -> a TIE's time once its ranks have reached it


def message_bases(stages: int, microbatches: int) -> dict:
    """Return, per transfer kind, each stage's number of its micro-batch 0 message (``Message.number``).

    A message's number is its base plus its micro-batch: unique while the micro-batches are below ``microbatches``.
    """
    return {
        kind: tuple(message_of(Action(stage, kind, 0)).number(microbatches) for stage in range(stages))
        for kind in P2P_KINDS
    }


def zero_costs(stages: int, microbatches: int) -> WalkCosts:
    """Return costs of zero for every kind: the walk that proves programs end, as validation runs it."""
    zeros = (0.0,) * stages
    return WalkCosts(
        duration=dict.fromkeys(TIMED_KINDS, zeros),
        transfer=dict.fromkeys(SEND_KINDS, zeros),
        collective=dict.fromkeys(COLLECTIVE_KINDS, zeros),
        message_base=message_bases(stages, microbatches),
        send_hold=zeros,
        receive_hold=zeros,
    )


class Walk:
    """The state of a walk: per rank, when each stream is free, the position in the program and the totals."""

    def __init__(self, ranks: int, overlap: bool, guard_fails: bool = False):
        self.overlap = overlap
        self.guard_fails = guard_fails
        self.compute_free = [0.0] * ranks  # also the time the rank issues its next action
        self.p2p_free = [0.0] * ranks
        self.dp_free = [0.0] * ranks
        self.busy = [0.0] * ranks
        self.exposed = [0.0] * ranks
        self.positions = [0] * ranks
        self.arrivals: dict[int, tuple[float, float, float]] = {}  # message number -> (start, end, issued)
        self.waiting: dict[int, int] = {}  # message number -> rank blocked on it
        self.finished = {kind: {} for kind in COLLECTIVE_KINDS}  # collective kind -> stage -> when its last one ends
        self.awaited = {kind: self.finished.get(AWAITS.get(kind), {}) for kind in Kind}  # kind -> what it waits for
        self.events: list[tuple] = []  # rows of TimelineEvent, built as plain tuples: this loop is hot
        self.guards_passed = [0] * ranks  # per rank, how many GUARDs it has passed
        self.guard_arrivals: dict[int, dict[int, float]] = {}  # guard number -> rank -> when it arrived
        self.tie_members: dict[int, frozenset[int]] = {}  # tie group (its first stage) -> the ranks that sum it
        self.ties_passed: dict[tuple[int, int], int] = {}  # (rank, tie group) -> how many of its TIEs it has passed
        self.tie_arrivals: dict[tuple[int, int], dict[int, float]] = {}  # (group, number) -> rank -> when it arrived


class _Tables(NamedTuple):
    """The walk's tables that ``_advance`` reads and writes, unpacked once per call."""

    awaited: dict
    finished: dict
    arrivals: dict
    waiting: dict
    emit: object
    overlap: bool
    p2p_free: list
    wake: object


def walk(programs: Sequence[Program], costs: WalkCosts, overlap: bool = True, guard_fails: bool = False) -> Walk:
    """Return the walk of ``programs``: every rank run until it ends or blocks, a send waking the rank waiting for it.

    ``guard_fails``: every ``GUARD`` finds a non-finite gradient, so every rank skips the steps (and gathers) that
    follow it.  The walk does not raise: ``check_finished`` says whether every rank reached its end.
    """
    run = Walk(len(programs), overlap, guard_fails)
    run.tie_members = tie_members(programs)
    runnable = deque(range(len(programs)))
    tables = _Tables(
        run.awaited, run.finished, run.arrivals, run.waiting, run.events.append, overlap, run.p2p_free, runnable.append
    )
    while runnable:
        rank = runnable.popleft()
        _advance(rank, programs[rank], costs, tables, run)
    return run


def _advance(rank: int, program: Program, costs: WalkCosts, tables: _Tables, run: Walk) -> None:
    """Run ``rank`` from its position until it ends or blocks; a send wakes the rank waiting for it.

    This loop is the hot path of simulation and validation: the costs and tables are unpacked into locals once per
    call, and the sends and receives handled inline.  The wait rules are ``AWAITS``.
    """
    duration, transfer, collective, message_base, _, send_hold, receive_hold, pair_time, _ = costs
    awaited, finished, arrivals, waiting, emit, overlap, p2p_free, wake = tables
    index, end_of_program, now, busy, exposed = run.positions[rank], len(program), run.compute_free[rank], 0.0, 0.0
    while index < end_of_program:
        action = program[index]
        stage, kind, microbatch, _, portions = action
        times = duration.get(kind)
        if times is not None:
            ready = awaited[kind]  # stage -> when the collective it waits for ends; empty without collectives
            start = ready.get(stage, 0.0) if ready else 0.0
            if start > now:
                exposed += start - now
            else:
                start = now
            now = start + times[stage]
            busy += now - start
            emit((rank, "compute", action, start, now))
        elif kind in SEND_KINDS:
            key = message_base[kind][stage] + microbatch
            now, exposed = now + (hold := send_hold[stage]), exposed + hold
            start = p2p_free[rank] if overlap and p2p_free[rank] > now else now
            end = start + transfer[kind][stage]
            if overlap:
                p2p_free[rank] = end
            else:
                now = end
            arrivals[key] = (start, end, start if overlap else now)
            emit((rank, "p2p", action, start, end))
            if key in waiting:
                wake(waiting.pop(key))
        elif kind in RECEIVE_KINDS:
            transfer_times = arrivals.get(key := message_base[kind][stage] + microbatch)
            if transfer_times is None:
                waiting[key] = rank
                break
            start, arrived, issued = transfer_times
            if arrived > now:
                exposed += arrived - (issued if issued > now else now)
                now = arrived
            now, exposed = now + (hold := receive_hold[stage]), exposed + hold
            emit((rank, "p2p", action, start, arrived))
        elif kind in COLLECTIVE_KINDS:
            now = _collective(rank, action, now, collective[kind][stage] / (portions or 1), run, finished[kind])
        elif kind in BARRIER_KINDS or kind in TIE_KINDS:
            if (passed := _pass_barrier(rank, program, index, now, run, wake, costs)) is None:
                break
            now, index = passed
        elif kind is PAIR:
            start, end = _pair(action, now, duration, pair_time, awaited[kind], emit, rank)
            exposed, busy, now = exposed + (start - now), busy + (end - start), end
        index += 1
    run.positions[rank], run.compute_free[rank] = index, now
    run.busy[rank] += busy
    run.exposed[rank] += exposed


def _pair(action: Action, now: float, duration: dict, pair_time, ready: dict, emit, rank: int) -> tuple[float, float]:
    """Run an overlapped pair: return when it starts (after both stages' gathers) and ends (``pair_time`` of its
    halves' times)."""
    forward_stage, backward_stage = action[0], action[3]
    start = max(now, ready.get(forward_stage, 0.0), ready.get(backward_stage, 0.0)) if ready else now
    end = start + pair_time(duration[Kind.F][forward_stage], duration[Kind.B][backward_stage])
    emit((rank, "compute", action, start, end))
    return start, end


def _collective(rank: int, action: Action, now: float, length: float, run: Walk, finished: dict) -> float:
    """Issue a GATHER or REDUCE on the rank's data-parallel stream; return when the rank's compute may go on."""
    dp_free = run.dp_free
    start = dp_free[rank] if run.overlap and dp_free[rank] > now else now
    end = start + length
    if run.overlap:
        dp_free[rank] = end
    else:
        now = end
    finished[action[0]] = end
    run.events.append((rank, "data_parallel", action, start, end))
    return now


def _pass_barrier(rank: int, program: Program, index: int, now: float, run: Walk, wake, costs: WalkCosts):
    """Return ``(time, index)`` after the rank's GUARD, CLIP or TIE at ``index``, or ``None`` while it waits."""
    action = program[index]
    if action[1] not in TIE_KINDS:
        return _pass_guard(rank, program, index, now, run, wake, costs.guard_time)
    passed = _tie(rank, action[0], now, run, wake, costs.tie_time.get(action[0], 0.0))
    if passed is None:
        return None
    run.events.append((rank, "compute", action, now, passed))
    return passed, index


def _pass_guard(rank: int, program: Program, index: int, now: float, run: Walk, wake, agree_time: float):
    """Return ``(time, index)`` after the rank's GUARD at ``index`` (and the steps it skips), or ``None`` while it waits."""
    passed = _guard(rank, now, run, wake, len(run.positions), agree_time)
    if passed is None:
        return None
    run.events.append((rank, "compute", program[index], now, passed))
    if run.guard_fails:
        index = _skip_step(rank, program, index, passed, run.events.append)
    return passed, index


def _skip_step(rank: int, program: Program, index: int, now: float, emit) -> int:
    """Emit the steps and gathers after the GUARD at ``index`` as skipped; return the index of the last of them."""
    while index + 1 < len(program) and program[index + 1][1] in (Kind.STEP, Kind.GATHER):
        index += 1
        emit((rank, "skipped", program[index], now, now))
    return index


def _guard(rank: int, now: float, run: Walk, wake, ranks: int, agree_time: float) -> float | None:
    """Return when ``rank`` passes its next GUARD: once every rank has reached it, plus the agreement's time.

    ``None`` while some rank has not arrived (this rank blocks; the last to
    arrive wakes the others).
    """
    arrivals = run.guard_arrivals.setdefault(run.guards_passed[rank], {})
    first_visit = rank not in arrivals
    arrivals.setdefault(rank, now)
    if len(arrivals) < ranks:
        return None
    if first_visit:  # the last to arrive: the others wait for it
        for other in arrivals:
            if other != rank:
                wake(other)
    run.guards_passed[rank] += 1
    return max(arrivals.values()) + agree_time


def _tie(rank: int, group: int, now: float, run: Walk, wake, sum_time: float) -> float | None:
    """Return when ``rank`` passes its next ``TIE`` of ``group``: once every rank of the group has reached it, plus
    the sum's time; ``None`` while one has not (this rank blocks; the last to arrive wakes the others)."""
    arrivals = run.tie_arrivals.setdefault((group, run.ties_passed.get((rank, group), 0)), {})
    first_visit = rank not in arrivals
    arrivals.setdefault(rank, now)
    if len(arrivals) < len(run.tie_members[group]):
        return None
    if first_visit:
        for other in arrivals:
            if other != rank:
                wake(other)
    run.ties_passed[(rank, group)] = run.ties_passed.get((rank, group), 0) + 1
    return max(arrivals.values()) + sum_time


def check_finished(programs: Sequence[Program], positions: Sequence[int], placement: Placement) -> None:
    """Raise ``ScheduleError`` naming each blocked rank unless every rank's walk reached the end of its program."""
    if any(position < len(program) for position, program in zip(positions, programs)):
        raise ScheduleError("deadlock: " + blocked_report(programs, positions, placement))


def blocked_report(programs: Sequence[Program], positions: Sequence[int], placement: Placement) -> str:
    """Return one line per unfinished rank: the action it is blocked at and what it waits for."""
    lines = []
    for rank, (program, position) in enumerate(zip(programs, positions)):
        if position >= len(program):
            continue
        action = program[position]
        line = f"rank {rank} blocked at {action} (action {position})"
        if action.kind in RECEIVE_KINDS:
            send = message_of(action).send()
            line += f": waits for {send} from rank {placement.rank_of(send.stage)}"
        elif action.kind in BARRIER_KINDS:
            line += f": waits for {_absent(programs, positions, action.kind)} to reach a {action.kind}"
        elif action.kind in TIE_KINDS:
            line += f": waits for the ranks of its tie group {sorted(tie_members(programs)[action.stage])}"
        lines.append(line)
    return "; ".join(lines)


def _absent(programs: Sequence[Program], positions: Sequence[int], kind: Kind) -> str:
    """Return the ranks that are not at an action of ``kind``, in words (``rank 1``, ``ranks 1, 3``)."""
    ranks = [
        str(rank)
        for rank, (program, position) in enumerate(zip(programs, positions))
        if position >= len(program) or program[position].kind is not kind
    ]
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(ranks)
