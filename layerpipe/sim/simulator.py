"""The simulator: runs lowered programs against a cost model and returns a timeline and metrics.

Semantics, shared with the executor:

* each rank issues its program in order; a compute action (F, B, I, W, R,
  STEP) occupies the compute stream and the rank issues nothing else until it
  ends;
* a ``SEND`` holds the rank for ``send_time`` (issuing it), then its
  transfer starts on the rank's point-to-point stream as soon as that
  stream is free; a ``RECV`` blocks the rank until the matching transfer
  has arrived, then holds it for ``receive_time``;
* ``GATHER`` and ``REDUCE`` run in issue order on the data-parallel stream;
  a stage's compute waits for its ``GATHER``, its ``STEP`` for its reduce;
* with ``overlap=False`` communication occupies the compute stream instead;
* with a ``variation`` above 0, each compute action's time is drawn from a
  gamma distribution with the cost model's time as its mean (seeded); with a
  ``hold_variation`` above 0, so is each hold of a ``SEND`` or ``RECV``.

Exposed communication is the time a rank's compute waits on a transfer or
collective after its data was ready to go — waiting for a peer's compute is
bubble, not communication.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

from ..knobs import check_fields
from ..schedule.actions import AWAITS, BACKWARD_KINDS, P2P_KINDS, Action, Kind, message_of
from ..schedule.build import Schedule, build_schedule
from ..schedule.bulk import collector_paused
from ..schedule.config import ScheduleConfig
from ..schedule.validation import ScheduleError, blocked_report
from .cost import NEGLIGIBLE_SPREAD, CostModel, collective_time, draws, per_stage
from .memory import activation_peak, weight_versions
from .timeline import Timeline


@dataclass(frozen=True)
class RankMetrics:
    """What one rank did in the step."""

    rank: int
    busy: float
    idle: float
    exposed_communication: float
    peak_activations: int
    peak_activation_bytes: float


@dataclass(frozen=True)
class SimResult:
    """Timeline and metrics of one simulated step.

    ``bubble_fraction`` is ``1 - (total compute busy time) / (p × step_time)``;
    ``steady_bubble`` the same over the steady state only: from the moment
    every rank has started backwards to the moment the first rank has ended
    its forwards (``None`` when the programs have no such window, as GPipe's);
    ``weight_versions`` per rank what stashing weights would cost; both are
    computed when first asked;
    ``ideal_time`` is the busiest rank's compute time; ``gathers`` and
    ``reduces`` count the collectives of one pipeline replica (a reduce split
    into portions counts once; ``reduce_portions`` counts the parts).
    """

    timeline: Timeline
    step_time: float
    ideal_time: float
    bubble_fraction: float
    ranks: tuple[RankMetrics, ...]
    gathers: int
    reduces: int
    reduce_portions: int
    programs: tuple = field(default=(), repr=False, compare=False)

    @cached_property
    def steady_bubble(self) -> float | None:
        """Return the bubble of the steady state (computed when first asked: it reads every event)."""
        return steady_bubble(self.timeline.events, self.timeline.ranks)

    @cached_property
    def weight_versions(self) -> tuple[int, ...]:
        """Return, per rank, the most versions of one of its stages' weights that stashing needs at once."""
        return tuple(max(weight_versions(program).values(), default=1) for program in self.programs)

    def to_json(self) -> dict:
        """Return the metrics as a JSON-ready dictionary (without the timeline)."""
        return {
            "step_time": self.step_time,
            "ideal_time": self.ideal_time,
            "bubble_fraction": self.bubble_fraction,
            "steady_bubble": self.steady_bubble,
            "weight_versions": list(self.weight_versions),
            "exposed_communication": max((rank.exposed_communication for rank in self.ranks), default=0.0),
            "ranks": [rank.__dict__ for rank in self.ranks],
            "collectives": {"gather": self.gathers, "reduce": self.reduces, "reduce_portions": self.reduce_portions},
        }


_SEND_F, _SEND_B, _RECV_F, _RECV_B = Kind.SEND_F, Kind.SEND_B, Kind.RECV_F, Kind.RECV_B
_GATHER, _REDUCE, _GUARD = Kind.GATHER, Kind.REDUCE, Kind.GUARD


def simulate(schedule: Schedule, cost: CostModel = CostModel(), guard_fails: bool = False, seed: int = 0) -> SimResult:
    """Return the simulated timeline and metrics of one step of ``schedule``.

    ``seed`` seeds the draws of the compute times and holds when ``cost.variation`` or ``cost.hold_variation`` is
    above 0.

    ``guard_fails``: every ``GUARD`` finds a non-finite gradient, so every
    rank skips the steps (and gathers) that follow it; the timeline shows
    them on a ``skipped`` stream, at the moment they would have started.

    Refuses, with ``ConfigError`` naming the field, a cost model with a bad
    value (a bandwidth of 0, an infinite time, a per-stage list of the wrong
    length); raises ``ScheduleError`` naming each blocked rank if the
    programs deadlock.
    """
    check_fields(cost)
    with collector_paused():
        costs = _Costs.of(schedule, cost, seed)
        run = _Run(schedule.placement.ranks, cost.overlap, guard_fails)
        _run_programs(schedule.programs, costs, run)
        if any(position < len(program) for position, program in zip(run.positions, schedule.programs)):
            raise ScheduleError("deadlock: " + blocked_report(schedule.programs, run.positions, schedule.placement))
        return _result(schedule, cost, run)


_STEADY_CALLS, _STEADY_SEEDS, _REPLICA_GROUPS = 10, 8, 16
"""With drawn times: the extra steps each steady estimate averages, the estimates, and the groups of replicas drawn."""


def steady_step(config: ScheduleConfig, cost: CostModel = CostModel()) -> float:
    """Return what one more step adds when consecutive steps of ``config`` are simulated: the step a training loop
    runs at, once each step may start while the previous one ends.

    With a ``variation`` or ``hold_variation`` above 0 the times are drawn: the result is the mean,
    over several seeds, of what ten more steps add, divided by ten; and with
    data-parallel replicas, which meet at each step's collectives, it adds
    how much longer the slowest of ``data_parallel`` independently drawn
    steps is than the mean step.  Refuses what ``build_schedule`` and
    ``simulate`` refuse."""
    if not draws(cost):
        two, three = (simulate(build_schedule(config, check=False, calls=calls), cost).step_time for calls in (2, 3))
        return three - two
    short, long = (build_schedule(config, check=False, calls=calls) for calls in (2, 2 + _STEADY_CALLS))
    slopes = [
        (simulate(long, cost, seed=seed).step_time - simulate(short, cost, seed=seed + _STEADY_SEEDS).step_time)
        / _STEADY_CALLS
        for seed in range(_STEADY_SEEDS)
    ]
    return sum(slopes) / len(slopes) + _slowest_replica(config, cost)


def _slowest_replica(config: ScheduleConfig, cost: CostModel) -> float:
    """Return how much longer, on average, the slowest of ``data_parallel`` drawn steps is than one drawn step
    (0 with one replica)."""
    replicas = config.data_parallel
    if replicas <= 1:
        return 0.0
    one = build_schedule(config, check=False)
    steps = [simulate(one, cost, seed=seed).step_time for seed in range(_REPLICA_GROUPS * replicas)]
    slowest = [max(steps[group * replicas : (group + 1) * replicas]) for group in range(_REPLICA_GROUPS)]
    return sum(slowest) / len(slowest) - sum(steps) / len(steps)


@dataclass(frozen=True)
class _Costs:
    """Per stage, how long each kind of action takes, and the base number of each transfer kind's messages."""

    duration: dict  # compute kind -> per-stage time (compute stream)
    transfer: dict  # SEND kind -> per-stage time (p2p stream)
    collective: dict  # GATHER / REDUCE -> per-stage time of the whole collective (data-parallel stream)
    message_base: dict  # transfer kind -> per-stage Message.number of its micro-batch 0
    guard_time: float = 0.0  # a GUARD's agreement, once every rank has reached it
    send_hold: tuple = (0.0,)  # per stage, what a SEND costs its rank before the transfer goes on alone
    receive_hold: tuple = (0.0,)  # per stage, what a RECV costs its rank once the message is there

    @staticmethod
    def of(schedule: Schedule, cost: CostModel, seed: int = 0) -> _Costs:
        config, stages = schedule.config, schedule.placement.stages
        backward = per_stage(cost.backward_time, stages, "backward_time")
        share = cost.input_gradient_share
        recompute = cost.forward_time if cost.recompute_time is None else cost.recompute_time
        duration = {
            Kind.F: per_stage(cost.forward_time, stages, "forward_time"),
            Kind.B: backward,
            Kind.I: tuple(time * share for time in backward),
            Kind.W: tuple(time * (1 - share) for time in backward),
            Kind.R: per_stage(recompute, stages, "recompute_time"),
            Kind.STEP: (cost.optimizer_time,) * stages,
        }
        if cost.action_overhead:
            duration = {kind: tuple(time + cost.action_overhead for time in times) for kind, times in duration.items()}
        draw = random.Random(seed).gammavariate
        if cost.variation > NEGLIGIBLE_SPREAD:
            duration = {kind: _Drawn(times, cost.variation, draw) for kind, times in duration.items()}
        holds = ((cost.send_time,) * stages, (cost.receive_time,) * stages)
        if cost.hold_variation > NEGLIGIBLE_SPREAD:
            holds = tuple(_Drawn(times, cost.hold_variation, draw) for times in holds)
        boundary = per_stage(cost.boundary_bytes, stages, "boundary_bytes")
        transfer = {
            _SEND_F: tuple(cost.p2p_latency + size / cost.p2p_bandwidth for size in boundary),
            _SEND_B: tuple(
                cost.p2p_latency + (boundary[s - 1] if s else 0.0) / cost.p2p_bandwidth for s in range(stages)
            ),
        }
        weights = per_stage(cost.weight_bytes, stages, "weight_bytes")
        replicas = config.data_parallel
        reduce_kind = "all_reduce" if config.zero < 2 else "reduce_scatter"
        collective = {
            _GATHER: tuple(
                collective_time("all_gather", size, replicas, cost.data_parallel_bandwidth, cost.data_parallel_latency)
                for size in weights
            ),
            _REDUCE: tuple(
                collective_time(reduce_kind, size, replicas, cost.data_parallel_bandwidth, cost.data_parallel_latency)
                for size in weights
            ),
        }
        microbatches = schedule.microbatch_count
        message_base = {
            kind: tuple(message_of(Action(stage, kind, 0)).number(microbatches) for stage in range(stages))
            for kind in P2P_KINDS
        }
        return _Costs(duration, transfer, collective, message_base, cost.p2p_latency, *holds)


class _Drawn:
    """Per stage, a compute time or hold drawn afresh each time it is read: gamma-distributed around the stage's
    mean."""

    def __init__(self, means: tuple[float, ...], variation: float, draw):
        self.shape = 1.0 / variation**2
        self.scales = tuple(mean / self.shape for mean in means)
        self.draw = draw

    def __getitem__(self, stage: int) -> float:
        scale = self.scales[stage]
        return self.draw(self.shape, scale) if scale > 0 else 0.0


class _Run:
    """The state of a simulation: per rank, when each stream is free, the position in the program and the totals."""

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
        self.finished = {_GATHER: {}, _REDUCE: {}}  # collective kind -> stage -> when its last one ends
        self.awaited = {
            kind: self.finished[collective] for kind, collective in AWAITS.items() if collective in self.finished
        }  # per action kind: stage -> when what it waits for ends
        self.events: list[tuple] = []  # rows of TimelineEvent, built as plain tuples: this loop is hot
        self.guards_passed = [0] * ranks  # per rank, how many GUARDs it has passed
        self.guard_arrivals: dict[int, dict[int, float]] = {}  # guard number -> rank -> when it arrived


def _run_programs(programs, costs: _Costs, run: _Run) -> None:
    """Run every rank until it ends or blocks on a receive; a send wakes the rank waiting for it."""
    runnable = deque(range(len(programs)))
    shared = (
        costs.duration,
        costs.transfer,
        costs.collective,
        costs.message_base,
        run.awaited,
        run.finished,
        run.arrivals,
        run.waiting,
        run.events.append,
        run.overlap,
        run.p2p_free,
        run.dp_free,
        runnable.append,
        costs.guard_time,
        costs.send_hold,
        costs.receive_hold,
    )
    while runnable:
        rank = runnable.popleft()
        _advance(rank, programs[rank], shared, run)


def _advance(rank: int, program, shared: tuple, run: _Run) -> None:
    """Run ``rank`` from its position until it ends or blocks; a send wakes the rank waiting for it.

    ``shared`` holds the costs and the run's tables, unpacked once per call
    (this loop is the simulator's hot path).  The wait rules are ``AWAITS``:
    an action waits for the collectives of its stage that the table names.
    """
    (
        duration,
        transfer,
        collective,
        message_base,
        awaited,
        finished,
        arrivals,
        waiting,
        emit,
        overlap,
        p2p_free,
        _,
        wake,
        guard_time,
        send_hold,
        receive_hold,
    ) = shared
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
        elif kind is _SEND_F or kind is _SEND_B:
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
        elif kind is _RECV_F or kind is _RECV_B:
            key = message_base[kind][stage] + microbatch
            transfer_times = arrivals.get(key)
            if transfer_times is None:
                waiting[key] = rank
                break
            start, arrived, issued = transfer_times
            if arrived > now:
                exposed += arrived - (issued if issued > now else now)
                now = arrived
            now, exposed = now + (hold := receive_hold[stage]), exposed + hold
            emit((rank, "p2p", action, start, arrived))
        elif kind is _GATHER or kind is _REDUCE:
            now = _collective(rank, action, now, collective[kind][stage] / (portions or 1), run, finished[kind])
        elif kind is _GUARD:
            passed = _pass_guard(rank, program, index, now, run, wake, guard_time)
            if passed is None:
                break
            now, index = passed
        index += 1
    run.positions[rank], run.compute_free[rank] = index, now
    run.busy[rank] += busy
    run.exposed[rank] += exposed


def _collective(rank: int, action, now: float, length: float, run: _Run, finished: dict) -> float:
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


def _pass_guard(rank: int, program, index: int, now: float, run: _Run, wake, agree_time: float):
    """Return ``(time, index)`` after the rank's GUARD at ``index`` (and the steps it skips), or ``None`` while it waits."""
    passed = _guard(rank, now, run, wake, len(run.positions), agree_time)
    if passed is None:
        return None
    run.events.append((rank, "compute", program[index], now, passed))
    if run.guard_fails:
        index = _skip_step(rank, program, index, passed, run.events.append)
    return passed, index


def _skip_step(rank: int, program, index: int, now: float, emit) -> int:
    """Emit the steps and gathers after the GUARD at ``index`` as skipped; return the index of the last of them."""
    while index + 1 < len(program) and program[index + 1][1] in (Kind.STEP, Kind.GATHER):
        index += 1
        emit((rank, "skipped", program[index], now, now))
    return index


def _guard(rank: int, now: float, run: _Run, wake, ranks: int, agree_time: float) -> float | None:
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


def _result(schedule: Schedule, cost: CostModel, run: _Run) -> SimResult:
    """Return the metrics of a finished simulation: step time, bubble, exposed communication, memory, collectives."""
    config, placement, programs = schedule.config, schedule.placement, schedule.programs
    ranks, stages = placement.ranks, placement.stages
    finish = [max(run.compute_free[r], run.p2p_free[r], run.dp_free[r]) for r in range(ranks)]
    exposed = [run.exposed[r] + max(0.0, run.dp_free[r] - run.compute_free[r]) for r in range(ranks)]
    step_time = max(finish, default=0.0)
    activation = per_stage(cost.activation_bytes, stages, "activation_bytes")
    boundary = per_stage(cost.boundary_bytes, stages, "boundary_bytes")
    inputs = tuple(boundary[s - 1] if s else boundary[0] for s in range(stages))
    recomputed = frozenset(config.recomputed_stages)
    metrics = []
    for rank in range(ranks):
        peak = activation_peak(programs[rank], activation, inputs, recomputed)
        metrics.append(
            RankMetrics(rank, run.busy[rank], step_time - run.busy[rank], exposed[rank], peak.count, peak.bytes)
        )
    gathers, reduces, portions = _collective_counts(programs)
    timeline = Timeline(ranks, tuple(run.events), "simulated", "unit", config.schedule, {"config": config.to_json()})
    return SimResult(
        timeline=timeline,
        step_time=step_time,
        ideal_time=max(run.busy, default=0.0),
        bubble_fraction=1 - sum(run.busy) / (ranks * step_time) if step_time else 0.0,
        ranks=tuple(metrics),
        gathers=gathers,
        reduces=reduces,
        reduce_portions=portions,
        programs=programs,
    )


def _collective_counts(programs) -> tuple[int, int, int]:
    """Return the gathers, the reduces (a portioned one counted once) and the reduce portions of the programs."""
    gathers = reduces = portions = 0
    for program in programs:
        for _, kind, _, portion, _ in program:
            if kind is _GATHER:
                gathers += 1
            elif kind is _REDUCE:
                portions += 1
                reduces += portion is None or portion == 1
    return gathers, reduces, portions


def steady_bubble(events: list[tuple], ranks: int) -> float | None:
    """Return the idle share of the compute streams between every rank's first backward and the first rank's last forward.

    ``None`` when that window is empty (a schedule without a steady state).
    """
    first_backward, last_forward = [None] * ranks, [None] * ranks
    for rank, stream, action, start, end in events:
        if stream != "compute":
            continue
        if action.kind in BACKWARD_KINDS and (first_backward[rank] is None or start < first_backward[rank]):
            first_backward[rank] = start
        if action.kind is Kind.F and (last_forward[rank] is None or end > last_forward[rank]):
            last_forward[rank] = end
    if None in first_backward or None in last_forward:
        return None
    low, high = max(first_backward), min(last_forward)
    if high <= low:
        return None
    busy = sum(
        min(end, high) - max(start, low)
        for _, stream, _, start, end in events
        if stream == "compute" and end > low and start < high
    )
    return 1 - busy / (ranks * (high - low))
