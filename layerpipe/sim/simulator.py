"""The simulator: runs lowered programs against a cost model and returns a timeline and metrics.

Semantics, shared with the executor:

* each rank issues its program in order; a compute action (F, B, I, W, R,
  STEP) occupies the compute stream and the rank issues nothing else until it
  ends;
* a ``SEND`` starts on the rank's point-to-point stream as soon as that
  stream is free (sends never block the rank); a ``RECV`` blocks the rank
  until the matching transfer has arrived;
* ``GATHER`` and ``REDUCE`` run in issue order on the data-parallel stream;
  a stage's compute waits for its ``GATHER``, its ``STEP`` for its reduce;
* with ``overlap=False`` communication occupies the compute stream instead.

Exposed communication is the time a rank's compute waits on a transfer or
collective after its data was ready to go — waiting for a peer's compute is
bubble, not communication.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..schedule.actions import Kind
from ..schedule.build import Schedule
from ..schedule.bulk import collector_paused
from ..schedule.validation import ScheduleError, blocked_report
from .cost import CostModel, collective_time, per_stage
from .memory import activation_peak
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

    def to_json(self) -> dict:
        """Return the metrics as a JSON-ready dictionary (without the timeline)."""
        return {
            "step_time": self.step_time,
            "ideal_time": self.ideal_time,
            "bubble_fraction": self.bubble_fraction,
            "exposed_communication": max((rank.exposed_communication for rank in self.ranks), default=0.0),
            "ranks": [rank.__dict__ for rank in self.ranks],
            "collectives": {"gather": self.gathers, "reduce": self.reduces, "reduce_portions": self.reduce_portions},
        }


_F, _B, _I, _W, _R, _STEP = Kind.F, Kind.B, Kind.I, Kind.W, Kind.R, Kind.STEP
_SEND_F, _SEND_B, _RECV_F, _RECV_B = Kind.SEND_F, Kind.SEND_B, Kind.RECV_F, Kind.RECV_B
_GATHER, _REDUCE, _RELEASE = Kind.GATHER, Kind.REDUCE, Kind.RELEASE


def simulate(schedule: Schedule, cost: CostModel = CostModel()) -> SimResult:
    """Return the simulated timeline and metrics of one step of ``schedule``.

    Raises ``ScheduleError`` naming each blocked rank if the programs deadlock.
    """
    with collector_paused():
        return _simulate(schedule, cost)


def _simulate(schedule: Schedule, cost: CostModel) -> SimResult:
    config, placement, programs = schedule.config, schedule.placement, schedule.programs
    stages, ranks, microbatches = placement.stages, placement.ranks, config.microbatches
    forward = per_stage(cost.forward_time, stages, "forward_time")
    backward = per_stage(cost.backward_time, stages, "backward_time")
    recompute = per_stage(cost.forward_time if cost.recompute_time is None else cost.recompute_time, stages, "recompute_time")
    boundary = per_stage(cost.boundary_bytes, stages, "boundary_bytes")
    weights = per_stage(cost.weight_bytes, stages, "weight_bytes")
    share = cost.input_gradient_share
    duration = {
        _F: forward,
        _B: backward,
        _I: tuple(time * share for time in backward),
        _W: tuple(time * (1 - share) for time in backward),
        _R: recompute,
        _STEP: (cost.optimizer_time,) * stages,
    }
    send_forward = tuple(cost.p2p_latency + size / cost.p2p_bandwidth for size in boundary)
    send_backward = tuple(cost.p2p_latency + (boundary[s - 1] if s else 0.0) / cost.p2p_bandwidth for s in range(stages))
    replicas = config.data_parallel
    reduce_kind = "all_reduce" if config.zero < 2 else "reduce_scatter"
    gather_time = tuple(collective_time("all_gather", size, replicas, cost.dp_bandwidth, cost.dp_latency) for size in weights)
    reduce_time = tuple(collective_time(reduce_kind, size, replicas, cost.dp_bandwidth, cost.dp_latency) for size in weights)
    overlap = cost.overlap

    compute_free = [0.0] * ranks  # also the time the rank issues its next action
    p2p_free = [0.0] * ranks
    dp_free = [0.0] * ranks
    busy = [0.0] * ranks
    exposed = [0.0] * ranks
    positions = [0] * ranks
    arrivals: dict[int, tuple[float, float, float]] = {}  # transfer key -> (start, end, issued)
    waiting: dict[int, int] = {}  # transfer key -> rank blocked on it
    weights_ready: dict[int, float] = {}
    reduced: dict[int, float] = {}
    sharded = config.data_parallel > 1 and config.zero == 3
    events: list[tuple] = []  # rows of TimelineEvent, built as plain tuples: this loop is hot
    emit = events.append
    runnable = deque(range(ranks))
    compute, p2p, data_parallel = "compute", "p2p", "data_parallel"

    while runnable:
        rank = runnable.popleft()
        program = programs[rank]
        index = positions[rank]
        now = compute_free[rank]
        rank_busy = 0.0
        rank_exposed = 0.0
        end_of_program = len(program)
        while index < end_of_program:
            action = program[index]
            stage, kind, microbatch, _, portions = action
            times = duration.get(kind)
            if times is not None:
                start = now
                if kind is _STEP:
                    ready = reduced.get(stage, 0.0)
                    if ready > start:
                        rank_exposed += ready - start
                        start = ready
                elif sharded:
                    ready = weights_ready.get(stage, 0.0)
                    if ready > start:
                        rank_exposed += ready - start
                        start = ready
                now = start + times[stage]
                rank_busy += now - start
                emit((rank, compute, action, start, now))
            elif kind is _SEND_F or kind is _SEND_B:
                if kind is _SEND_F:
                    key = (stage + 1) * 2 * microbatches + microbatch
                    time = send_forward[stage]
                else:
                    key = ((stage - 1) * 2 + 1) * microbatches + microbatch
                    time = send_backward[stage]
                start = now
                if overlap:
                    if p2p_free[rank] > start:
                        start = p2p_free[rank]
                    p2p_free[rank] = start + time
                else:
                    now = start + time
                arrivals[key] = (start, start + time, start if overlap else now)
                emit((rank, p2p, action, start, start + time))
                waiter = waiting.pop(key, None)
                if waiter is not None:
                    runnable.append(waiter)
            elif kind is _RECV_F or kind is _RECV_B:
                key = (stage * 2 + (kind is _RECV_B)) * microbatches + microbatch
                transfer = arrivals.get(key)
                if transfer is None:
                    waiting[key] = rank
                    break
                start, arrived, issued = transfer
                if arrived > now:
                    rank_exposed += arrived - (issued if issued > now else now)
                    now = arrived
                emit((rank, p2p, action, start, arrived))
            elif kind is _GATHER or kind is _REDUCE:
                time = gather_time[stage] if kind is _GATHER else reduce_time[stage] / (portions or 1)
                start = now
                if overlap:
                    if dp_free[rank] > start:
                        start = dp_free[rank]
                    dp_free[rank] = start + time
                else:
                    now = start + time
                if kind is _GATHER:
                    weights_ready[stage] = start + time
                else:
                    reduced[stage] = start + time
                emit((rank, data_parallel, action, start, start + time))
            index += 1
        positions[rank] = index
        compute_free[rank] = now
        busy[rank] += rank_busy
        exposed[rank] += rank_exposed

    if any(position < len(program) for position, program in zip(positions, programs)):
        raise ScheduleError("deadlock: " + blocked_report(programs, positions, placement))

    finish = [max(compute_free[r], p2p_free[r], dp_free[r]) for r in range(ranks)]
    for rank in range(ranks):
        if dp_free[rank] > compute_free[rank]:
            exposed[rank] += dp_free[rank] - compute_free[rank]
    step_time = max(finish, default=0.0)
    activation = per_stage(cost.activation_bytes, stages, "activation_bytes")
    inputs = tuple(boundary[s - 1] if s else boundary[0] for s in range(stages))
    recomputed = frozenset(config.recompute)
    metrics = []
    for rank in range(ranks):
        peak = activation_peak(programs[rank], activation, inputs, recomputed)
        metrics.append(RankMetrics(rank, busy[rank], step_time - busy[rank], exposed[rank], peak.count, peak.bytes))
    counts = {_GATHER: 0, _REDUCE: 0}
    portions = 0
    for program in programs:
        for action in program:
            if action.kind is _GATHER:
                counts[_GATHER] += 1
            elif action.kind is _REDUCE:
                portions += 1
                counts[_REDUCE] += action.portion in (None, 1)
    timeline = Timeline(ranks, tuple(events), "simulated", "unit", config.schedule,
                        {"config": config.to_json()})
    return SimResult(
        timeline=timeline,
        step_time=step_time,
        ideal_time=max(busy, default=0.0),
        bubble_fraction=1 - sum(busy) / (ranks * step_time) if step_time else 0.0,
        ranks=tuple(metrics),
        gathers=counts[_GATHER],
        reduces=counts[_REDUCE],
        reduce_portions=portions,
    )
